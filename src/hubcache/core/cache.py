"""The shared download -> extract -> commit machinery every cache backend uses."""

from __future__ import annotations

import time
from typing import Callable

from .._version import __version__
from ..archive.digest import Meter
from ..archive.extract import Limits, extract
from ..download.fetch import Deadline, open_source
from ..download.parallel import RangeAnswerError, parallel_source
from ..plugins.registry import emit
from .commit import commit_entry
from .config import Config
from .errors import (
    ArchiveError,
    IntegrityError,
    LeaseLostError,
    OfflineError,
    SourceChangedError,
)
from .handles import Handle
from .locate import Location
from .manifest import Manifest
from .pins import check_pin
from .store import EntryWriter, Store


def resolve_in_store(store: Store, handle: Handle, location: Location, config: Config,
                     backend: str = "",
                     on_commit: Callable[[Handle, str, Manifest], None] | None = None) -> tuple[str, Manifest]:
    """Return ``(path, manifest)`` of the handle's entry in ``store``, downloading on a miss.

    The entry is marked used (``store.mark_used``) before it is looked up, so nothing removes it
    between the lookup and the caller's use. ``on_commit(handle, path, manifest)`` runs after
    this call committed a new entry (the backend's hook, e.g. size-budget eviction).

    Raises:
        OfflineError: on a miss in offline mode.
        DownloadError, ArchiveError, IntegrityError, CacheError: as the steps fail; nothing is
            committed then.
    """
    key = handle.key
    store.mark_used(key)
    found = store.lookup(key, handle.url)
    # A pinned handle whose entry has no digest hubcache verified (adopted, copied from another
    # tier) is a miss: downloading verifies the pin and replaces the entry.
    if found is not None and check_pin(handle, found[1], unverified_is_miss=True):
        return found
    if config.offline:
        raise OfflineError("not in the cache, and offline mode is on (HUBCACHE_OFFLINE)",
                           hint=f"run `hubcache prefetch {handle.raw}` while online")

    def on_wait(holder: str) -> None:
        emit("waiting", handle.raw, backend, path=store.entry_path(key), holder=holder)

    for attempt in range(MAX_LEASE_LOSSES + 1):
        try:
            fill, restart = _download(handle, location, config, backend)
            # A pinned entry another process committed meanwhile must vouch for the pin, as above.
            path, manifest, new = commit_entry(
                store, handle, fill, on_wait=on_wait, restart=restart,
                usable=lambda found: check_pin(handle, found, unverified_is_miss=True))
            break
        except LeaseLostError as error:
            # This process stalled past the lease's TTL and another host took the entry over:
            # what we wrote is withdrawn; wait for that host's commit (the lock) and use it.
            if attempt == MAX_LEASE_LOSSES:
                raise
            emit("download_retry", handle.raw, backend, url=location.url, attempt=attempt + 1,
                 error=f"{error.message}; waiting for the new holder's commit", offset=0)
    if not new:
        return path, manifest
    emit("committed", handle.raw, backend, path=path)
    if on_commit is not None:
        on_commit(handle, path, manifest)
    return path, manifest


#: Times a resolve waits for another holder's commit after losing its download lease to it.
MAX_LEASE_LOSSES = 2

#: Downloads from byte 0 again after the file changed on the origin during a download (or a
#: resume could not be shown to continue the same file); one more change fails the resolve.
MAX_RESTARTS = 2


