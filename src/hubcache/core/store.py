"""The cache entry protocol every cache store implements.

A store keeps entries under a root, one per cache key:

- ``<root>/<key>/``: the extracted model (the path ``resolve`` returns);
- ``<root>/<key>.descriptor.txt``: tensorflow_hub's descriptor (who downloaded what, when),
  then hubcache's manifest at its end, only entries with one being trusted, in every store
  (``hubcache.core.entry``).

Writers build an entry privately (an :class:`EntryWriter`) and make it visible with one atomic
commit. Locks only save bandwidth; correctness never depends on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .entry import EntryState
from .errors import HubcacheError
from .manifest import Manifest


@dataclass
class EntryInfo:
    """One entry as listed by a store.

    Attributes:
        key: the cache key.
        path: the entry's path.
        state: ``committed``, ``damaged``, ``in progress`` or ``foreign`` (a tensorflow_hub entry
            not adopted yet); see :data:`hubcache.core.entry.EntryState`.
        manifest: its manifest, when it has a readable one.
        size: bytes on record (manifest) or found.
        last_used: Unix time of the last recorded use, if known.
        handle: the handle it was made for (manifest or descriptor), if known.
    """

    key: str
    path: str
    state: EntryState
    manifest: Manifest | None = None
    size: int = 0
    last_used: float | None = None
    handle: str | None = None


class EntryWriter(ABC):
    """A private, not-yet-visible entry being filled by the extractor."""

    @abstractmethod
    def add_dir(self, path: str) -> None:
        """Create a directory (relative, ``/``-separated, already validated)."""

    @abstractmethod
    def add_file(self, path: str, chunks: Iterable[bytes], executable: bool = False) -> None:
        """Write a regular file from an iterator of byte chunks."""

    @abstractmethod
    def add_symlink(self, path: str, target: str) -> None:
        """Create a symbolic link (the target is validated to stay inside the entry)."""

    @abstractmethod
    def add_hardlink(self, path: str, existing: str) -> None:
        """Make ``path`` a copy of (or hard link to) the already-written file ``existing``."""

    @abstractmethod
    def commit(self, manifest: Manifest) -> str:
        """Make the entry visible atomically and return its path.

        If another writer committed the same key first, keep theirs, discard ours, and return
        the committed path.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written (idempotent; safe after a partial failure)."""


class Store(ABC):
    """Where a cache backend keeps its entries.

    Attributes:
        root: the cache root (a local path or an fsspec URL).
    """

    root: str

    @abstractmethod
    def entry_path(self, key: str) -> str:
        """The path of the entry for ``key`` (whether or not it exists)."""

    @abstractmethod
    def lookup(self, key: str, handle: str) -> tuple[str, Manifest] | None:
        """Return ``(path, manifest)`` of a committed, complete entry, else ``None``.

        Called on every cache miss and once per process on a hit; must not write anything it
        does not own (a read-only cache must work).
        """

    @abstractmethod
    def lock(self, key: str, on_wait: Callable[[str], None]) -> AbstractContextManager[None]:
        """Hold off other writers of ``key`` (bandwidth only). ``on_wait(holder)`` is called once
        if someone else holds it."""

    def lock_live_holder(self, key: str, on_wait: Callable[[str], None],
                         patience: float | None) -> AbstractContextManager[None]:
        """:meth:`lock`, waiting only while the holder shows signs of life: a store that can tell
        (an object store's lease heartbeat) raises :class:`~hubcache.core.errors.CacheError` once
        the holder has been silent for ``patience`` seconds. This default is :meth:`lock`."""
        return self.lock(key, on_wait)

    @contextmanager
    def try_lock(self, key: str) -> Iterator[str | None]:
        """:meth:`lock` without waiting: yields ``None`` while holding it, or, without taking it,
        why not (``"locked by <holder>"``) if another live writer holds it. Never waits.

        This default gives up wherever :meth:`lock` would wait. A store whose lock can be left
        behind by a dead holder (an object store's lease) should override it to take such a lock
        over at once, as its :meth:`guard` does.
        """

        def refuse(holder: str) -> None:
            raise _Held(holder)

        stack = ExitStack()
        try:
            stack.enter_context(self.lock(key, refuse))
        except _Held as held:
            yield f"locked by {held.holder or 'another process'}"
            return
        with stack:
            yield None

    @abstractmethod
    def writer(self, key: str, handle: str) -> EntryWriter:
        """A private writer for a new entry."""

    @abstractmethod
    def cleanup(self, key: str) -> None:
        """Remove what crashed writers of ``key`` left behind (called while holding the lock)."""

    @abstractmethod
    def entries(self) -> Iterator[EntryInfo]:
        """Every entry, committed or not."""

    @abstractmethod
    def remove(self, key: str) -> bool:
        """Remove an entry (manifest first, so it is never seen half-removed). True if it existed."""

    @abstractmethod
    def verify(self, key: str, full: bool = False) -> list[str]:
        """Problems of a committed entry against its manifest (sizes; digests too with ``full``)."""

    def validator(self, path: str, manifest: Manifest) -> Callable[[], bool] | None:
        """A cheap check that a memoised entry still exists (``None``: always valid)."""
        return None

    # -- use tracking and guarded removal (hubcache.stores.usage explains the local scheme) ---------

    def entry(self, key: str) -> EntryInfo | None:
        """The listing of one entry, or ``None`` if the store has nothing for ``key``."""
        return next((e for e in self.entries() if e.key == key), None)

    def read_manifest(self, key: str) -> Manifest | None:
        """The entry's manifest, if it has a readable and safe one (its files unchecked), else
        ``None``. Stores override this with a direct read; the default goes through
        :meth:`entry`."""
        info = self.entry(key)
        return info.manifest if info is not None else None

    def mark_used(self, key: str) -> None:
        """Record that this process uses the entry (called before every lookup of a resolve).

        Stores that can must keep the entry from being removed by :meth:`guard` holders until
        this process exits or calls :meth:`release`, and record the time of use. Default: nothing.
        """

    def release(self, key: str) -> None:
        """Stop protecting an entry this process marked used (e.g. after a prefetch)."""

    def busy(self, key: str) -> str | None:
        """Why the entry must not be removed now (in use, being downloaded), else ``None``.

        A read-only probe: creates and changes nothing (``prune --dry-run`` relies on it).
        """
        return None

    def guard(self, key: str) -> AbstractContextManager[str | None]:
        """Hold off users and writers of ``key`` while removing it.

        Yields ``None`` when the entry may be removed (and keeps it so until the block ends), or
        why not, like :meth:`busy`. Never blocks.
        """
        return nullcontext(None)


class _Held(HubcacheError):
    """Raised from :meth:`Store.try_lock`'s ``on_wait``: someone else holds the lock. A
    :class:`HubcacheError`, so stores that turn other exceptions into a ``CacheError`` let it by."""

    def __init__(self, holder: str):
        super().__init__(f"locked by {holder}")
        self.holder = holder
