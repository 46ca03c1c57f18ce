"""The ``home`` backend: a persistent cache in the user cache dir (``~/.cache/tfhub_modules``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from ..core.backend import Backend, LocalCacheBackend
from ..plugins.markers import hookimpl

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from ..core.handles import Handle
    from ..core.manifest import Manifest


class HomeBackend(LocalCacheBackend):
    """A download-and-decompress cache that survives reboots."""

    name = "home"
    description = "persistent local cache in the user cache dir"

    def default_root(self) -> str:
        import platformdirs

        return os.path.join(platformdirs.user_cache_dir(), "tfhub_modules")

    def after_commit(self, handle: Handle, path: str, manifest: Manifest) -> None:
        """Enforce ``HUBCACHE_MAX_SIZE``: evict least recently used entries until under budget.

        The entry just committed and entries in use by any process are never evicted.
        """
        max_size = self.config.max_size
        if max_size:
            from ..maintenance.prune import enforce_budget

            enforce_budget(self.store, int(max_size), keep=frozenset({handle.key}), backend=self.name)


@hookimpl
def hubcache_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(HomeBackend)
