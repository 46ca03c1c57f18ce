"""The ``home`` backend: a persistent cache in the user cache dir (``~/.cache/tfhub_modules``)."""

from __future__ import annotations

import os

import hubcache
from hubcache.core.backend import LocalCacheBackend


class HomeBackend(LocalCacheBackend):
    """A download-and-decompress cache that survives reboots."""

    name = "home"
    description = "persistent local cache in the user cache dir"

    def default_root(self) -> str:
        import platformdirs

        return os.path.join(platformdirs.user_cache_dir(), "tfhub_modules")


@hubcache.hookimpl
def hubcache_register_backends(register):
    register(HomeBackend)