def _download(handle: Handle, location: Location, config: Config, backend: str) -> tuple[
        Callable[[EntryWriter], Manifest], Callable[[BaseException, int], bool]]:
    """The ``fill`` and ``restart`` of one :func:`commit_entry` that downloads ``location``.

    A :class:`SourceChangedError` starts the download again from byte 0 (a fresh writer, digest
    and decoder), at most :data:`MAX_RESTARTS` times. One :class:`Deadline`, started by the
    first download (not while waiting for the lock), bounds all of them. After a
    :class:`RangeAnswerError` (the origin answered a range request wrongly) the restarts use one
    stream.
    """
    deadline: Deadline | None = None
    parallel = True

    def fill(writer: EntryWriter) -> Manifest:
        nonlocal deadline
        if deadline is None:
            deadline = Deadline(config.download_deadline)
        return download_into(writer, handle, location, config, backend, deadline=deadline, parallel=parallel)

    def restart(error: BaseException, restarts: int) -> bool:
        nonlocal parallel
        if not isinstance(error, SourceChangedError):
            return False
        if isinstance(error, RangeAnswerError):
            parallel = False
        if restarts >= MAX_RESTARTS:
            raise SourceChangedError(
                f"{error.message}; the same on each of {restarts + 1} downloads from byte 0, so nothing "
                "was cached", url=error.url, attempts=error.attempts, hint=error.hint) from None
        emit("download_retry", handle.raw, backend, url=location.url, attempt=restarts + 1,
             error=f"{error.message}; downloading it again from the start", offset=0)
        return True

    return fill, restart


def download_into(writer: EntryWriter, handle: Handle, location: Location, config: Config, backend: str = "", *,
                  deadline: Deadline | None = None, parallel: bool = True) -> Manifest:
    """Stream ``location`` into ``writer`` and return the manifest to commit (not yet committed).

    ``parallel``: an http(s) origin that allows it, or an fsspec object (``gs://``, ``s3://``) of
    at least two chunks, is read over ``connections`` (a setting) ranged connections; ``False``
    reads one stream.

    Raises:
        SourceChangedError: the file changed during the download; ``writer`` holds a mix and
            must be aborted (the caller may start again with a fresh one).
    """
    url = location.url
    algorithms = ("sha256",) if handle.pin is None or handle.pin[0] == "sha256" else ("sha256", handle.pin[0])

    def on_retry(attempt: int, error: str, offset: int) -> None:
        emit("download_retry", handle.raw, backend, url=url, attempt=attempt, error=error, offset=offset)

    # The handle's credentials go only to its own host (``url`` shows them as ***).
    timeout, retries = config.timeout, config.retries
    connections = config.connections if parallel else 1
    # An object store's archive goes parallel in open_source (objectread), pinned to one version.
    source = open_source(handle.reveal(url), timeout=timeout, retries=retries, on_retry=on_retry, deadline=deadline,
                         connections=connections, chunk_size=config.chunk_size)
    if connections > 1:  # an http(s) origin that allows it: the rest over ranged connections
        source = parallel_source(source, handle.reveal(url), connections=connections,
                                 chunk_size=config.chunk_size, timeout=timeout,
                                 retries=retries, on_retry=on_retry, deadline=deadline)
    try:
        emit("download_started", handle.raw, backend, url=source.final_url, total=source.total)

        def on_progress(count: int) -> None:
            emit("download_progress", handle.raw, backend, url=url, bytes=count, total=source.total)

        meter = Meter(source, algorithms, on_progress)
        started = time.monotonic()
        limits = Limits(config.max_archive_bytes, config.max_members)
        contents = extract(meter, writer, limits)
        meter.drain()
    finally:
        source.close()
    emit("download_finished", handle.raw, backend, url=source.final_url, bytes=meter.bytes,
         seconds=time.monotonic() - started)
    digests = {name: h.hexdigest() for name, h in meter.hashes.items()}
    if handle.pin is not None and digests[handle.pin[0]] != handle.pin[1]:
        raise IntegrityError(
            f"the archive's {handle.pin[0]} is {digests[handle.pin[0]]}, but the handle pins {handle.pin[1]}",
            hint=f"the file at {source.final_url} is not the pinned one; nothing was cached")
    manifest = contents.manifest(
        handle=handle.url, source=source.final_url,
        archive={"bytes": meter.bytes, "format": contents.format, **digests},
        creator=f"hubcache {__version__}")
    emit("extracted", handle.raw, backend, files=len(manifest.files), bytes=manifest.total_bytes)
    if not manifest.files and not manifest.dirs:
        raise ArchiveError("the archive holds no files")
    return manifest
