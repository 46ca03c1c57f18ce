"""The cache entry protocol on an object store, through any fsspec filesystem (gcsfs, s3fs...).

Nothing here knows which store it talks to; a backend builds the filesystem and hands it over.
Once resolves finish, a bucket holds exactly what tensorflow_hub would put there (the layout of
:mod:`hubcache.core.entry`, the same as on a local disk)::

    <root>/<key>/...              the extracted files, one object each
    <root>/<key>.descriptor.txt   tensorflow_hub's lines, hubcache's, then ``Manifest:`` and the
                                  manifest: created last; its creation is the commit
    <root>/<key>.lock             the download lease, only while a download (or a removal) runs:
                                  deleted by its holder (saves bandwidth; correctness never needs it)

**Commit.** An object store has no rename, so a writer uploads the files straight to their final
names under ``<key>/`` (each upload is atomic: an object appears whole or not at all), lists them
to check that every one arrived, and then *creates* the descriptor, the manifest at its end
(:func:`hubcache.core.entry.descriptor_with_manifest`), with a create-only precondition
(:meth:`ObjectStore.create_object`; gcsfs sends ``ifGenerationMatch=0``, s3fs ``If-None-Match``).
Readers trust only entries whose descriptor holds a valid manifest, so a crash at any point
leaves nothing trusted. A descriptor already there when a writer starts (tensorflow_hub's, a
damaged one) is deleted first, at the version read, so no half-replaced entry looks adoptable.
tensorflow_hub never reads a descriptor, so the manifest costs it nothing.

**Adoption and older entries.** An entry tensorflow_hub wrote (its descriptor, without hubcache's
line) is adopted once its listing is a complete model; its manifest is then recorded in its
descriptor by a conditional replace against the version read (never a blind overwrite). An
entry an older hubcache committed (its descriptor without a manifest, ``<key>.manifest.json``
beside it) is read as it is and rewritten in this layout (the manifest into the descriptor,
conditionally, then the old object deleted at the version read) by the first resolve that gets
the lease without waiting.

**Committed objects are immutable.** Every upload names the version of the object it replaces
(:meth:`ObjectStore.put_versioned`: gcs ``ifGenerationMatch``, S3 ``If-Match``/``If-None-Match``),
and a writer knows only versions it read *before* its last check that the lease is still its own
(:meth:`ObjectStore.confirm_lease`) or wrote itself. A host that took the lease over writes only
after that, so a writer that stalled past its TTL (paused, swapped out) and resumed finds every
write over the new holder's objects refused: it withdraws what it wrote and waits for the new
holder's commit (:class:`~hubcache.core.errors.LeaseLostError`; see :class:`ObjectWriter`). A
crashed writer's leftovers are overwritten by the next one (their versions are in its listing).

**Lease.** ``<key>.lock`` is created with the same precondition and holds its owner, a lease id
and a heartbeat that a thread refreshes every ``max(1, lease_ttl / 3)`` seconds. Every heartbeat is a
*conditional* rewrite (:meth:`ObjectStore.replace_object`): it succeeds only if the lease object is
still the version its holder last wrote (gcs: ``ifGenerationMatch``; S3: ``If-Match`` on the ETag).
A holder that stalled (paused, swapped out, suspended) past the TTL therefore cannot overwrite the
lease of the host that took it over: its rewrite is refused, and it marks its lease lost and stops.
Waiters poll for the committed descriptor; when the lease's contents have not changed for its TTL (as timed
by the waiter's own clock, so hosts' clocks need not agree), or its heartbeat time is older than
its TTL plus a minute of allowed clock skew, a waiter takes it over with the same conditional
rewrite against the version it saw, so exactly one waiter replaces a given dead lease. A lease is
judged by the TTL *its holder* wrote into it (``"ttl"``), not the waiter's ``lease_ttl``: a host
with a shorter setting never steals a live lease. That claim is bounded: at least
:data:`MIN_LEASE_TTL` (3 s), at most ``max(own lease_ttl, MAX_LEASE_TTL)`` (10 min), so a planted
lease cannot hold waiters off for ever.

**Rates.** A heartbeat rewrites the lease at most once per :data:`MIN_HEARTBEAT` second (GCS allows
about one update per second to one object name). Waiters read the descriptor with exponential
backoff and jitter up to :data:`MAX_POLL` (0.25 s, counted from the start of one read to the start of
the next) and the lease about four times per judged TTL.
Waiters that saw a lease die pause at random (up to :data:`TAKEOVER_SPREAD`) and read it again
before rewriting it, so a fleet sends a few takeover attempts, not one per host.

**Removal.** ``prune`` and ``rm`` remove an entry only under :meth:`ObjectStore.guard`, which takes
the entry's lease for the removal: a live lease of another host (a download in progress) keeps the
entry, reported as "being downloaded by <owner>"; only a lease past its TTL is a leftover.

**What others wrote is untrusted.** A bucket is shared: a descriptor read from it is read with a
cap (:data:`MAX_MANIFEST_BYTES`), and the manifest in it passes
:func:`hubcache.core.paths.validate_manifest` (names in normal form inside the entry, link targets
inside it and not through other links) or the entry is damaged: a miss, downloaded again, its
descriptor replaced, while ``ls``, ``verify`` and ``rm`` go on working for it and every other entry.
The listing of an entry tensorflow_hub wrote is checked the same way before it is adopted. The
writer itself refuses any name that is not ``a/b/c`` inside the entry, whoever calls it, so no
object lands at ``<key>/../x`` (an emulator cleans that to ``x``; a reader that maps object names
to paths would write outside the entry).

**What an object store cannot hold.** Empty directories (there are none; the manifest still lists
them). The executable bit. Symbolic and hard links: each is stored as a *copy of the target
file's bytes* (a server-side copy at commit time); a link to a directory, a link loop, or a link
to nothing in the archive is refused with :class:`~hubcache.core.errors.ArchiveError`.

A hit costs one request (the descriptor's GET), writes nothing, and is then memoised per process
by the resolver (:meth:`Store.validator` returns ``None``: objects are not removed behind our back
the way temp cleaners remove local files; ``hubcache verify`` checks an entry against its
manifest). Nothing records uses in a bucket: no object is written per use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Iterator, cast

from ..core import entry as layout
from ..core import paths
from ..core.crc import file_crc32
from ..core.entry import EntryState
from ..core.errors import (
    ArchiveError,
    CacheError,
    HubcacheError,
    LeaseLostError,
    UnsafeArchiveError,
)
from ..core.manifest import FileRecord, Manifest, crc_hex
from ..core.store import EntryInfo, EntryWriter, Store

logger = logging.getLogger("hubcache")

#: Seconds by which hosts' clocks may disagree before a lease's own heartbeat time is trusted.
CLOCK_SKEW = 60.0
#: A holder never rewrites its lease more often than this (GCS allows about one update per
#: second to one object name), whatever its TTL.
MIN_HEARTBEAT = 1.0
#: The shortest TTL a lease is judged by: three heartbeats, so a live holder beating at
#: :data:`MIN_HEARTBEAT` never looks silent for a whole TTL.
MIN_LEASE_TTL = 3 * MIN_HEARTBEAT
#: A holder rewrites its lease at least this often (its TTL permitting less often still within
#: GCS's one update per second), so a waiter learns within seconds whether a holder is alive:
#: a host in a tier chain waits only for a holder whose heartbeat goes on (see
#: :meth:`ObjectStore.lock_live_holder`).
MAX_HEARTBEAT = 2.0
#: Heartbeats a chain host may miss before it stops waiting for the holder.
PEER_PATIENCE_BEATS = 3
#: A lease claiming a longer TTL than this (or than the waiter's own, if longer) is judged by
#: this one: a planted lease saying ``"ttl": 1e9`` must not hold every waiter off for ever.
MAX_LEASE_TTL = 600.0
#: Waiters that saw a lease die wait a random part of up to this many seconds (and of a third
#: of its TTL) before taking it over, so a fleet sends a few takeover rewrites, not one each.
TAKEOVER_SPREAD = 5.0
#: Waiters poll for the commit (the descriptor) with exponential backoff up to this many seconds
#: between the starts of two reads (each step drawn uniformly from the upper half of the current
#: one, so a fleet does not poll in step): a waiting host notices the commit within a quarter of a
#: second and one read, at about 5.3 reads/s of one small object; 256 waiting hosts send about
#: 1,400 reads/s, within a new bucket's read rate (about 5,000/s before it scales up), and an hour
#: of waiting costs a host about 19,000 reads. A fleet of a thousand waiting hosts reaches that
#: rate: the bucket then answers some reads 429, and gcsfs retries them with backoff, which slows
#: those hosts' polls. (At 0.5 s, the sleep after the last read before the
#: commit was most of a fleet's 0.3-0.7 s from the commit to its copies: measured, every waiter's
#: read had queued 3.2 s behind the holder's last uploads and returned just before the commit.)
#: Counted start to start, so a slow read is not followed by a full step more.
MAX_POLL = 0.25
#: The most bytes of small files a writer holds in memory for pending uploads (larger files are
#: spooled to a temp file): at most this / (batch_bytes + small_file) uploads are pending, and
#: never more than two per worker (``HUBCACHE_CONNECTIONS`` workers for the built-in backends).
UPLOAD_BUFFER = 64 << 20
#: The most bytes read of a manifest from a store (a bucket others can write): a larger one is a
#: damaged entry. 64 MiB holds several hundred thousand file records.
MAX_MANIFEST_BYTES = 64 << 20
#: Seconds a commit read by a waiter stands for the lookup that follows its wait (that lookup
#: comes at once; a later one reads the descriptor again).
SEEN_COMMIT_FRESH = 1.0
#: The most bytes read of a lease or a descriptor (a few hundred bytes when hubcache writes them;
#: a larger lease reads as unreadable, i.e. long dead).
MAX_SMALL_OBJECT = 64 << 10
#: Checking a manifest read from the bucket: only its shape (names, targets, kinds) matters here;
#: the size and member limits were applied when the entry was written.
_NO_LIMITS = paths.Limits(max_bytes=1 << 62, max_members=1 << 62)


@dataclass(frozen=True)
class LeaseState:
    """A lease object's contents, as a waiter read them.

    Attributes:
        raw: the bytes (a change means the holder is alive).
        lease: the holder's lease id (``""`` if unreadable).
        owner: who holds it (host and pid).
        time: the holder's wall-clock time of its last heartbeat.
        version: the object's version when read (see :meth:`ObjectStore.read_versioned`).
        ttl: the TTL its holder wrote into it (``0.0`` if none or not a positive number).
    """

    raw: bytes
    lease: str
    owner: str
    time: float
    version: str = ""
    ttl: float = 0.0

    @classmethod
    def parse(cls, raw: bytes, version: str = "") -> LeaseState:
        try:
            data = json.loads(raw)
            ttl = data.get("ttl", 0.0)
            ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) else 0.0
            ttl = ttl if math.isfinite(ttl) and ttl > 0 else 0.0
            when = float(data["time"])
            return cls(raw, str(data["lease"]), layout.printable(str(data["owner"])),
                       when if math.isfinite(when) else 0.0, version, ttl)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return cls(raw, "", "unknown", 0.0, version)  # unreadable: treated as long dead

    def judged_ttl(self, own: float) -> float:
        """The TTL a waiter whose own setting is ``own`` judges this lease by: the one its holder
        wrote (a holder with a longer TTL heartbeats less often), at least :data:`MIN_LEASE_TTL`
        and at most ``max(own, MAX_LEASE_TTL)``; the waiter's own when the lease names none."""
        claimed = self.ttl or own
        return max(MIN_LEASE_TTL, min(claimed, max(own, MAX_LEASE_TTL)))

    def abandoned(self, own: float) -> bool:
        """True if the holder's own heartbeat time is older than the judged TTL plus
        :data:`CLOCK_SKEW` (a clock-based verdict; waiters also time silence themselves)."""
        return time.time() - self.time > self.judged_ttl(own) + CLOCK_SKEW


