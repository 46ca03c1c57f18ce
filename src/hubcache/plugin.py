"""The stable API for writing a hubcache plugin: import everything a backend needs from here.

This module is the promise: the names in :data:`__all__` keep their meaning and this import
path across releases. The modules under ``hubcache.core`` and ``hubcache.backends`` are
internal: they may be split, renamed or moved at any time, so a plugin that imports them may
break on an upgrade; one that imports only ``hubcache.plugin`` does not. The names here are
the very objects core uses (not copies), so ``isinstance`` checks and ``except`` clauses on
either side agree.

What is here:

- the hook marker :data:`hookimpl` (``@hookimpl def hubcache_register_backends(register)``; the
  hook specifications are listed in CONTRIBUTING.md);
- the backend base classes: :class:`Backend` (no cache: ``resolve(handle, location) -> path``),
  :class:`CacheBackend` (a cache held by a :class:`Store`) and :class:`ObjectStoreBackend` (a
  cache in an object store: set ``scheme``, implement ``filesystem()``, optionally
  ``store_class()``);
- the store protocol: :class:`Store`, :class:`EntryWriter`, :class:`EntryInfo`; the object-store
  implementation to subclass, :class:`ObjectStore`, and :class:`PreconditionFailed`, which its
  versioned primitives raise;
- the values hooks and backends receive: :class:`Config`, :class:`Handle`, :class:`Location`,
  :class:`Manifest`, :class:`Event`;
- the errors a backend raises, all :class:`HubcacheError` subclasses.

The conformance suite a backend's tests subclass stays in :mod:`hubcache.testing`
(``CacheBackendConformance``, ``ObjectStoreConformance``): it needs pytest, which a plugin at run
time must not.

Importing this module is as light as ``import hubcache``: :class:`ObjectStore` and
:class:`PreconditionFailed` are loaded on first use, so a plugin that only names
:class:`ObjectStoreBackend` costs every ``hubcache`` command nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.backend import Backend, CacheBackend, ObjectStoreBackend
from .core.config import Config
from .core.errors import (
    ArchiveError,
    CacheError,
    ConfigError,
    DownloadError,
    HandleError,
    HubcacheError,
    IntegrityError,
    LeaseLostError,
    MissingDependencyError,
    OfflineError,
    UnsafeArchiveError,
)
from .core.events import Event
from .core.handles import Handle
from .core.locate import Location
from .core.manifest import Manifest
from .core.store import EntryInfo, EntryWriter, Store
from .plugins.markers import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from .stores.objectstore import ObjectStore, PreconditionFailed

__all__ = [
    # the hook marker
    "hookimpl",
    # backend base classes
    "Backend",
    "CacheBackend",
    "ObjectStoreBackend",
    # the store protocol, and the object-store implementation
    "Store",
    "EntryWriter",
    "EntryInfo",
    "ObjectStore",
    "PreconditionFailed",
    # values hooks and backends receive
    "Config",
    "Handle",
    "Location",
    "Manifest",
    "Event",
    # errors
    "HubcacheError",
    "ConfigError",
    "MissingDependencyError",
    "CacheError",
    "LeaseLostError",
    "HandleError",
    "DownloadError",
    "ArchiveError",
    "UnsafeArchiveError",
    "IntegrityError",
    "OfflineError",
]

#: Names loaded on first use (the object-store protocol is ~1000 lines and a dozen stdlib modules).
_LAZY = {"ObjectStore", "PreconditionFailed"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .stores import objectstore

        value = getattr(objectstore, name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
