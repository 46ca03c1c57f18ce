"""The ``tmp`` backend (default): a cache in ``tempfile.gettempdir()/tfhub_modules``.

The same place tensorflow_hub uses by default, so the two share entries. Fast, but the OS may
clean it; hubcache detects entries a temp cleaner damaged and rebuilds them.
"""

from __future__ import annotations

import os
import tempfile

import hubcache
from hubcache.core.backend import LocalCacheBackend


class TmpBackend(LocalCacheBackend):
    """A download-and-decompress cache in the system temp directory."""

    name = "tmp"
    description = "local cache in the temp dir (default; what tensorflow_hub uses)"

    def default_root(self) -> str:
        return os.path.join(tempfile.gettempdir(), "tfhub_modules")


@hubcache.hookimpl
def hubcache_register_backends(register):
    register(TmpBackend)