@dataclass(frozen=True)
class _Descriptor:
    """An entry's descriptor as read from the store, and the manifest found in it.

    Attributes:
        manifest: the manifest, if a valid and safe one was found.
        problem: why what was found is not one (too large, unreadable, unsafe), else ``None``.
        raw: the descriptor's bytes (``None``: there is none).
        version: its version when read (see :meth:`ObjectStore.read_versioned`).
        legacy: an older hubcache's ``<key>.manifest.json`` (bytes and version), when the
            manifest came from there.
    """

    manifest: Manifest | None = None
    problem: str | None = None
    raw: bytes | None = None
    version: str = ""
    legacy: tuple[bytes, str] | None = None


def _whole_descriptor(raw: bytes, version: str) -> _Descriptor:
    """A descriptor read whole (at most ``MAX_MANIFEST_BYTES + 1`` bytes), and the manifest at
    its end, checked (see :meth:`ObjectStore._read_entry`)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        return _Descriptor(raw=raw[:MAX_SMALL_OBJECT], version=version,
                           problem=f"the descriptor is larger than {MAX_MANIFEST_BYTES} bytes")
    embedded = layout.descriptor_manifest(raw)
    if embedded is not None:
        return _Descriptor(*_parse_manifest(embedded), raw=raw, version=version)
    return _Descriptor(raw=raw, version=version)


def _parse_manifest(raw: bytes) -> tuple[Manifest | None, str | None]:
    """``(manifest, None)`` for a readable, safe manifest, else ``(None, why)``."""
    try:
        manifest = Manifest.from_json(raw)
    except ValueError as error:
        return None, f"the manifest is unreadable ({error})"
    try:
        paths.validate_manifest(manifest, _NO_LIMITS)
    except UnsafeArchiveError as error:
        return None, f"the manifest is unsafe: {error.message}"
    return manifest, None


class PreconditionFailed(Exception):
    """A conditional rewrite or delete found the object changed, or gone, since the version given.

    Raised by :meth:`ObjectStore.replace_object` and :meth:`ObjectStore.delete_versioned`. For a
    lease it means another host took the lease over.
    """


class ObjectStore(Store):
    """Cache entries in an object store reached through an fsspec filesystem.

    Args:
        root: the cache root URL, e.g. ``gs://bucket/prefix`` (the bucket must exist).
        fs: the filesystem for ``root`` (gcsfs, s3fs, ...). Listings are re-read each time, so
            its listings cache does no harm, but one without it is cheaper.
        lease_ttl: seconds without a heartbeat after which a waiter takes a lease over.
        lock_timeout: seconds a waiter waits for another writer (whose heartbeat goes on).
        workers: parallel uploads.
        small_file: files up to this size are held in memory and uploaded in batches; larger
            ones are spooled to an (unlinked) local temp file and streamed up.
        batch_bytes: a batch of small files is sent when it holds this many bytes...
        batch_files: ...or this many files.

    Memory stays bounded: at most ``2 * workers`` uploads are pending (and no more than
    :data:`UPLOAD_BUFFER` bytes of them), each at most ``batch_bytes + small_file`` bytes in memory.

    Subclasses for other stores override the primitives (:meth:`create_object` above all); the
    protocol is the same.
    """

    def __init__(self, root: str, fs: Any, *, lease_ttl: float = 30.0, lock_timeout: float = 3600.0,
                 workers: int = 8, small_file: int = 2 << 20, batch_bytes: int = 2 << 20,
                 batch_files: int = 64):
        self.root = root.rstrip("/")
        self.fs = fs
        self.base = fs._strip_protocol(self.root).rstrip("/")
        self.scheme = self.root.split("://", 1)[0] if "://" in self.root else ""
        self.lease_ttl = max(0.1, float(lease_ttl))
        self.lock_timeout = float(lock_timeout)
        self.workers = max(1, int(workers))
        self.small_file = int(small_file)
        self.batch_bytes = int(batch_bytes)
        self.batch_files = int(batch_files)
        self._leases: dict[str, _Lease] = {}  # leases this process holds, by key
        # key -> (when, what): a commit a wait for the lease read, for the lookup right after
        self._seen_commits: dict[str, tuple[float, _Descriptor]] = {}

    # -- the primitives a store for another service may override ------------------------------

    def create_object(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` only if no object exists there.

        This one atomic conditional create is what the commit and the lease rest on. The default
        is ``pipe_file(..., mode="create")``, which gcsfs sends with ``ifGenerationMatch=0``; an
        S3 store overrides it with ``open(path, "xb")`` (s3fs sends ``If-None-Match: *``).

        Raises:
            FileExistsError: if an object is already there.
        """
        self.fs.pipe_file(path, data, mode="create")

    def read_object(self, path: str, limit: int | None = None) -> bytes | None:
        """The object's bytes, or ``None`` if there is none (always a fresh read).

        With ``limit``, at most ``limit + 1`` bytes are read (one ranged request): more than
        ``limit`` means the object is larger, and the caller refuses it. What others wrote into a
        shared bucket is read with a cap, so a planted object of gigabytes costs a few bytes.
        """
        try:
            # cast: fsspec is untyped; cat_file returns the object's bytes.
            if limit is None:
                return cast(bytes, self.fs.cat_file(path))
            try:
                return cast(bytes, self.fs.cat_file(path, start=0, end=limit + 1))
            except FileNotFoundError:
                raise
            except Exception:
                # GCS answers a range on an empty object with 416: only then was the range the problem.
                self.fs.invalidate_cache(path)
                if self.fs.info(path).get("size"):
                    raise
                return b""
        except FileNotFoundError:
            return None

    def write_object(self, path: str, data: bytes) -> None:
        """Write (or overwrite) a small object."""
        self.fs.pipe_file(path, data)

    def put_objects(self, objects: dict[str, bytes]) -> None:
        """Upload a batch of small objects (async filesystems send them concurrently)."""
        self.fs.pipe(objects)

    def put_stream(self, path: str, fileobj: IO[bytes]) -> None:
        """Upload a large object from a local file object, streaming it."""
        with self.fs.open(path, "wb") as out:
            shutil.copyfileobj(fileobj, out, 1 << 20)

    def copy_object(self, source: str, target: str) -> None:
        """Copy an object within the store (server-side where the store can)."""
        self.fs.copy(source, target)

    def list_objects(self, path: str) -> dict[str, int]:
        """Every object under the prefix ``path/``, as ``{path: size}`` (a fresh listing)."""
        return {p: size for p, (size, _) in self.list_versioned(path).items()}

    def list_versioned(self, path: str) -> dict[str, tuple[int, str]]:
        """Every object under the prefix ``path/``, as ``{path: (size, version)}`` (a fresh
        listing; versions as :meth:`version_of` reads them)."""
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        # Only what is under "path/": gcsfs 2024.12's find("x/key"), when nothing is under it,
        # returns the siblings "x/key.lock", "x/key.descriptor.txt"... that share its prefix.
        prefix = path.rstrip("/") + "/"
        return {p: (int(info.get("size") or 0), self.version_of(info)) for p, info in found.items()
                if info.get("type") != "directory" and p.startswith(prefix)}

    def delete_objects(self, paths: Iterable[str]) -> None:
        """Delete objects; those already gone are fine."""
        paths = sorted(set(paths))
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    # The lease's heartbeat and takeover rest on these three. fsspec has no spelling of a
    # conditional overwrite, so the defaults below only emulate one (a version is the SHA-256 of
    # the bytes, compared just before writing: a window of one round trip): a store whose service
    # has a server-side precondition overrides all three, as gcs (ifGenerationMatch) and
    # hubcache-s3 (If-Match) do.

    def read_versioned(self, path: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """The object's bytes and its version, from one read, or ``None`` if there is none.

        A version is an opaque string that changes whenever the object is written (GCS: the
        generation; S3: the ETag); :meth:`replace_object` takes it back. ``limit`` caps the
        bytes read as in :meth:`read_object`.
        """
        data = self.read_object(path, limit)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_object(self, path: str, data: bytes, version: str) -> str:
        """Overwrite ``path`` only if it is still at ``version``; return the new version.

        Raises:
            PreconditionFailed: if the object was written or deleted since (by anyone).
        """
        found = self.read_versioned(path)
        if found is None or found[1] != version:
            raise PreconditionFailed(path)
        self.write_object(path, data)
        return hashlib.sha256(data).hexdigest()

    def delete_versioned(self, path: str, version: str) -> None:
        """Delete ``path`` only if it is still at ``version`` (gone already is fine).

        Raises:
            PreconditionFailed: if the object was written since.
        """
        found = self.read_versioned(path)
        if found is None:
            return
        if found[1] != version:
            raise PreconditionFailed(path)
        self.delete_objects([path])

    # An entry's objects are written under the same preconditions (see ObjectWriter): every
    # upload names the version it expects to replace ("" for none), so a writer that lost its
    # lease can never overwrite an object another writer wrote after it.

    def version_of(self, info: dict[str, Any]) -> str:
        """An object's version from its fsspec info (a listing's or :meth:`stat_version`'s);
        ``""`` if the info names none. Must agree with :meth:`read_versioned` and with what
        :meth:`put_versioned` returns. The default takes the first field the common fsspec
        filesystems fill in; a store for a given service overrides it."""
        for name in ("generation", "ETag", "etag", "checksum", "mtime", "LastModified"):
            if info.get(name):
                return str(info[name])
        return ""

    def stat_version(self, path: str) -> str | None:
        """The object's current version (a fresh metadata read), or ``None`` if there is none."""
        self.fs.invalidate_cache(path)
        try:
            return self.version_of(self.fs.info(path))
        except FileNotFoundError:
            return None

    def put_versioned(self, path: str, data: bytes | IO[bytes], expected: str) -> str:
        """Upload ``data`` (bytes, or a seekable local file to stream) to ``path`` only if the
        object is at version ``expected`` (``""``: only if there is no object); return the new
        version.

        The default only emulates the precondition (a check one round trip before the write,
        and a real create-only write for ``""`` and bytes); a store whose service enforces it
        server-side overrides this, as gcs (``ifGenerationMatch``) and hubcache-s3
        (``If-None-Match``/``If-Match``) do.

        Raises:
            PreconditionFailed: the object is not at ``expected`` (written, created or deleted
                by someone else since).
        """
        if expected == "" and isinstance(data, (bytes, bytearray)):
            try:
                self.create_object(path, bytes(data))
            except FileExistsError:
                raise PreconditionFailed(path) from None
        else:
            if (self.stat_version(path) or "") != expected:
                raise PreconditionFailed(path)
            if isinstance(data, (bytes, bytearray)):
                self.write_object(path, bytes(data))
            else:
                self.put_stream(path, data)
        return self.stat_version(path) or ""

    def put_batch_versioned(self, batch: dict[str, tuple[bytes, str]]) -> dict[str, str | None]:
        """:meth:`put_versioned` for many small objects (``{path: (data, expected)}``); returns
        ``{path: new version}``, ``None`` for each one whose precondition failed. Async
        filesystems override it to send the uploads concurrently."""
        out: dict[str, str | None] = {}
        for path, (data, expected) in batch.items():
            try:
                out[path] = self.put_versioned(path, data, expected)
            except PreconditionFailed:
                out[path] = None
        return out

    def copy_versioned(self, source: str, target: str, expected: str) -> str:
        """:meth:`copy_object` to ``target`` only if it is at version ``expected`` (``""``: only
        if there is none); return the target's new version. The default emulates the
        precondition (a check just before the copy).

        Raises:
            PreconditionFailed: the target is not at ``expected``.
        """
        if (self.stat_version(target) or "") != expected:
            raise PreconditionFailed(target)
        self.copy_object(source, target)
        return self.stat_version(target) or ""

    # -- paths ----------------------------------------------------------------------------------

    def object_path(self, name: str) -> str:
        """The filesystem path of ``<root>/<name>``."""
        return f"{self.base}/{name}"

    def url(self, path: str) -> str:
        """The URL of a filesystem path."""
        return f"{self.scheme}://{path}" if self.scheme else path

    def entry_path(self, key: str) -> str:
        return f"{self.root}/{key}"

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn a store failure into a one-line :class:`CacheError`."""
        try:
            yield
        except (HubcacheError, FileExistsError):
            raise
        except FileNotFoundError as error:
            raise CacheError(f"{what}: not found ({error})",
                             hint=f"check that the bucket of {self.root} exists") from None
        except PermissionError as error:
            raise CacheError(f"{what}: permission denied ({error})",
                             hint="check the credentials, or choose another cache dir") from None
        except Exception as error:
            raise CacheError(f"{what}: {type(error).__name__}: {error}") from None

    # -- reading --------------------------------------------------------------------------------

    def descriptor_path(self, key: str) -> str:
        """The filesystem path of ``<root>/<key>.descriptor.txt`` (the commit)."""
        return self.object_path(layout.descriptor_name(key))

    def legacy_manifest_path(self, key: str) -> str:
        """Where an older hubcache kept the manifest: ``<root>/<key>.manifest.json``."""
        return self.object_path(layout.manifest_name(key))

    def read_manifest(self, key: str) -> Manifest | None:
        """The entry's manifest, or ``None`` if it has none, or one that is unreadable or unsafe."""
        return self._read_entry(key).manifest

    def _load_manifest(self, key: str) -> tuple[Manifest | None, str | None]:
        """``(manifest, None)``; ``(None, None)`` if there is no manifest; ``(None, why)`` if the
        descriptor is too large or holds something that is not a manifest, or not a safe one."""
        found = self._read_entry(key)
        return found.manifest, found.problem

    def _read_entry(self, key: str, legacy: bool = True) -> _Descriptor:
        """Read the entry's descriptor (one request) and the manifest at its end; an older
        hubcache's ``<key>.manifest.json`` only when the descriptor holds none (``legacy``:
        look for it at all; a listing tells whether it is there).

        The bucket is written by others: the descriptor is read with a cap, and its manifest is
        checked as an archive's members are (:func:`hubcache.core.paths.validate_manifest`):
        names in normal form and inside the entry, link targets inside it and not through other
        links, no name twice.
        """
        found = self.read_versioned(self.descriptor_path(key), MAX_MANIFEST_BYTES)
        if found is None:
            return _Descriptor()
        raw, version = found
        read = _whole_descriptor(raw, version)
        if read.problem is not None or read.manifest is not None or not legacy:
            return read
        old = self.read_versioned(self.legacy_manifest_path(key), MAX_MANIFEST_BYTES)
        if old is None:
            return _Descriptor(raw=raw, version=version)
        if len(old[0]) > MAX_MANIFEST_BYTES:
            return _Descriptor(raw=raw, version=version, legacy=old,
                               problem=f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        return _Descriptor(*_parse_manifest(old[0]), raw=raw, version=version, legacy=old)

    def lookup(self, key: str, handle: str) -> tuple[str, Manifest] | None:
        with self._io(f"reading the cache at {self.root}"):
            seen = self._seen_commits.pop(key, None)
            if seen is not None and time.monotonic() - seen[0] < SEEN_COMMIT_FRESH:
                found = seen[1]  # the commit a wait for the lease just read
            else:
                found = self._read_entry(key)
            if found.manifest is None:
                if found.problem is None and layout.written_by_tensorflow_hub(found.raw):
                    return self._adopt(key, handle, found)
                return None
        if found.legacy is not None:
            self._migrate(key, found)
        return self.entry_path(key), found.manifest

    def _relative(self, key: str, listing: dict[str, int]) -> dict[str, int]:
        prefix = self.object_path(key) + "/"
        return {p[len(prefix):]: size for p, size in listing.items() if p.startswith(prefix)}

    def _adopt(self, key: str, handle: str, found: _Descriptor) -> tuple[str, Manifest] | None:
        """Adopt a complete entry tensorflow_hub wrote (its descriptor and objects, no manifest),
        and record the manifest in its descriptor, replaced only if still the version judged."""
        files = self._relative(key, self.list_objects(self.object_path(key)))
        if layout.model_dir_problems(files):
            return None
        # CRC-32s are left empty: computing them would download the whole model.
        manifest = Manifest(handle=handle, files=[FileRecord(p, s, "") for p, s in sorted(files.items())],
                            creator="adopted from tensorflow_hub")
        try:  # object names are anyone's: "<key>/../x" or "<key>/a//b" make no entry of ours
            paths.validate_manifest(manifest, _NO_LIMITS, what="object of the tensorflow_hub entry")
        except UnsafeArchiveError as error:
            logger.warning("not adopting %s: %s", self.entry_path(key), error.message)
            return None
        ours = layout.descriptor_with_manifest(layout.rewritten_head(found.raw, handle), manifest.to_json())
        try:  # read-only, or rewritten meanwhile (tensorflow_hub, another adopter): still a hit
            self.replace_object(self.descriptor_path(key), ours, found.version)
        except Exception as error:
            logger.debug("not recording the manifest of %s: %s", self.entry_path(key), error)
        return self.entry_path(key), manifest

    def _migrate(self, key: str, found: _Descriptor) -> None:
        """Rewrite an entry an older hubcache committed (its manifest in ``<key>.manifest.json``)
        in this layout: the manifest into the descriptor, replaced only if still the version
        read, then the old object deleted only if still the version read. Once, by the first
        resolve that gets the lease without waiting; any failure (a read-only bucket) leaves the
        entry as it is, still a hit."""
        try:
            with self.guard(key) as busy:
                if busy is not None:
                    return
                now = self._read_entry(key)
                if (now.manifest is None or now.legacy is None or now.version != found.version
                        or now.legacy != found.legacy):
                    return  # changed meanwhile: whoever changed it owns it
                raw, version = now.legacy
                self.replace_object(self.descriptor_path(key),
                                    layout.descriptor_with_manifest(
                                        layout.rewritten_head(now.raw, now.manifest.handle), raw),
                                    now.version)
                self.delete_versioned(self.legacy_manifest_path(key), version)
        except Exception as error:
            logger.info("could not rewrite %s in the current layout: %s", self.entry_path(key), error)

    def check(self, files: dict[str, int], manifest: Manifest) -> list[str]:
        """Compare an entry's objects (relative path -> size) with its manifest."""
        problems: list[str] = []
        for record in manifest.files:
            problem = layout.size_problem(record.path, files.get(record.path), record.size)
            if problem is not None:
                problems.append(problem)
        problems += [f"link copy {link} is missing" for link in manifest.symlinks if link not in files]
        return problems

    # -- the lease --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        with self.lock_live_holder(key, on_wait, patience=None):
            yield

    @contextlib.contextmanager
    def lock_live_holder(self, key: str, on_wait: Callable[[str], None],
                         patience: float | None) -> Iterator[None]:
        """:meth:`lock`, but wait only while the holder's heartbeat goes on: if its lease object
        has not changed for ``patience`` seconds, give up with :class:`CacheError` instead of
        waiting for the lease to be judged dead (up to :data:`MAX_LEASE_TTL` for a lease that
        claims a long TTL). For a host with another place to put the model (a tier chain's local
        tier): a lease planted in the bucket then costs it ``patience`` seconds, not minutes.
        A lease this host has seen change is a live holder's, and a silence of up to this host's
        own lease TTL is waited out (a heartbeat can be late when the bucket or the holder is
        busy). ``None``: as :meth:`lock`."""
        with self._io(f"taking the download lease in {self.root}"):
            lease = self._acquire(key, on_wait, patience)
        if lease is not None:
            self._leases[key] = lease
        try:
            yield
        finally:
            if lease is not None:
                self._leases.pop(key, None)
                lease.release()

    def lease_lost(self, key: str) -> bool:
        """True if this process's lease on ``key`` was taken over by another host meanwhile."""
        lease = self._leases.get(key)
        return lease is not None and lease.lost

    def confirm_lease(self, key: str) -> None:
        """Check (one read of the lease object) that the lease this process holds on ``key`` is
        still its own; nothing to check when it holds none (a writer used without :meth:`lock`).

        A writer calls it *after* learning the versions its uploads will be conditional on: a
        version read before a successful check cannot be one that a later holder wrote (a holder
        writes only after taking the lease over), so those uploads never overwrite its objects.

        Raises:
            LeaseLostError: another host took the lease over (this one stalled past its TTL).
        """
        lease = self._leases.get(key)
        if lease is None:
            return
        if not lease.lost:
            state = self._read_lease(key)
            if state is not None and state.lease == lease.id:
                return
            lease.lost = True
        state = self._read_lease(key)
        raise LeaseLostError(
            f"the download lease of {self.entry_path(key)} was taken over by "
            f"{state.owner if state is not None else 'another host'} while this process was writing "
            "(it stalled past the lease's TTL); what it wrote is withdrawn",
            hint="nothing to do: the new holder commits the entry (raise HUBCACHE_LEASE_TTL if this "
                 "host often stalls that long)")

    def _lease_path(self, key: str) -> str:
        return self.object_path(key + layout.LOCK_SUFFIX)

    def _try_create_lease(self, key: str) -> _Lease | None:
        lease = _Lease(self, self._lease_path(key))
        payload = lease.payload()
        try:
            self.create_object(lease.path, payload)
        except FileExistsError:
            return None
        lease.last = payload
        # The version the first heartbeat is conditional on: read back, and ours only if the
        # bytes are ours (create_object does not return one; this costs one read per lease).
        try:
            found = self.read_versioned(lease.path, MAX_SMALL_OBJECT)
        except Exception:  # a transient error: the heartbeat reads it again
            found = (payload, "")
        if found is None or found[0] != payload:
            return None  # taken over or released within a round trip: not ours to hold
        lease.version = found[1]
        lease.start()
        return lease

    def _read_lease(self, key: str) -> LeaseState | None:
        found = self.read_versioned(self._lease_path(key), MAX_SMALL_OBJECT)
        return None if found is None else LeaseState.parse(*found)

    def _acquire(self, key: str, on_wait: Callable[[str], None], patience: float | None = None) -> _Lease | None:
        """Take the lease of ``key``; ``None`` when the entry got committed while we waited.

        A waiter reads the descriptor with exponential backoff and jitter (up to :data:`MAX_POLL`)
        and the lease about four times per TTL it judges the lease by (the holder's, see
        :meth:`LeaseState.judged_ttl`), never more than once per poll.
        """
        lease = self._try_create_lease(key)
        if lease is not None:
            return lease
        step = 0.1
        deadline = time.monotonic() + self.lock_timeout
        judged: list[str] = []  # the descriptor version last judged not to be a commit
        seen: bytes | None = None
        seen_at = time.monotonic()
        beating = False  # the lease was seen to change while this host waited
        state: LeaseState | None = None
        read_at = -math.inf
        waited = False
        while True:
            polled = time.monotonic()
            if self._committed(key, judged):
                return None  # committed by the holder: the caller's lookup finds it
            now = time.monotonic()
            ttl = state.judged_ttl(self.lease_ttl) if state is not None else MIN_LEASE_TTL
            # With patience, often enough to see each heartbeat of a holder configured as we are.
            every = ttl / 4 if patience is None else min(ttl / 4, patience / (PEER_PATIENCE_BEATS + 1))
            if now - read_at >= every:
                state, read_at = self._read_lease(key), now
                if state is None:  # released (the holder failed?): try to become the holder
                    lease = self._try_create_lease(key)
                    if lease is not None:
                        return lease
                    read_at = -math.inf
                    continue
                if not waited:
                    waited = True
                    on_wait(state.owner)
                if state.raw != seen:
                    beating = beating or seen is not None
                    seen, seen_at = state.raw, now
                ttl = state.judged_ttl(self.lease_ttl)
                silent = now - seen_at
                # Patience is for a lease never seen to beat (planted, or its holder gone before
                # this host came). A holder seen beating is alive, and a late heartbeat is a slow
                # bucket or a busy host (measured: one rewrite took 8.5 s while its host
                # uploaded 1 GiB to the emulator, and four hosts of a fleet downloaded too): it
                # is waited for up to this host's own TTL, whatever TTL its lease claims.
                limit = None if patience is None else patience if not beating else max(patience, self.lease_ttl)
                if limit is not None and silent > limit and not state.abandoned(self.lease_ttl):
                    raise CacheError(f"the download lease of {self.entry_path(key)} is held by {state.owner}, "
                                     f"whose heartbeat stopped {silent:.0f} s ago",
                                     hint="it is taken over once its TTL has passed")
                if silent > ttl or state.abandoned(self.lease_ttl):
                    lease = self._take_over_spread(key, state, ttl)
                    if lease is not None:
                        logger.info("took over the lease of %s from %s (no heartbeat for %.1f s)",
                                    self.entry_path(key), state.owner, silent)
                        return lease
                    read_at = -math.inf  # rewritten meanwhile: read it again next time
            if now > deadline:
                raise CacheError(f"another process has held the download lease for over "
                                 f"{self.lock_timeout:.0f} s ({state.owner if state else 'unknown'})",
                                 hint="raise HUBCACHE_LOCK_TIMEOUT or try again later")
            # The step runs from this poll's start: a slow read (a busy bucket) is not followed
            # by a full step more before the next.
            time.sleep(max(0.0, polled + random.uniform(step / 2, step) - time.monotonic()))
            step = min(MAX_POLL, step * 2)

    def _committed(self, key: str, judged: list[str]) -> bool:
        """Whether the descriptor of ``key`` now holds a valid manifest (a waiter's poll).

        A poll reads the descriptor's head (capped at :data:`MAX_SMALL_OBJECT`); only when it
        has a ``Manifest:`` line and a version not judged before is the whole manifest read and
        checked, so a damaged descriptor left from before does not end every wait at once.
        ``judged`` holds the last version found not to be a commit.
        """
        found = self.read_versioned(self.descriptor_path(key), MAX_SMALL_OBJECT)
        if found is None or layout.descriptor_manifest(found[0]) is None or found[1] in judged:
            return False
        # A descriptor no longer than the cap was read whole (most are): no second read.
        read = _whole_descriptor(*found) if len(found[0]) <= MAX_SMALL_OBJECT else self._read_entry(key, legacy=False)
        if read.manifest is not None:
            # The caller's lookup comes next and takes this read instead of making its own: a
            # waiting host starts its copy a round trip or two sooner after the commit.
            self._seen_commits[key] = (time.monotonic(), read)
            return True
        judged[:] = [found[1]]
        return False

    def _take_over_spread(self, key: str, stale: LeaseState, ttl: float) -> _Lease | None:
        """:meth:`_take_over` after a random pause of up to ``min(ttl / 3, 5)`` seconds and a
        fresh read: of a fleet of waiters that saw the same lease die, the first to wake takes it
        over and the others see its new lease, so the dead lease gets a few rewrite attempts,
        not one per waiter (GCS allows about one update per second to one object name)."""
        time.sleep(random.uniform(0, min(ttl / 3, TAKEOVER_SPREAD)))
        fresh = self._read_lease(key)
        if fresh is None or fresh.version != stale.version or fresh.raw != stale.raw:
            return None  # taken over by another waiter, released, or alive after all
        return self._take_over(key, stale)

    def _take_over(self, key: str, stale: LeaseState) -> _Lease | None:
        """Replace a dead lease with ours, on the condition that it is still the version we saw
        die: of several waiters, exactly one succeeds; a holder that came back meanwhile wins."""
        lease = _Lease(self, self._lease_path(key))
        lease.last = lease.payload()
        try:
            lease.version = self.replace_object(lease.path, lease.last, stale.version)
        except (PreconditionFailed, FileNotFoundError):
            return None  # rewritten (alive after all, or another waiter took it) or released
        lease.start()
        return lease

    def _lease_alive(self, key: str) -> bool:
        """True unless the lease's own heartbeat time says it was abandoned (clock skew allowed)."""
        return self._live_lease(key) is not None

    def _live_lease(self, key: str) -> LeaseState | None:
        """The lease of ``key`` if another holder's lease is there and not abandoned (judged by
        the TTL its holder wrote, see :meth:`LeaseState.judged_ttl`), else ``None``."""
        if key in self._leases:
            return None  # ours (a guard of this process): no download of someone else
        state = self._read_lease(key)
        return state if state is not None and not state.abandoned(self.lease_ttl) else None

    def busy(self, key: str) -> str | None:
        """``being downloaded by <owner>`` while a live lease of another process is on ``key``.

        One read of the lease object; creates nothing. A lease past its TTL (plus clock skew) is a
        leftover and says nothing.
        """
        with self._io(f"reading the download lease in {self.root}"):
            state = self._live_lease(key)
        return None if state is None else f"being downloaded by {state.owner}"

    @contextlib.contextmanager
    def guard(self, key: str) -> Iterator[str | None]:
        """Take the entry's lease for the removal, so no download starts meanwhile; yield why not
        if a live lease is there (see :meth:`busy`). A dead lease is taken over (conditionally:
        of several hosts pruning, one wins). Never waits."""
        reason = None
        with self._io(f"taking the download lease in {self.root}"):
            lease = self._try_create_lease(key)
            if lease is None:
                state = self._read_lease(key)
                if state is None:
                    lease = self._try_create_lease(key)
                elif state.abandoned(self.lease_ttl):
                    lease = self._take_over(key, state)
                if lease is None:
                    state = self._read_lease(key)
                    reason = f"being downloaded by {state.owner if state is not None else 'another process'}"
        if lease is None:
            yield reason
            return
        self._leases[key] = lease
        try:
            yield None
        finally:
            self._leases.pop(key, None)
            lease.release()

    # The base declares its @contextmanager's own type; any context manager yielding the same
    # (None held, or why not) is what callers use.
    def try_lock(self, key: str) -> contextlib.AbstractContextManager[str | None]:  # type: ignore[override]
        """The lease without waiting: exactly :meth:`guard` (a dead lease is taken over; a live
        one's holder is named and nothing is taken)."""
        return self.guard(key)

    # -- writing ----------------------------------------------------------------------------------

    def writer(self, key: str, handle: str) -> ObjectWriter:
        return ObjectWriter(self, key, handle)

    def cleanup(self, key: str) -> None:
        """Nothing to do before a new download.

        A crashed writer leaves objects under ``<key>/`` but no manifest; the new writer
        overwrites them (and prunes any the new archive does not have, after its commit).
        Deleting them here instead could pull files from under a writer whose lease was taken
        over while it was still alive; its commit would then check out short.
        """

    # -- listing and maintenance ------------------------------------------------------------------

    def entries(self) -> Iterator[EntryInfo]:
        with self._io(f"listing {self.root}"):
            listing = self.list_objects(self.base)
            files: dict[str, dict[str, int]] = {}
            names: dict[str, set[str]] = {}
            prefix = self.base + "/"
            for path, size in listing.items():
                name = path[len(prefix):] if path.startswith(prefix) else path
                head, sep, rest = name.partition("/")
                if sep:
                    if layout.is_key(head):
                        files.setdefault(head, {})[rest] = size
                        names.setdefault(head, set())
                    continue
                key, dot, suffix = name.partition(".")
                if layout.is_key(key):
                    names.setdefault(key, set()).add(dot + suffix)
                    files.setdefault(key, {})
            infos = [self._info(key, files[key], names[key]) for key in sorted(names)]
        yield from (info for info in infos if info is not None)

    def _info(self, key: str, files: dict[str, int], names: set[str]) -> EntryInfo | None:
        found = (self._read_entry(key, legacy=layout.MANIFEST_SUFFIX in names)
                 if layout.DESCRIPTOR_SUFFIX in names else _Descriptor())
        manifest, bad = found.manifest, found.problem
        path = self.entry_path(key)
        handle = manifest.handle if manifest else None
        state: EntryState
        if manifest is not None and not self.check(files, manifest):
            state = "committed"
        elif manifest is None and layout.LOCK_SUFFIX in names and self._lease_alive(key):
            state = "in progress"
        elif (manifest is None and bad is None and files and layout.written_by_tensorflow_hub(found.raw)
              and not layout.model_dir_problems(files)):
            state = "foreign"
        elif files or manifest is not None or bad is not None or layout.MANIFEST_SUFFIX in names:
            state = "damaged"
        else:
            return None  # only a descriptor or lease debris
        if handle is None and found.raw is not None:
            handle = layout.descriptor_module(found.raw[:MAX_SMALL_OBJECT])
        size = manifest.total_bytes if manifest else sum(files.values())
        return EntryInfo(key, path, state, manifest, size, None, handle)

    def remove(self, key: str) -> bool:
        with self._io(f"removing {self.entry_path(key)}"):
            commits = [self.legacy_manifest_path(key), self.descriptor_path(key)]
            existed = any(self.read_object(p, 0) is not None for p in commits)
            # First (an older hubcache's manifest before the descriptor, which an older hubcache
            # does not read): the entry is never seen half-removed.
            for commit in commits:
                self.delete_objects([commit])
            objects = self.list_objects(self.object_path(key))
            existed = existed or bool(objects)
            # The lease goes too, unless this process holds it (a guard; its release deletes it).
            lease = [] if key in self._leases else [self._lease_path(key)]
            self.delete_objects([*objects, *lease])
        return existed

    def verify(self, key: str, full: bool = False) -> list[str]:
        with self._io(f"verifying {self.entry_path(key)}"):
            manifest, bad = self._load_manifest(key)
            if manifest is None:
                return [bad or "no manifest (not committed)"]
            files = self._relative(key, self.list_objects(self.object_path(key)))
            problems = self.check(files, manifest)
            if full:
                damaged = {p.split(" ", 1)[0] for p in problems}
                for record in manifest.files:
                    if record.crc32 and record.path not in damaged:
                        with self.fs.open(f"{self.object_path(key)}/{record.path}", "rb") as f:
                            crc = file_crc32(f)[0]
                        if crc_hex(crc) != record.crc32:
                            problems.append(f"{record.path} has CRC-32 {crc_hex(crc)}, expected {record.crc32}")
        return problems


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def heartbeat_interval(ttl: float) -> float:
    """Seconds between a holder's heartbeats: a third of its TTL, within :data:`MIN_HEARTBEAT`
    and :data:`MAX_HEARTBEAT`."""
    return max(MIN_HEARTBEAT, min(ttl / 3, MAX_HEARTBEAT))


class _Lease:
    """A lease this process holds, and the thread that keeps its heartbeat going."""

    def __init__(self, store: ObjectStore, path: str):
        self.store = store
        self.path = path
        self.id = uuid.uuid4().hex
        self.owner = _owner()
        self.beat = 0
        self.lost = False
        self.version = ""  # the version of the lease object this holder last wrote ("": unknown)
        self.last = b""  # the bytes it last wrote
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self) -> bytes:
        self.beat += 1
        return json.dumps({"owner": self.owner, "lease": self.id, "beat": self.beat, "time": time.time(),
                           "ttl": self.store.lease_ttl}).encode()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hubcache-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = heartbeat_interval(self.store.lease_ttl)
        while not self._stop.wait(interval):
            payload = self.payload()
            if self.version:
                try:
                    self.version = self.store.replace_object(self.path, payload, self.version)
                    self.last = payload
                    continue
                except PreconditionFailed:
                    pass
                except Exception:  # a transient store error: the next beat tries again
                    logger.debug("heartbeat of %s failed", self.path, exc_info=True)
                    continue
            held = self._still_ours(payload, self.last)
            if held is False:
                # Taken over: the download goes on (correctness does not need the lease).
                self.lost = True
                logger.warning("the download lease %s was taken over", self.path)
                return

    def _still_ours(self, *written: bytes) -> bool | None:
        """After a refused rewrite (or when the version of our creation is unknown): whether the
        lease object holds bytes this holder wrote (a retried request whose first attempt landed);
        if so, its version becomes ours. ``None`` if it could not be read (try again next beat)."""
        try:
            found = self.store.read_versioned(self.path, MAX_SMALL_OBJECT)
        except Exception:
            logger.debug("reading the lease %s failed", self.path, exc_info=True)
            return None
        if found is None or found[0] not in written:
            return False
        self.last, self.version = found
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.store.lease_ttl))
        if self.lost:
            return
        if not self.version and not self._still_ours(self.last):
            return  # the version of our creation is unknown and the lease is not (readably) ours
        with contextlib.suppress(Exception):  # PreconditionFailed: another host's lease now
            self.store.delete_versioned(self.path, self.version)


