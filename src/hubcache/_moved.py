"""Old import paths of modules that moved, kept working for one release with a warning.

``import hubcache.core.fetch`` (or ``from hubcache.core.plugins import get_registry``) still works
and returns the module at its new home, the very same object, so monkeypatching either name
patches both; the first import of an old name warns with :class:`DeprecationWarning`, naming the
new one. A finder on ``sys.meta_path`` answers only for the names in :data:`MOVED`, so it costs
nothing to any other import. Remove in hubcache 0.5.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Sequence

#: Old module name -> new module name (the 0.4 restructure).
MOVED: dict[str, str] = {
    "hubcache.default_plugins": "hubcache.plugins.builtin",
    "hubcache.core.hookspecs": "hubcache.plugins.hookspecs",
    "hubcache.core.plugins": "hubcache.plugins.registry",
    "hubcache.core.formats": "hubcache.archive.formats",
    "hubcache.core.pipeline": "hubcache.archive.pipeline",
    "hubcache.core.extract": "hubcache.archive.extract",
    "hubcache.core.fetch": "hubcache.download.fetch",
    "hubcache.core.objectread": "hubcache.download.objectread",
    "hubcache.core.pointer": "hubcache.download.pointer",
    "hubcache.core.localstore": "hubcache.stores.localstore",
    "hubcache.core.objectstore": "hubcache.stores.objectstore",
    "hubcache.core.safefs": "hubcache.stores.safefs",
    "hubcache.core.treewalk": "hubcache.stores.treewalk",
    "hubcache.core.usage": "hubcache.stores.usage",
    "hubcache.core.manage": "hubcache.maintenance.manage",
    "hubcache.core.prune": "hubcache.maintenance.prune",
    "hubcache.core.verify": "hubcache.maintenance.verify",
    "hubcache.core.prefetch": "hubcache.maintenance.prefetch",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there "
                      "(hubcache.plugin is the stable API for plugins)", DeprecationWarning, stacklevel=2)
        # The new module itself: importlib keeps its __name__ and __spec__, and files it under
        # the old name in sys.modules too.
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old names in :data:`MOVED` (and nothing else)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
