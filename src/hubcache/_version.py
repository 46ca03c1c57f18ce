"""The installed version of hubcache."""

__version__ = "0.1.0"