#: Times an upload refused by its precondition is tried again (after learning the object's new
#: version and checking the lease is still ours) before the commit gives up.
MAX_CONFLICTS = 3


def _same_contents(raw: bytes, ours: Manifest) -> bool:
    """Whether the descriptor ``raw`` (read from the store) holds a safe manifest describing the
    same files, folders and links as ``ours`` (a racing writer's commit of the same archive)."""
    embedded = layout.descriptor_manifest(raw)
    if embedded is None:
        return False
    try:
        theirs = Manifest.from_json(embedded)
        paths.validate_manifest(theirs, _NO_LIMITS)
    except (ValueError, RecursionError, UnsafeArchiveError):
        return False
    return ([(f.path, f.size, f.crc32) for f in theirs.files] == [(f.path, f.size, f.crc32) for f in ours.files]
            and theirs.symlinks == ours.symlinks and sorted(theirs.dirs) == sorted(ours.dirs))


class ObjectWriter(EntryWriter):
    """Uploads an entry's files in parallel to their final names; the manifest, created last,
    commits them (see the module docstring).

    **Committed objects are immutable.** Every upload is conditional on the version of the object
    it replaces (:meth:`ObjectStore.put_versioned`; ``""``: create only). The writer knows a
    version only from (a) its listing of the entry taken when it starts, *before* it checks that
    its lease is still its own (:meth:`ObjectStore.confirm_lease`), (b) its own uploads, or (c)
    an object's version read after a refused upload, again before the lease check. A later
    holder writes only after taking the lease over, i.e. after those checks, so every version it
    writes is unknown to this writer, and this writer's uploads over its objects are refused.
    A writer that stalled past its TTL (paused, swapped out) therefore finds its uploads refused
    when it resumes, learns it lost the lease, withdraws what it wrote (each object only at the
    version it wrote) and raises :class:`~hubcache.core.errors.LeaseLostError`; the resolver
    then waits for the new holder's commit.
    """

    def __init__(self, store: ObjectStore, key: str, handle: str):
        self.store = store
        self.key = key
        self.handle = handle
        self.prefix = store.object_path(key)
        self._pool = ThreadPoolExecutor(max_workers=store.workers, thread_name_prefix="hubcache-upload")
        # Pending uploads: two per worker, but never more than UPLOAD_BUFFER of batches in memory.
        per_upload = store.batch_bytes + store.small_file
        self._slots = threading.BoundedSemaphore(max(2, min(2 * store.workers, UPLOAD_BUFFER // per_upload)))
        self._pending: list[Future[None]] = []
        self._batch: dict[str, bytes] = {}
        self._batch_bytes = 0
        self._files: dict[str, int] = {}  # relative path -> size, regular files
        self._links: dict[str, str] = {}  # relative path -> the (relative) path it links to
        self._versions: dict[str, str] = {}  # object path -> its version as this writer knows it
        self._written: dict[str, str] = {}  # object path -> the version this writer wrote
        self._versions_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._committed = False

    # -- versions and the lease ---------------------------------------------------------------

    def _start(self) -> None:
        """Learn the versions of what the entry holds now (a crashed writer's leftovers), then
        check the lease is still ours; see the class docstring for why in this order."""
        if self._started:
            return
        store = self.store
        with store._io(f"reading {store.entry_path(self.key)}"):
            versions = {p: v for p, (_, v) in store.list_versioned(self.prefix).items()}
            # What commits an entry (the descriptor, an older hubcache's manifest) goes first:
            # no reader trusts or adopts a mix of old objects and ours while they are replaced.
            stale = [store.legacy_manifest_path(self.key), store.descriptor_path(self.key)]
            for path in stale[::-1]:
                found = store.stat_version(path)
                if found is None:
                    break  # an older hubcache's manifest is only ever beside a descriptor
                versions[path] = found
            store.confirm_lease(self.key)
        self._versions = versions
        self._started = True
        with store._io(f"uncommitting {store.entry_path(self.key)}"):
            for path in stale:
                self._delete(path)

    def _delete(self, target: str) -> None:
        """Delete ``target`` at the version this writer knows (nothing if none), again after each
        refusal (:meth:`_conflict` learns the new version, or raises if the lease is lost), at
        most :data:`MAX_CONFLICTS` times."""
        for _ in range(MAX_CONFLICTS):
            expected = self._expected(target)
            if not expected:
                return
            try:
                self.store.delete_versioned(target, expected)
            except PreconditionFailed:
                self._conflict(target)
                continue
            with self._versions_lock:
                self._versions[target] = ""
            return
        raise CacheError(f"{self.store.url(target)} was rewritten by another writer on each of "
                         f"{MAX_CONFLICTS} deletes", hint="try again")

    def _expected(self, target: str) -> str:
        with self._versions_lock:
            return self._versions.get(target, "")

    def _wrote(self, target: str, version: str) -> None:
        with self._versions_lock:
            self._versions[target] = self._written[target] = version

    def _conflict(self, target: str) -> None:
        """An upload to ``target`` was refused: learn the object's version now, *then* check the
        lease is still ours. If it is, the object is a leftover of a writer that lost the lease
        (or a retried request of ours), ours to replace; if not, :class:`LeaseLostError`."""
        version = self.store.stat_version(target)
        self.store.confirm_lease(self.key)
        with self._versions_lock:
            self._versions[target] = version or ""

    def _write(self, target: str, write: Callable[[str], str], what: str) -> None:
        """``write(expected version) -> new version`` for ``target``, again after each refusal
        (:meth:`_conflict` learns the new version, or raises if the lease is lost), at most
        :data:`MAX_CONFLICTS` times."""
        for _ in range(MAX_CONFLICTS):
            try:
                self._wrote(target, write(self._expected(target)))
                return
            except PreconditionFailed:
                self._conflict(target)
        raise CacheError(f"{self.store.url(target)} was rewritten by another writer on each of "
                         f"{MAX_CONFLICTS} {what}", hint="try again")

    def _put(self, target: str, data: bytes | IO[bytes]) -> None:
        def upload(expected: str) -> str:
            if not isinstance(data, (bytes, bytearray)):
                data.seek(0)
            return self.store.put_versioned(target, data, expected)

        self._write(target, upload, "uploads")

    def _put_batch(self, batch: dict[str, bytes]) -> None:
        results = self.store.put_batch_versioned({t: (d, self._expected(t)) for t, d in batch.items()})
        for target, data in batch.items():
            version = results.get(target)
            if version is None:
                self._conflict(target)
                self._put(target, data)
            else:
                self._wrote(target, version)

    def _copy(self, source: str, target: str) -> None:
        self._write(target, lambda expected: self.store.copy_versioned(source, target, expected), "copies")

    # -- the upload pipeline ------------------------------------------------------------------

    def _check_failed(self) -> None:
        still = []
        with self.store._io(f"uploading to {self.store.entry_path(self.key)}"):
            for future in self._pending:
                if future.done():
                    future.result()  # raises the upload's error
                else:
                    still.append(future)
        self._pending = still

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._check_failed()
        if self.store.lease_lost(self.key):
            self.store.confirm_lease(self.key)  # raises: the heartbeat saw it taken over
        self._slots.acquire()  # bounds memory (batches) and local disk (spooled files)
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._pending.append(future)

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, {}, 0
            self._submit(self._put_batch, batch)

    def _wait(self) -> None:
        with self.store._io(f"uploading to {self.store.entry_path(self.key)}"):
            for future in self._pending:
                future.result()
        self._pending = []

    def _upload_spooled(self, path: str, spool: IO[bytes]) -> None:
        with spool:
            self._put(path, spool)

    def _checked(self, path: str) -> str:
        """``path`` if it is a name inside the entry in normal form (``a/b/c``), else refused.

        Whoever calls the writer (the extractor, a copy between tiers, a plugin), nothing is
        uploaded under a name the store's readers could take for a path outside the entry:
        ``<key>/../x``, ``<key>//x``, ``<key>/./x`` and ``<key>/a\\b`` are all legal object names.
        """
        if not isinstance(path, str) or paths.member_path(path, what="entry member") != path:
            shown = repr(path) if len(repr(path)) < 200 else repr(path)[:200] + "..."
            raise UnsafeArchiveError(f"entry member {shown} is not a path inside the entry in normal form",
                                     member=str(path))
        return path

    def _forget(self, path: str) -> None:
        if path in self._files or path in self._links:
            # A member that replaces an earlier one: let the earlier upload land first.
            self._flush()
            self._wait()
        self._files.pop(path, None)
        self._links.pop(path, None)

    # -- EntryWriter --------------------------------------------------------------------------

    def add_dir(self, path: str) -> None:
        """Object stores have no directories: nothing to write (the manifest lists them)."""
        self._checked(path)

    def add_file(self, path: str, chunks: Iterable[bytes], executable: bool = False) -> None:
        self._forget(self._checked(path))
        self._start()
        buffer = bytearray()
        spool: IO[bytes] | None = None
        size = 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if spool is not None:
                    spool.write(chunk)
                    continue
                buffer += chunk
                if len(buffer) > self.store.small_file:
                    # Unlinked at once: a killed process leaves no spool file behind.
                    spool = tempfile.TemporaryFile(prefix="hubcache-upload-")
                    spool.write(buffer)
                    buffer = bytearray()
        except OSError as error:
            if spool is not None:
                spool.close()
            raise CacheError(f"spooling {path} for upload: {error.strerror or error}",
                             hint="free space in the temp dir (TMPDIR)") from None
        target = f"{self.prefix}/{path}"
        self._files[path] = size
        if spool is not None:
            spool.seek(0)
            self._submit(self._upload_spooled, target, spool)
            return
        self._batch[target] = bytes(buffer)
        self._batch_bytes += size
        if self._batch_bytes >= self.store.batch_bytes or len(self._batch) >= self.store.batch_files:
            self._flush()

    def add_symlink(self, path: str, target: str) -> None:
        """Stored as a copy of the target file (see the module docstring).

        Raises:
            UnsafeArchiveError: the target is absolute or leaves the entry (the copy's source is
                then always an object of this entry: see :meth:`_link_source`).
        """
        resolved = paths.link_target(self._checked(path), target, what="entry member")
        self._forget(path)
        self._links[path] = resolved

    def add_hardlink(self, path: str, existing: str) -> None:
        self._checked(existing)
        self._forget(self._checked(path))
        self._links[path] = existing

    def _link_source(self, path: str) -> str:
        target = self._links[path]
        hops = 0
        while target in self._links:
            hops += 1
            if hops > 40:
                raise ArchiveError(f"archive member {path!r} is a loop of links")
            target = self._links[target]
        if target in self._files:
            return target
        hint = "use a local cache backend for this archive (e.g. HUBCACHE_BACKEND=home)"
        if target in ("", ".") or any(f.startswith(target + "/") for f in self._files):
            raise ArchiveError(f"archive member {path!r} links to the directory {target!r}; an object "
                               "store has no links, and hubcache stores only links to files (as copies)",
                               hint=hint)
        raise ArchiveError(f"archive member {path!r} links to {target!r}, which is not a file in the archive",
                           hint=hint)

    def commit(self, manifest: Manifest) -> str:
        """Check every object landed, then create the descriptor with the manifest (the commit).

        Before creating it the lease is checked once more; after creating it, the objects are
        listed again: if one is no longer at the version this writer wrote (another holder
        rewrote it in between, this writer having stalled past the TTL), the descriptor is
        withdrawn (deleted at the version created) and :class:`LeaseLostError` raised. A
        descriptor already there whose manifest describes the same files is a racing writer's
        commit of the same archive (its objects are ours too); another one (a writer that lost
        the lease to us committed over our objects, an unreadable one, one written since this
        writer started) is replaced, conditionally, while the lease is still ours.
        """
        store = self.store
        url = store.entry_path(self.key)
        self._start()
        with store._io(f"uploading to {url}"):
            self._flush()
            self._wait()
            sizes = {f"{self.prefix}/{p}": s for p, s in self._files.items()}
            for path in sorted(self._links):
                source = self._link_source(path)
                target = f"{self.prefix}/{path}"
                sizes[target] = self._files[source]
                self._submit(self._copy, f"{self.prefix}/{source}", target)
            self._wait()
            # Every object must be there, whole, at the version written, before the manifest says so.
            listing = store.list_versioned(self.prefix)
            for target, size in sorted(sizes.items()):
                found = listing.get(target)
                if found is None or found[0] != size:
                    store.confirm_lease(self.key)  # pulled from under us by a new holder?
                    what = "missing" if found is None else f"{found[0]} bytes, expected {size}"
                    raise CacheError(f"the upload of {store.url(target)} did not land ({what})", hint="try again")
                if found[1] != self._written.get(target):
                    store.confirm_lease(self.key)
                    raise CacheError(f"{store.url(target)} was rewritten by another writer during the upload",
                                     hint="try again")
            descriptor = store.descriptor_path(self.key)
            ours = layout.descriptor_with_manifest(layout.descriptor_text(self.handle), manifest.to_json())
            store.confirm_lease(self.key)
            try:
                store.create_object(descriptor, ours)  # the commit
            except FileExistsError:
                if self._adopt_existing(descriptor, manifest, ours, sizes):
                    self._committed = True
                    self._close()
                    return url
            self._committed = True
            after = store.list_versioned(self.prefix)
            if any(after.get(t, (0, ""))[1] != self._written.get(t) for t in sizes):
                self._withdraw(descriptor, ours)
            # Objects of an earlier, different archive under the same key are no part of this entry.
            store.delete_objects(set(after) - set(sizes))
        self._close()
        return url

    def _adopt_existing(self, descriptor: str, manifest: Manifest, ours: bytes,
                        sizes: dict[str, int]) -> bool:
        """After a refused descriptor creation: ``True`` if the descriptor there holds a racing
        writer's commit of the same files (nothing more to do); else replace it with ours while
        the lease is ours and our objects are intact (``False``: committed by the replacement)."""
        store = self.store
        found = store.read_versioned(descriptor, MAX_MANIFEST_BYTES)
        if found is not None and len(found[0]) <= MAX_MANIFEST_BYTES and _same_contents(found[0], manifest):
            return True
        listing = store.list_versioned(self.prefix)
        store.confirm_lease(self.key)
        if any(listing.get(t, (0, ""))[1] != self._written.get(t) for t in sizes):
            raise CacheError(f"the objects of {store.entry_path(self.key)} were rewritten by another writer "
                             "during the commit", hint="try again")
        try:
            if found is None:
                store.create_object(descriptor, ours)
            else:
                store.replace_object(descriptor, ours, found[1])
        except (FileExistsError, PreconditionFailed):
            store.confirm_lease(self.key)
            raise CacheError(f"the descriptor of {store.entry_path(self.key)} was rewritten by another writer "
                             "during the commit", hint="try again") from None
        return False

    def _withdraw(self, descriptor: str, ours: bytes) -> None:
        """Our descriptor went in after another holder rewrote some of our objects (we stalled
        between the last lease check and the creation): delete it, at the version we created,
        and give the entry up to that holder."""
        self._committed = False
        with contextlib.suppress(PreconditionFailed):
            found = self.store.read_versioned(descriptor, MAX_MANIFEST_BYTES)
            if found is not None and found[0] == ours:
                self.store.delete_versioned(descriptor, found[1])
        self.store.confirm_lease(self.key)  # raises LeaseLostError: the only way this happens
        raise CacheError(f"the objects of {self.store.entry_path(self.key)} were rewritten by another writer "
                         "during the commit", hint="try again")

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop the uploads and withdraw what this writer uploaded, unless the entry got
        committed. Each object is deleted only at the version this writer wrote, so an object
        another writer replaced since stays. If the lease was lost, the new holder owns the
        entry: only objects its committed manifest does not list are withdrawn (none while it
        has not committed; its commit removes leftovers), because a version is not always unique
        (an S3 ETag is the MD5 of the bytes, so the new holder's upload of identical bytes has
        the version this writer wrote)."""
        self._close()
        written, self._written = dict(self._written), {}
        if self._committed or not written:
            return
        try:
            self.store.confirm_lease(self.key)
        except Exception:  # LeaseLostError, or the lease cannot be read: assume the worst
            try:
                committed = self.store.read_manifest(self.key)
            except Exception:
                committed = None
            if committed is None:
                return
            listed = {f"{self.prefix}/{name}" for name in
                      [f.path for f in committed.files] + list(committed.symlinks)}
            descriptor = self.store.descriptor_path(self.key)
            written = {p: v for p, v in written.items() if p not in listed and p != descriptor}

        def withdraw(item: tuple[str, str]) -> None:
            with contextlib.suppress(Exception):  # PreconditionFailed: another writer's now
                self.store.delete_versioned(*item)

        with ThreadPoolExecutor(max_workers=self.store.workers, thread_name_prefix="hubcache-abort") as pool:
            list(pool.map(withdraw, sorted(written.items())))
