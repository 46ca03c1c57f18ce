"""Commit one cache entry: lock, look up, clean up, write, commit (or abort) — the one sequence
every writer of a store goes through (a download in ``core/cache.py``, a copy between tiers in
``core/tiers.py``)."""

from __future__ import annotations

import contextlib
from typing import Callable, Literal, NamedTuple, overload

from .handles import Handle
from .manifest import Manifest
from .store import EntryWriter, Store


class Committed(NamedTuple):
    """What :func:`commit_entry` found or made.

    Attributes:
        path: the entry's path.
        manifest: its manifest.
        new: ``True`` if this call wrote and committed it, ``False`` if another writer's
            committed entry was there (found once the lock was held).
    """

    path: str
    manifest: Manifest
    new: bool


@overload
def commit_entry(store: Store, handle: Handle, fill: Callable[[EntryWriter], Manifest], *,
                 on_wait: Callable[[str], None], wait: Literal[True] = ...,
                 usable: Callable[[Manifest], bool] | None = ...,
                 restart: Callable[[BaseException, int], bool] | None = ...,
                 held: bool = ...) -> Committed: ...


@overload
def commit_entry(store: Store, handle: Handle, fill: Callable[[EntryWriter], Manifest], *,
                 on_wait: Callable[[str], None], wait: bool,
                 usable: Callable[[Manifest], bool] | None = ...,
                 restart: Callable[[BaseException, int], bool] | None = ...,
                 held: bool = ...) -> Committed | str: ...


def commit_entry(store: Store, handle: Handle, fill: Callable[[EntryWriter], Manifest], *,
                 on_wait: Callable[[str], None], wait: bool = True,
                 usable: Callable[[Manifest], bool] | None = None,
                 restart: Callable[[BaseException, int], bool] | None = None,
                 held: bool = False) -> Committed | str:
    """Make ``handle``'s entry in ``store``, unless another writer already has.

    Under the store's lock for the handle's key: look the entry up (a committed one is returned
    as it is), remove what crashed writers left (``store.cleanup``), then fill a fresh writer
    and commit it with the manifest ``fill`` returns. The writer is aborted on any exception.

    Args:
        store: the store to write.
        handle: the handle (its key names the entry, its URL is recorded with it).
        fill: writes the entry's contents into the writer and returns the manifest to commit.
        on_wait: called with the holder's name if this call waits for the lock.
        wait: wait for the lock; if ``False`` and another process holds it, write nothing and
            return why (``"locked by <holder>"``, from :meth:`Store.try_lock`).
        usable: whether a committed entry found under the lock may be returned (``False``:
            it is replaced); default: any.
        restart: called with the exception ``fill`` raised (the writer already aborted) and the
            number of restarts so far; ``True`` fills a fresh writer again, ``False`` re-raises.
            It may raise an exception of its own instead.
        held: the caller already holds ``store``'s lock for the key (taken with
            :meth:`Store.lock` on this very store object): do not take it again.

    Returns:
        A :class:`Committed`, or, only when not waiting, the string saying who holds the lock.

    Raises:
        Whatever ``fill``, the lock or the store raise; nothing is committed then.
    """
    key = handle.key
    held_lock: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext(None)
    with held_lock if held else store.lock(key, on_wait) if wait else store.try_lock(key) as busy:
        if busy is not None:
            return busy
        found = store.lookup(key, handle.url)  # another process may have finished meanwhile
        if found is not None and (usable is None or usable(found[1])):
            return Committed(found[0], found[1], False)
        store.cleanup(key)
        restarts = 0
        while True:
            writer = store.writer(key, handle.url)
            try:
                manifest = fill(writer)
                return Committed(writer.commit(manifest), manifest, True)
            except BaseException as error:
                writer.abort()
                if restart is None or not restart(error, restarts):
                    raise
                restarts += 1
