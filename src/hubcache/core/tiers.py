"""A chain of cache tiers: ``HUBCACHE_BACKEND=home,gcs`` reads through, fastest tier first.

- A hit in the first tier returns at once (the same one-``stat`` memoised check as a single
  backend).
- A miss there that hits a later tier (a bucket shared by a fleet) copies the entry down into
  every earlier writable tier, committed with that tier's own protocol; the origin is not
  contacted.
- A miss everywhere downloads once, into the first writable tier, then copies the entry up into
  every other writable tier, so the next host finds it in the shared one. When a later tier is
  shared by other hosts (an object store: ``home,gcs``), its lock — the bucket's download lease —
  is taken *before* the download and held until the copy up is committed: hosts that miss
  together (a pod starting at once) wait for that one download and then copy the bucket's entry
  down, so the origin is asked once per fleet, not once per host.
- Any other copy up never waits: if another process holds the target tier's lock (a host
  downloading the same model into a tier it shares holds its lock), the copy is skipped (a
  ``copy_skipped`` event) and the local path returned at once; the holder fills that tier. A
  copy down does wait for the earlier tier's lock, like a single backend: that copy is the path
  this resolve returns, and its holder (a local process) is committing the same entry.
- A tier that cannot be written (a read-only team cache, a bucket without write access) is still
  read; copies into it are skipped with a log message.

An entry in another tier is untrusted input (a bucket others can write, a directory another
process wrote), so a copy treats it as an archive from the network:

- its manifest passes :func:`hubcache.core.paths.validate_manifest` with the configured limits
  (``HUBCACHE_MAX_EXTRACT_SIZE``, ``HUBCACHE_MAX_MEMBERS``): normal names only, links that stay
  inside and never pass through links, no more bytes or members than an archive may have;
- a local source file is opened one directory at a time without following any link
  (:class:`hubcache.stores.treewalk.Beneath`) and must be a regular file; every file's size and
  CRC-32 must match the manifest, and no more bytes than it announces are read;
- what is written comes from the validated manifest only (directories, files, then links), never
  from what else lies in the source directory.

A source that fails any of this is a *miss* in its tier: the next tier, or the origin, serves the
handle, and nothing of the source is served or copied. A copy that fails because the *target*
cannot be written (read-only, full) serves the source, as before.

A manifest's archive digest is only as trustworthy as the tier it was read from. Local tiers are
trusted as a single backend is (the local store refuses files other users own or can write; see
``hubcache.stores.safefs``), so a copy from one keeps the manifest as it is. A manifest read from any
other tier (an object store) counts as ``archive["verified"] = False``: it cannot vouch for a
pinned handle there, and the copy records that, so ``check_pin`` makes a pinned handle download
and verify its archive instead of trusting a digest someone else wrote.

Every tier must be a cache backend; offline mode (``HUBCACHE_OFFLINE``) serves hits from any
tier and never downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Sequence, cast

from ..plugins.registry import emit
from .backend import Backend, CacheBackend
from .cache import resolve_in_store
from .commit import commit_entry
from .config import Config
from .crc import crc32_function
from .errors import (
    CacheError,
    ConfigError,
    HubcacheError,
    IntegrityError,
    OfflineError,
    UnsafeArchiveError,
)
from .handles import Handle
from .locate import Location
from .manifest import Manifest, crc_hex
from .pins import check_pin
from .store import EntryWriter, Store

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from ..download.objectfiles import ParallelFiles
    from ..stores.treewalk import Beneath
    from .paths import Limits

logger = logging.getLogger("hubcache")

#: Bytes per read when copying a file between tiers.
CHUNK = 1 << 20
#: Added to the peer patience: a waiter reads the lease at most every quarter TTL and polls at
#: most every second, so it sees a beat up to this late.
MAX_POLL_SLACK = 1.0


class SourceUnusable(IntegrityError):
    """An entry in a source tier cannot be copied: unsafe (names, links, limits), damaged (a
    missing file, a size or CRC-32 that does not match its manifest) or unreadable. The tier
    counts as a miss for the handle."""


def tier_names(name: str) -> list[str]:
    """The tiers of a backend setting (``"home,gcs"`` -> ``["home", "gcs"]``)."""
    return [part.strip() for part in name.split(",") if part.strip()]


def is_trusted(store: Store) -> bool:
    """Whether digests in ``store``'s manifests are taken as verified (local tiers; see the
    module doc)."""
    from ..stores.localstore import LocalStore

    return isinstance(store, LocalStore)


def untrusted(manifest: Manifest) -> Manifest:
    """``manifest`` with its archive digest marked as not verified by this process."""
    if manifest.archive.get("verified", True) is False:
        return manifest
    return dataclasses.replace(manifest, archive={**manifest.archive, "verified": False})


class TieredBackend(Backend):
    """Several cache backends read in order, each filled from the next (see the module doc).

    Args:
        config: the effective settings.
        tiers: the cache backends, fastest first.
    """

    name = "tiers"
    description = "a chain of cache tiers read in order"

    def __init__(self, config: Config, tiers: Sequence[Backend]) -> None:
        super().__init__(config)
        if len(tiers) < 2:
            raise ConfigError("a tier chain needs at least two backends")
        for tier in tiers:
            if not isinstance(tier, CacheBackend):
                raise ConfigError(f"backend {tier.name!r} keeps no cache, so it cannot be a tier",
                                  hint="chain cache backends only, e.g. HUBCACHE_BACKEND=home,gcs")
        self.tiers = cast("list[CacheBackend]", tiers)  # each one checked just above
        self.name = ",".join(t.name for t in tiers)  # type: ignore[misc]

    @classmethod
    def from_setting(cls, config: Config, setting: str) -> TieredBackend:
        """Build the chain a ``HUBCACHE_BACKEND`` value names."""
        from ..plugins.registry import get_registry

        registry = get_registry()
        return cls(config, [registry.backend_class(name)(config) for name in tier_names(setting)])

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description,
                "tiers": [tier.describe() for tier in self.tiers]}

    def resolve(self, handle: Handle, location: Location) -> str:
        return self.resolve_checked(handle, location)[0]

    def resolve_checked(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        if location.kind in ("directory", "pointer"):
            return self.tiers[0].resolve_checked(handle, location)  # the same answer as one tier
        for index, tier in enumerate(self.tiers):
            served = self._serve(handle, index)
            if served is not None:
                return served
        if self.config.offline:
            raise OfflineError(f"not in any tier of {self.name}, and offline mode is on (HUBCACHE_OFFLINE)",
                               hint=f"run `hubcache prefetch {handle.raw}` while online")
        return self._download(handle, location)

    def _serve(self, handle: Handle, index: int) -> tuple[str, Callable[[], bool] | None] | None:
        """Serve the handle from tier ``index`` if it holds a usable entry, copying it down into
        every earlier tier that takes it; ``None`` if that tier is a miss."""
        tier = self.tiers[index]
        key, store = handle.key, tier.store
        store.mark_used(key)
        found = store.lookup(key, handle.url)
        if found is None:
            return None
        path, manifest = found
        if not is_trusted(store):
            manifest = untrusted(manifest)  # a digest someone else wrote never satisfies a pin
        if not check_pin(handle, manifest, unverified_is_miss=True):
            return None  # the pin needs an archive this process verifies: download it
        # Copy down: the earliest tier that takes the copy serves this and every later call.
        try:
            for upper in reversed(self.tiers[:index]):
                copied = self._copy(handle, tier.store, path, manifest, upper, wait=True)
                if copied is not None:
                    tier, (path, manifest) = upper, copied
        except SourceUnusable as error:
            logger.warning("%s: tier %s holds an entry that cannot be used (%s); trying the next tier "
                           "(`hubcache rm --backend %s %s` removes it)", handle.raw, tier.name,
                           error.message, tier.name, handle.raw)
            return None
        return path, tier.store.validator(path, manifest)

    def _download(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        """Download once into the first tier that can be written, then fill the others.

        When a later tier is shared by other hosts (an object store), its lock (the bucket's
        download lease) is held from before the download until the entry is committed there:
        hosts that miss together wait for one download, then copy the bucket's entry down,
        instead of each downloading from the origin.
        """
        shared = self._shared_index()
        if shared is None:
            return self._download_into_tiers(handle, location)
        tier, key = self.tiers[shared], handle.key

        def on_wait(holder: str) -> None:
            emit("waiting", handle.raw, tier.name, path=tier.store.entry_path(key), holder=holder)

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(tier.store.lock_live_holder(key, on_wait, self._peer_patience()))
            except CacheError as error:  # e.g. a bucket this host may read but not write
                logger.info("tier %s of %s cannot be locked for %s: %s", tier.name, self.name, handle.raw,
                            error.message)
                return self._download_into_tiers(handle, location)
            # Another host may have committed while this one waited for the lease.
            served = self._serve(handle, shared)
            if served is not None:
                return served
            return self._download_into_tiers(handle, location, held=shared)
        raise AssertionError("unreachable")  # pragma: no cover - mypy: ExitStack may swallow

    def _peer_patience(self) -> float:
        """How long a silent bucket lease holds this host: :data:`PEER_PATIENCE_BEATS`
        heartbeats of a holder configured as this host is (a fleet shares its settings). A holder
        downloading beats on; a lease planted by a bucket writer does not, and then costs this
        host only these seconds before it downloads into its own tier."""
        from ..stores.objectstore import PEER_PATIENCE_BEATS, heartbeat_interval

        return PEER_PATIENCE_BEATS * heartbeat_interval(self.config.lease_ttl) + MAX_POLL_SLACK

    def _shared_index(self) -> int | None:
        """The first tier other hosts share (not a local store), if a local tier comes before it."""
        for index, tier in enumerate(self.tiers):
            if not is_trusted(tier.store):
                return index if index > 0 else None
        return None

    def _download_into_tiers(self, handle: Handle, location: Location,
                             held: int | None = None) -> tuple[str, Callable[[], bool] | None]:
        """Download into the first tier that can be written, then copy the entry up into the
        others (into tier ``held``, whose lock this process holds, without taking it again)."""
        errors = []
        for index, tier in enumerate(self.tiers):
            if index == held:
                continue  # filled by the copy up below, under the lock already held
            try:
                path, manifest = resolve_in_store(tier.store, handle, location, self.config,
                                                  backend=tier.name, on_commit=tier.after_commit)
            except CacheError as error:  # not writable: try the next tier
                logger.info("tier %s of %s cannot take %s: %s", tier.name, self.name, handle.raw, error.message)
                errors.append(f"{tier.name}: {error.message}")
                continue
            for other_index in range(index + 1, len(self.tiers)):
                other = self.tiers[other_index]
                try:
                    self._copy(handle, tier.store, path, manifest, other, wait=False, held=other_index == held)
                except SourceUnusable as error:  # our own fresh entry: damaged since, e.g. by a cleaner
                    logger.warning("%s: could not copy it into tier %s: %s", handle.raw, other.name, error.message)
                    break
            return path, tier.store.validator(path, manifest)
        raise CacheError(f"no tier of {self.name} could store the download ({'; '.join(errors)})",
                         hint="make one tier writable, or use a single backend")

    def _limits(self) -> Limits:
        from .paths import Limits

        return Limits(self.config.max_archive_bytes, self.config.max_members)

    def _check_source(self, manifest: Manifest) -> None:
        from .paths import validate_manifest

        try:
            validate_manifest(manifest, self._limits(), what="manifest entry of the source tier")
        except UnsafeArchiveError as error:
            raise SourceUnusable(error.message) from None

    def _copy(self, handle: Handle, source: Store, path: str, manifest: Manifest,
              target: CacheBackend, *, wait: bool = True, held: bool = False) -> tuple[str, Manifest] | None:
        """Copy a committed entry into ``target``'s store.

        Args:
            wait: wait for ``target``'s lock if another process holds it (a copy down, which
                serves this resolve); else skip the copy at once (a copy up: the holder fills it).
            held: this process holds ``target``'s lock for the key already (see :meth:`_download`).

        Returns:
            The copy's path and manifest, or ``None`` if the target tier cannot take it
            (read-only, full, busy).

        Raises:
            SourceUnusable: the source entry is unsafe, damaged or unreadable (nothing was
                committed in the target).
        """
        self._check_source(manifest)
        if not is_trusted(source):
            manifest = untrusted(manifest)
        store, key = target.store, handle.key

        def on_wait(holder: str) -> None:
            emit("waiting", handle.raw, target.name, path=store.entry_path(key), holder=holder)

        def fill(writer: EntryWriter) -> Manifest:
            _fill(writer, path, manifest, self._limits().max_bytes, getattr(source, "fs", None),
                  connections=self.config.connections, chunk_size=self.config.chunk_size)
            return manifest

        try:
            # Another process may have copied it meanwhile: its committed entry is returned.
            result = commit_entry(store, handle, fill, on_wait=on_wait, wait=wait, held=held)
            if isinstance(result, str):  # not waiting, and another process holds the lock
                emit("copy_skipped", handle.raw, target.name, path=store.entry_path(key), reason=result)
                return None
        except SourceUnusable:
            raise
        except (HubcacheError, OSError) as error:
            logger.info("could not copy %s into tier %s: %s", handle.raw, target.name, error)
            return None
        if not result.new:
            return result.path, result.manifest
        copied = result.path
        emit("copied", handle.raw, target.name, path=copied, source=path, bytes=manifest.total_bytes)
        target.after_commit(handle, copied, manifest)  # e.g. the home tier's size budget
        return copied, manifest


class _Source:
    """Reads the files of a source entry: local ones beneath its directory without following
    links, others through the source store's own filesystem (its credentials and endpoint; a
    plain ``fsspec.open`` would look credentials up again, or reach another endpoint)."""

    def __init__(self, root: str, fs: Any = None) -> None:  # Any: an fsspec filesystem (untyped)
        self.root = root
        self.fs = fs
        self.tree: Beneath | None = None
        self.files: ParallelFiles | None = None  # the files read ahead in parallel, if they are
        if "://" not in root:
            from ..stores.treewalk import Beneath

            try:
                self.tree = Beneath(root)
            except OSError as error:
                raise SourceUnusable(f"the entry directory cannot be opened ({error.strerror or error})") from None

    def open(self, rel: str) -> BinaryIO:
        if self.tree is not None:
            return os.fdopen(self.tree.open_file(rel), "rb")
        url = self.root.rstrip("/") + "/" + rel
        # cast: fsspec is untyped; its files opened "rb" are binary file objects.
        if self.fs is not None:
            return cast(BinaryIO, self.fs.open(self.fs._strip_protocol(url), "rb"))
        import fsspec

        return cast(BinaryIO, fsspec.open(url, "rb").open())

    def read_ahead(self, files: list[tuple[str, int]], connections: int, chunk_size: int) -> None:
        """Read the files ``[(rel, size)]`` of a source in an object store ahead, ``connections``
        ranged reads at once (``download/objectfiles.py``); :meth:`chunks` then takes them in
        this order. A local source, or one connection, reads each file when its turn comes."""
        if self.tree is not None or self.fs is None or connections <= 1 or not files:
            return
        from ..download.objectfiles import ParallelFiles
        from ..download.objectread import object_chunk, object_stream, opens_early

        fs, root = self.fs, self.root.rstrip("/")

        def open_stream(rel: str) -> Any:
            url = f"{root}/{rel}"
            return object_stream(fs, fs._strip_protocol(url), url)

        ahead = opens_early(fs)
        self.files = ParallelFiles(files, open_stream, chunk_size=object_chunk(chunk_size, connections, ahead),
                                   connections=connections, ahead=ahead)
        self._order = {rel: index for index, (rel, _) in enumerate(files)}

    def close(self) -> None:
        if self.files is not None:
            self.files.close()
        if self.tree is not None:
            self.tree.close()

    def _pieces(self, rel: str, size: int) -> Iterator[bytes]:
        """``rel``'s bytes: from the read ahead (exactly ``size``, else ``SizeMismatch``), or from
        the file, up to one byte more than ``size``."""
        if self.files is not None:
            yield from self.files.file(self._order[rel])
            return
        count = 0
        with self.open(rel) as f:
            while count <= size:  # one byte more than announced is enough to tell
                chunk = f.read(min(CHUNK, size + 1 - count))
                if not chunk:
                    break
                count += len(chunk)
                yield chunk

    def chunks(self, rel: str, size: int, expected_crc: str, budget: list[int]) -> Iterator[bytes]:
        """The bytes of ``rel``: exactly ``size`` of them with CRC-32 ``expected_crc``, else
        :class:`SourceUnusable` (raised from inside the writer's loop, so the write stops)."""
        from ..download.objectfiles import SizeMismatch

        crc32 = crc32_function()
        crc = count = 0
        try:
            for chunk in self._pieces(rel, size):
                count += len(chunk)
                if count > size:
                    break
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise SourceUnusable("the entry holds more bytes than HUBCACHE_MAX_EXTRACT_SIZE allows")
                crc = crc32(chunk, crc)
                yield chunk
        except SourceUnusable:
            raise
        except SizeMismatch as error:  # this file's, or a later one's read ahead
            raise SourceUnusable(str(error)) from None
        except Exception as error:  # noqa: BLE001 - whatever the source tier's reader raises
            raise SourceUnusable(f"{rel} cannot be read ({getattr(error, 'strerror', None) or error})") from None
        if count != size:
            raise SourceUnusable(f"{rel} has {'more than ' if count > size else ''}{count} bytes, "
                                 f"but its manifest says {size}")
        if crc_hex(crc) != expected_crc:
            raise SourceUnusable(f"{rel} has CRC-32 {crc_hex(crc)}, but its manifest says {expected_crc}")


def _fill(writer: EntryWriter, root: str, manifest: Manifest, max_bytes: int, fs: Any = None, *,
          connections: int = 1, chunk_size: int = 8 << 20) -> None:
    """Write the validated ``manifest``'s entry from ``root``: directories, files, then links (so
    nothing is ever written through a link). A source in an object store is read ahead over
    ``connections`` ranged reads of up to ``chunk_size`` bytes (see :meth:`_Source.read_ahead`)."""
    dirs = set(manifest.dirs)
    for record in manifest.files:
        parts = record.path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    source = _Source(root, fs)
    budget = [max_bytes]
    files = sorted(manifest.files, key=lambda r: r.path)  # one pass down the tree
    try:
        for d in sorted(dirs):
            writer.add_dir(d)
        # The sizes are the validated manifest's: within HUBCACHE_MAX_EXTRACT_SIZE in all.
        source.read_ahead([(r.path, r.size) for r in files], connections, chunk_size)
        for record in files:
            writer.add_file(record.path, source.chunks(record.path, record.size, record.crc32, budget))
    finally:
        source.close()
    for link, target in sorted(manifest.symlinks.items()):
        writer.add_symlink(link, target)
