"""The cache entry protocol on a local filesystem (used by the ``tmp`` and ``home`` backends).

The cache directory holds exactly what tensorflow_hub's does: ``<key>/`` and
``<key>.descriptor.txt`` per model, and ``<key>.lock`` while a download runs
(:mod:`hubcache.core.entry` names them).

Commit: under the download lock ``<key>.lock`` (:mod:`hubcache.stores.downloadlock`), extract
into ``<key>.<task>.tmp``, write hubcache's descriptor without a manifest (an entry hubcache has
not committed, whatever descriptor was there before), ``rename`` the temp dir to ``<key>``
(atomic: tensorflow_hub, which trusts any non-empty entry dir, never sees a partial one), then
replace the descriptor with one that ends with the manifest, written to a temp name, ``fsync``-ed
and moved into place with ``os.replace`` (atomic: hubcache trusts only entries whose descriptor
holds a manifest; tensorflow_hub never reads descriptors). A crash at any point leaves either
nothing visible or an entry without a manifest, which hubcache rebuilds, and a ``<key>.lock``
nobody ``flock``-s, which the next writer takes over at once. An entry an older hubcache wrote
(its manifest in ``<key>.manifest.json``) is read as it is and rewritten in this layout by the
first resolve that can write the cache.

In use and last use (:mod:`hubcache.stores.usage`): shared ``flock`` locks on the entry
directory itself, and its mtime, set at most once a day: a hit on a recently used entry writes
nothing.

Trust (the model of ssh's ``StrictModes`` and pip's cache-dir check; :mod:`hubcache.stores.safefs`
does the opening): a root other users can write is refused outright, with a :class:`CacheError`
saying how to fix it. Inside a root, only what hubcache itself would have made is used: real
directories and regular files owned by this user, root or the root's owner, and not writable by
anyone else. A symlink, FIFO or another user's file in place of an entry, manifest, descriptor,
model file or lock is a miss or damage: never served, never written through, never waited
on. A descriptor is read with a cap, and its manifest is checked as an archive's members are. Nothing is ever opened through a link or in a way that could block.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shlex
import stat
import uuid
from typing import Callable, Collection, Iterable, Iterator

from ..core import entry as layout
from ..core import paths
from ..core.crc import file_crc32
from ..core.entry import WRITER_TAG, EntryState  # noqa: F401 - WRITER_TAG re-exported (tests/second_user.py)
from ..core.errors import CacheError, UnsafeArchiveError
from ..core.manifest import FileRecord, Manifest, crc_hex
from ..core.store import EntryInfo, EntryWriter, Store
from . import downloadlock, safefs, treewalk, usage

logger = logging.getLogger("hubcache")

#: Checking an entry already on disk against its manifest: only the manifest's shape matters
#: (the size and member limits were applied when the entry was written).
_NO_LIMITS = paths.Limits(max_bytes=1 << 62, max_members=1 << 62)
#: Most of a descriptor searched for its ``Module:`` line (the handle ``hubcache ls`` shows).
_NOTE_BYTES = 64 << 10


def _atomic_write(path: str, data: bytes, *, durable: bool = False) -> None:
    part = f"{path}.{uuid.uuid4().hex[:8]}.part"
    try:
        safefs.write_new(part, data, durable=durable)  # O_EXCL | O_NOFOLLOW: never into a planted file or link
        os.replace(part, path)  # replaces a link or FIFO at `path` itself, never writes through it
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep our half-written part
            os.unlink(part)
        raise


def _cache_error(error: OSError, what: str) -> CacheError:
    if isinstance(error, safefs.UnsafeFileError):
        return CacheError(f"refusing {error.path} while {what}: it {error.reason}",
                          hint="remove it (hubcache did not make it), or set TFHUB_CACHE_DIR to a directory "
                               "only you can write")
    if error.errno == errno.ENOTDIR:
        return CacheError(f"the cache directory {error.filename} is not a directory (or a part of its path is a file) "
                          f"while {what}", hint="set TFHUB_CACHE_DIR to a directory")
    if error.errno == errno.ENOSPC:
        return CacheError(f"no space left on the device while {what}", hint="free space or set TFHUB_CACHE_DIR elsewhere")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(f"the cache is not writable ({error.strerror}) while {what}",
                          hint="set TFHUB_CACHE_DIR to a writable directory")
    return CacheError(f"{error.strerror or error} while {what}")


def local_model_dir_problems(path: str) -> list[str]:
    """Problems that make a directory an incomplete SavedModel or hub module (``[]``: complete).

    Used to adopt entries written by tensorflow_hub, which have no manifest: the directory's
    listing (its top level and ``variables/``) judged by
    :func:`hubcache.core.entry.model_dir_problems`. Never follows a link: a marker file that is
    a link (or a FIFO) does not count.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return ["the entry directory is not a directory"]
        files, others = _listing(path)
    except OSError:
        return ["the entry directory is missing"]
    if not files and not others:
        return ["the entry directory is empty"]
    variables = os.path.join(path, "variables")
    with contextlib.suppress(OSError):
        if "variables" in others and stat.S_ISDIR(os.lstat(variables).st_mode):  # a real one, not a link
            below, odd = _listing(variables, "variables/")
            files.update(below)
            others.extend(odd)
    return layout.model_dir_problems(files, others)


def _listing(path: str, prefix: str = "") -> tuple[dict[str, int], list[str]]:
    """One directory's regular files (name -> size) and its other names, without following links."""
    files: dict[str, int] = {}
    others: list[str] = []
    with os.scandir(path) as found:
        for item in found:
            if item.is_file(follow_symlinks=False):
                files[prefix + item.name] = item.stat(follow_symlinks=False).st_size
            else:
                others.append(prefix + item.name)
    return files, others


def scan_files(path: str, *, digests: bool = True, trusted: Collection[int] | None = None) -> Manifest:
    """Build the file lists of a manifest by walking a directory (an entry to adopt).

    The walk never follows a link (links are recorded with their targets), reads files without
    blocking, and accepts only what :func:`hubcache.stores.safefs.problem` accepts, owned by
    ``trusted`` (default: this user and root). The result passes
    :func:`hubcache.core.paths.validate_manifest`: a link that leaves the directory, or passes
    through another link, refuses the whole tree.

    Raises:
        OSError: unreadable, or holds what must not be adopted (``UnsafeFileError``: a FIFO,
            another user's file, a file others can write...).
        UnsafeArchiveError: a name or link the entry rules refuse.
    """
    trusted = safefs.trusted_owners() if trusted is None else trusted
    manifest = Manifest(handle="")

    def fail(error: OSError) -> None:
        raise error

    for d in treewalk.walk(path, onerror=fail):
        prefix = d.path + "/" if d.path else ""
        here = os.path.join(path, *d.path.split("/")) if d.path else path
        reason = safefs.problem(os.fstat(d.dir_fd) if d.dir_fd is not None else os.lstat(here), trusted, kind="dir")
        if reason is not None:
            raise safefs.UnsafeFileError(here, reason)
        if d.other:
            raise safefs.UnsafeFileError(os.path.join(here, d.other[0]), "is not a regular file, directory or link")
        manifest.dirs.extend(prefix + name for name in d.dirs)
        for name in d.symlinks:
            manifest.symlinks[prefix + name] = (os.readlink(name, dir_fd=d.dir_fd) if d.dir_fd is not None
                                                else os.readlink(os.path.join(here, name)))
        for name in d.files:
            where = name if d.dir_fd is not None else os.path.join(here, name)
            if not digests:
                st = os.stat(where, dir_fd=d.dir_fd, follow_symlinks=False)
                reason = safefs.problem(st, trusted)
                if reason is not None:
                    raise safefs.UnsafeFileError(os.path.join(here, name), reason)
                manifest.files.append(FileRecord(prefix + name, st.st_size, crc_hex(0)))
                continue
            fd = safefs.open_file(where, trusted, dir_fd=d.dir_fd)
            with os.fdopen(fd, "rb") as f:
                crc, size = file_crc32(f)
            manifest.files.append(FileRecord(prefix + name, size, crc_hex(crc)))
    manifest.files.sort(key=lambda f: f.path)
    manifest.dirs.sort()
    paths.validate_manifest(manifest, _NO_LIMITS, what="file of the tensorflow_hub entry")
    return manifest


def _parents(names: Iterable[str], known: set[str]) -> set[str]:
    """``known`` plus every parent directory of ``names`` (linear: stops at a parent seen)."""
    dirs = set(known)
    for name in names:
        while (cut := name.rfind("/")) > 0:
            name = name[:cut]
            if name in dirs:
                break
            dirs.add(name)
    return dirs


class LocalStore(Store):
    """Entries in a local directory.

    Args:
        root: the cache directory (created on the first download).
        lock_timeout: seconds to wait for another process downloading the same handle.
        create_mode: permissions of the root when hubcache creates it (``0o755``; never
            writable by others, whatever the umask).
        private: the root must be a real directory (not a link) of this process's user: set for
            the default root in the shared temp dir, where another user may have made it first.
    """

    def __init__(self, root: str, *, lock_timeout: float = 3600.0, create_mode: int = 0o755,
                 private: bool = False):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.lock_timeout = lock_timeout
        self.create_mode = create_mode & 0o755
        self.private = private
        #: owners whose files are used (refreshed from the root by :meth:`check_root`)
        self.trusted: frozenset[int] = safefs.trusted_owners()
        #: keys this process resolves (:meth:`mark_used`): their entries are locked in use once found
        self._using: set[str] = set()
        #: key -> the task of the download lock this process holds (its writer's temp dir name)
        self._tasks: dict[str, str] = {}

    # -- the root -----------------------------------------------------------------------------

    def check_root(self, *, create: bool = False) -> bool:
        """Check the root before using it; True if it exists (with ``create``: made if absent).

        Raises:
            CacheError: other users can write the root, or (``private``) it is a link or belongs
                to another user.
            OSError: it could not be made or examined (a read-only file system, a file in the
                way: ``NotADirectoryError``), which callers treat as an unusable tier.
        """
        look = os.lstat if self.private else os.stat  # a chosen root may be a link: check its target
        try:
            st = look(self.root)
        except FileNotFoundError:
            if not create:
                return False
            parent = os.path.dirname(self.root)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.root, self.create_mode)  # a umask only takes bits away
            st = look(self.root)
        self._refuse_unsafe_root(st)
        self.trusted = safefs.trusted_owners(st)
        return True

    def _refuse_unsafe_root(self, st: os.stat_result) -> None:
        real = self.root if self.private else os.path.realpath(self.root)
        fix = "set TFHUB_CACHE_DIR to a directory only you can write"
        if stat.S_ISLNK(st.st_mode):
            raise CacheError(f"the cache directory {real} is a symbolic link, which hubcache never makes there",
                             hint=f"have it removed, or {fix}")
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.root)
        if self.private and safefs.POSIX and st.st_uid != safefs.euid():
            raise CacheError(f"the cache directory {real} belongs to another user (uid {st.st_uid})",
                             hint=f"have it removed (hubcache did not make it for you), or {fix}")
        if safefs.writable_by_others(st):
            raise CacheError(f"the cache directory {real} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}), "
                             "so its entries cannot be trusted",
                             hint=f"run `chmod go-w {shlex.quote(real)}`, or {fix}")

    # -- paths --------------------------------------------------------------------------------

    def entry_path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def descriptor_path(self, key: str) -> str:
        """The descriptor: tensorflow_hub's lines, hubcache's, then the manifest (the commit)."""
        return os.path.join(self.root, layout.descriptor_name(key))

    def lock_path(self, key: str) -> str:
        """The download lock, there only while a download runs (tensorflow_hub's name)."""
        return os.path.join(self.root, key + layout.LOCK_SUFFIX)

    def legacy_manifest_path(self, key: str) -> str:
        """Where an older hubcache kept the manifest (read when the descriptor holds none)."""
        return os.path.join(self.root, layout.manifest_name(key))

    def _legacy_path(self, key: str, suffix: str) -> str:
        return os.path.join(self.root, key + suffix)

    # -- reading ------------------------------------------------------------------------------

    def read_descriptor(self, key: str) -> bytes | None:
        """The descriptor's bytes (at most :data:`hubcache.stores.safefs.MAX_READ`), or ``None``
        if it is absent or not one to trust (a link, a FIFO, another user's, too large)."""
        try:
            return safefs.read_file(self.descriptor_path(key), self.trusted)
        except OSError:
            return None

    def read_manifest(self, key: str) -> Manifest | None:
        """The entry's manifest, or ``None`` if it has no readable, trusted one."""
        return self._manifest(key, self.read_descriptor(key))[0]

    def _manifest(self, key: str, descriptor: bytes | None) -> tuple[Manifest | None, bool]:
        """The manifest in ``descriptor``, else in an older hubcache's ``<key>.manifest.json``;
        and whether it came from the latter (the entry is then rewritten in this layout)."""
        embedded = layout.descriptor_manifest(descriptor)
        if embedded is not None:
            try:
                return Manifest.from_json(embedded), False
            except ValueError:
                return None, False
        try:
            return Manifest.from_json(safefs.read_file(self.legacy_manifest_path(key), self.trusted)), True
        except (OSError, ValueError):
            return None, False

    def _entry_problem(self, path: str) -> str | None:
        """Why the entry directory must not be used (missing, a link, another user's), else None."""
        try:
            st = os.lstat(path)
        except OSError:
            return "is missing"
        return safefs.problem(st, self.trusted, kind="dir")

    def check(self, path: str, manifest: Manifest, full: bool = False) -> list[str]:
        """Compare an entry directory with its manifest (``[]``: it matches).

        Nothing is followed: every file must be a regular file, every directory a real one, and
        every link must have the manifest's target, all owned by trusted users and writable by
        nobody else. The manifest must pass :func:`hubcache.core.paths.validate_manifest` (so no
        link in it leaves the entry, whatever order its links come in). ``full`` also compares
        each file's CRC-32.
        """
        reason = self._entry_problem(path)
        if reason is not None:
            return [f"the entry directory {reason}"]
        try:
            paths.validate_manifest(manifest, _NO_LIMITS)
        except UnsafeArchiveError as error:
            return [f"the manifest is unsafe: {error.message}"]
        problems: list[str] = []
        try:
            tree = treewalk.Beneath(path)
        except OSError:
            return ["the entry directory is missing"]
        with tree:
            for record in manifest.files:
                try:
                    st = tree.lstat(record.path)
                except OSError:
                    st = None
                reason = None if st is None else safefs.problem(st, self.trusted)
                size_problem = layout.size_problem(record.path, st and st.st_size, record.size)
                if reason is not None:
                    problems.append(f"{record.path} {reason}")
                elif size_problem is not None:
                    problems.append(size_problem)
                elif full:
                    crc = self._crc(tree, record.path)
                    if crc != record.crc32:
                        problems.append(f"{record.path} has CRC-32 {crc}, expected {record.crc32}")
            for link, target in manifest.symlinks.items():
                try:
                    is_link = stat.S_ISLNK(tree.lstat(link).st_mode)
                    actual = tree.readlink(link) if is_link else None
                except OSError:
                    is_link, actual = False, None
                if not is_link:
                    problems.append(f"symlink {link} is missing")
                elif actual != target:
                    problems.append(f"symlink {link} points to {actual!r}, not {target!r} as recorded")
            for d in sorted(_parents(list(manifest.symlinks) + [f.path for f in manifest.files], set(manifest.dirs))):
                try:
                    st = tree.lstat(d)
                except OSError:
                    problems.append(f"directory {d} is missing")
                    continue
                reason = safefs.problem(st, self.trusted, kind="dir")
                if reason is not None:
                    problems.append(f"directory {d} is missing" if reason == "is not a directory" else f"directory {d} {reason}")
        return problems

    @staticmethod
    def _crc(tree: treewalk.Beneath, rel: str) -> str:
        try:
            fd = tree.open_file(rel)
        except OSError as error:
            return f"unreadable ({error.strerror})"
        with os.fdopen(fd, "rb") as f:
            return crc_hex(file_crc32(f)[0])

    def lookup(self, key: str, handle: str) -> tuple[str, Manifest] | None:
        try:
            if not self.check_root():
                return None
        except OSError:
            return None
        path = self.entry_path(key)
        if self._entry_problem(path) is not None:
            return None
        if key in self._using:
            usage.use(path)  # before the checks: a remover cannot start between them and the caller
        descriptor = self.read_descriptor(key)
        manifest, legacy = self._manifest(key, descriptor)
        if manifest is None:
            return self._adopt(key, handle, descriptor)
        if self.check(path, manifest):
            return None
        if legacy:
            self._migrate(key, descriptor)
        if key not in self._tasks and os.path.lexists(self.lock_path(key)) and self._writable():
            # What a writer killed after its commit left: nobody holds it (else it stays).
            downloadlock.drop_if_free(self.lock_path(key), self.trusted, self.lock_timeout)
        return path, manifest

    def _writable(self) -> bool:
        return os.access(self.root, os.W_OK)

    def _adopt(self, key: str, handle: str, descriptor: bytes | None) -> tuple[str, Manifest] | None:
        path = self.entry_path(key)
        if (self._entry_problem(path) is not None or not layout.written_by_tensorflow_hub(descriptor)
                or local_model_dir_problems(path)):
            return None
        # Digests mean reading every byte: worth it only when the manifest can be kept. A
        # read-only (shared) cache gets a sizes-only manifest in memory and writes nothing.
        writable = self._writable()
        try:
            manifest = scan_files(path, digests=writable, trusted=self.trusted)
        except (OSError, UnsafeArchiveError) as error:
            logger.info("not adopting the tensorflow_hub entry %s: %s", path, error)
            return None
        manifest.handle = handle
        manifest.creator = "adopted from tensorflow_hub"  # no archive digest: it can vouch for no pin
        if writable:
            # tensorflow_hub's lines are kept; hubcache's line and the manifest follow. Only if
            # the descriptor is still the one judged (tensorflow_hub may be rewriting it).
            if self.read_descriptor(key) == descriptor:
                with contextlib.suppress(OSError):  # e.g. a full disk: still a hit
                    _atomic_write(self.descriptor_path(key),
                                  layout.descriptor_with_manifest(layout.rewritten_head(descriptor, handle), manifest.to_json()),
                                  durable=True)
        return path, manifest

    def _migrate(self, key: str, descriptor: bytes | None) -> None:
        """Rewrite an entry an older hubcache committed (its manifest in ``<key>.manifest.json``)
        in this layout: the manifest into the descriptor, then the old files removed. Once, by
        the first resolve that can write the cache and get the download lock without waiting."""
        if not self._writable():
            return
        with self.try_lock(key) as busy:
            if busy is not None:
                return
            now = self.read_descriptor(key)
            manifest, legacy = self._manifest(key, now)
            if manifest is None or not legacy or now != descriptor:
                return  # changed meanwhile: whoever changed it owns it
            try:
                raw = safefs.read_file(self.legacy_manifest_path(key), self.trusted)
                _atomic_write(self.descriptor_path(key),
                              layout.descriptor_with_manifest(layout.rewritten_head(now, manifest.handle), raw), durable=True)
                os.unlink(self.legacy_manifest_path(key))
            except OSError as error:
                logger.info("could not rewrite %s in the current layout: %s", self.entry_path(key), error)
                return
            self._drop_legacy(key)

    def _drop_legacy(self, key: str) -> None:
        """Remove an older hubcache's bookkeeping files of ``key`` that no older process holds;
        a use file's time of last use moves to the entry directory first."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._legacy_path(key, layout.LEGACY_OWNER_SUFFIX))
        for suffix in (layout.LEGACY_LOCK_SUFFIX, layout.LEGACY_USE_SUFFIX):
            path = self._legacy_path(key, suffix)
            if not os.path.lexists(path) or usage.probe_file(path) is not None:
                continue
            if suffix == layout.LEGACY_USE_SUFFIX:
                self._carry_last_use(key, path)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _carry_last_use(self, key: str, use_file: str) -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(use_file)
            entry = self.entry_path(key)
            if stat.S_ISREG(st.st_mode) and st.st_uid in self.trusted and st.st_mtime > os.lstat(entry).st_mtime:
                os.utime(entry, (st.st_mtime, st.st_mtime), follow_symlinks=False)

    def _legacy_last_use(self, key: str) -> float | None:
        with contextlib.suppress(OSError):
            st = os.lstat(self._legacy_path(key, layout.LEGACY_USE_SUFFIX))
            if safefs.problem(st, self.trusted, others_may_write=True) is None and st.st_mtime > 0:
                return st.st_mtime
        return None

    def validator(self, path: str, manifest: Manifest) -> Callable[[], bool]:
        # One stat per memoised hit, of the file TensorFlow opens first (a temp cleaner deleting
        # it is the "SavedModel file does not exist" failure); else the first file, or the dir.
        names = {f.path for f in manifest.files}
        first = next((n for n in layout.MARKERS if n in names),
                     manifest.files[0].path if manifest.files else None)
        sentinel = os.path.join(path, first) if first else path

        def still_valid() -> bool:
            # In use again first (a prefetch may have released it), then check it is still there.
            usage.use(path)  # held already: a dict lookup and a clock read
            return os.path.exists(sentinel)

        return still_valid

    # -- use tracking (see hubcache.stores.usage) ---------------------------------------------------

    def mark_used(self, key: str) -> None:
        # Nothing is created: the entry directory itself is locked, now if it is there, else by
        # the lookup that finds it or the commit that makes it.
        self._using.add(key)
        usage.use(self.entry_path(key))

    def release(self, key: str) -> None:
        self._using.discard(key)
        usage.release(self.entry_path(key))

    def _downloading(self, key: str) -> str | None:
        reason = downloadlock.probe(self.lock_path(key), self.trusted, self.lock_timeout)
        if reason is None and usage.probe_file(self._legacy_path(key, layout.LEGACY_LOCK_SUFFIX)) is not None:
            reason = "being downloaded (by an older hubcache)"
        return reason

    def _in_use(self, key: str) -> str | None:
        """An older hubcache's use file still locked by one of its processes, if any."""
        return usage.probe_file(self._legacy_path(key, layout.LEGACY_USE_SUFFIX))

    def busy(self, key: str) -> str | None:
        # The download lock first: a downloader may also use the entry, and this says more.
        return self._downloading(key) or usage.probe(self.entry_path(key)) or self._in_use(key)

    @contextlib.contextmanager
    def guard(self, key: str) -> Iterator[str | None]:
        with self._download_lock(key, lambda holder: None, None) as downloading:  # no writer starts meanwhile
            if downloading is not None:
                yield downloading.reason
                return
            with usage.exclusive(self.entry_path(key)) as in_use:
                yield in_use or self._in_use(key)

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        with self._download_lock(key, on_wait, self.lock_timeout) as busy:
            assert busy is None  # waiting: held, or an error
            yield

    @contextlib.contextmanager
    def try_lock(self, key: str) -> Iterator[str | None]:
        with self._download_lock(key, lambda holder: None, None) as busy:
            if busy is None:
                yield None
            else:
                yield f"locked by {busy.holder}{', tensorflow_hub' if busy.tensorflow_hub else ''}"

    @contextlib.contextmanager
    def _download_lock(self, key: str, on_wait: Callable[[str], None],
                       wait: float | None) -> Iterator[downloadlock.Busy | None]:
        """Hold ``<key>.lock`` (:mod:`hubcache.stores.downloadlock`); yields ``None``, or who
        holds it when ``wait`` is ``None`` and another live download does. Unlinked when the
        block ends."""
        path = self.lock_path(key)
        try:
            self.check_root(create=True)
            fd, task = downloadlock.acquire(path, self.trusted, wait=wait, stale_after=self.lock_timeout,
                                            on_wait=on_wait)
        except downloadlock.Busy as busy:
            yield busy
            return
        except safefs.UnsafeFileError as error:
            raise CacheError(f"refusing the lock file {error.path}: it {error.reason}",
                             hint="remove it (hubcache did not make it; ask the cache's owner), or set "
                                  "TFHUB_CACHE_DIR to a directory only you can write") from None
        except OSError as error:
            raise _cache_error(error, f"locking {path}") from None
        self._tasks[key] = task
        try:
            yield None
        finally:
            self._tasks.pop(key, None)
            downloadlock.release(fd, path)

    def writer(self, key: str, handle: str) -> LocalWriter:
        return LocalWriter(self, key, handle, task=self._tasks.get(key))

    def cleanup(self, key: str) -> None:
        # Every hubcache writer of this key holds the lock while it writes, so whatever
        # temp dir, trash dir or half-written file of ours is here now was abandoned.
        root = glob.escape(self.root)
        prefix = layout.LOCK_TASK_PREFIX
        for leftover in (glob.glob(os.path.join(root, f"{key}.{prefix}*.tmp"))
                         + glob.glob(os.path.join(root, f"{key}.{prefix}*.trash"))):
            treewalk.rmtree(leftover, ignore_errors=True)
        for part in glob.glob(os.path.join(root, f"{key}.*.part")):
            with contextlib.suppress(OSError):
                os.unlink(part)

    def discard(self, key: str) -> None:
        """Remove an entry's manifest (the descriptor, and an older hubcache's manifest file),
        then its directory: never seen half-removed."""
        for path in (self.legacy_manifest_path(key), self.descriptor_path(key)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        path = self.entry_path(key)
        if os.path.lexists(path):
            trash = f"{path}.{layout.LOCK_TASK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.trash"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
            treewalk.rmtree(trash, ignore_errors=True)

    # -- listing and maintenance ----------------------------------------------------------------

    def entries(self) -> Iterator[EntryInfo]:
        try:
            if not self.check_root():
                return
            names = sorted(os.listdir(self.root))
        except OSError:
            return
        keys: dict[str, set[str]] = {}
        for name in names:
            key = name.split(".", 1)[0]
            if layout.is_key(key):
                keys.setdefault(key, set()).add(name[len(key):])
        for key, suffixes in keys.items():
            info = self._info(key, suffixes)
            if info is not None:
                yield info

    def entry(self, key: str) -> EntryInfo | None:
        try:
            if not self.check_root():
                return None
            names = os.listdir(self.root)
        except OSError:
            return None
        return self._info(key, {name[len(key):] for name in names if name.startswith(key)})

    def _info(self, key: str, suffixes: set[str]) -> EntryInfo | None:
        path = self.entry_path(key)
        descriptor = self.read_descriptor(key)
        manifest = self._manifest(key, descriptor)[0]
        # A writer's temp dir (hubcache's or tensorflow_hub's), or a lock file with nothing else
        # of the entry there (the download has not made its temp dir yet, or crashed).
        in_progress = any(s.endswith(".tmp") for s in suffixes) or (
            layout.LOCK_SUFFIX in suffixes and "" not in suffixes and layout.DESCRIPTOR_SUFFIX not in suffixes)
        state: EntryState
        if manifest is not None and "" in suffixes and not self.check(path, manifest):
            state = "committed"
        elif (manifest is None and "" in suffixes and self._entry_problem(path) is None
              and layout.written_by_tensorflow_hub(descriptor) and not local_model_dir_problems(path)):
            state = "foreign"
        elif in_progress:
            state = "in progress"
        elif "" in suffixes or manifest is not None:
            state = "damaged"
        else:
            return None
        size = manifest.total_bytes if manifest else treewalk.disk_usage(path)
        # Last use: the entry directory's mtime (usage.py); an older hubcache's use file if later.
        recorded = [t for t in (usage.last_used(path), self._legacy_last_use(key)) if t is not None]
        last: float | None = max(recorded) if recorded else None
        if last is None and manifest is not None:
            last = manifest.created
        handle = manifest.handle if manifest else layout.descriptor_module(descriptor[:_NOTE_BYTES] if descriptor else None)
        return EntryInfo(key, path, state, manifest, size, last, handle)

    def remove(self, key: str) -> bool:
        existed = any(os.path.lexists(p) for p in (self.entry_path(key), self.descriptor_path(key),
                                                    self.legacy_manifest_path(key)))
        self.discard(key)
        self._drop_legacy(key)
        # What a writer killed during its download left (inside guard() the lock is ours: kept).
        downloadlock.drop_if_free(self.lock_path(key), self.trusted, self.lock_timeout)
        return existed

    def verify(self, key: str, full: bool = False) -> list[str]:
        with contextlib.suppress(OSError):
            self.check_root()
        manifest = self.read_manifest(key)
        if manifest is None:
            return ["no manifest (not committed)"]
        return self.check(self.entry_path(key), manifest, full=full)


class LocalWriter(EntryWriter):
    """Fills a private temp dir next to the entry, then commits it with ``rename``.

    Whoever calls it, it writes only inside its temp dir: every path must be in normal form
    (:func:`hubcache.core.paths.member_path`), nothing is written through a link it created,
    and files are created with ``O_EXCL | O_NOFOLLOW``.
    """

    def __init__(self, store: LocalStore, key: str, handle: str, task: str | None = None):
        self.store = store
        self.key = key
        self.handle = handle
        # `<key>.<task>.tmp`, the task of the download lock held (tensorflow_hub waiting for it
        # watches this dir grow); a fresh one if there is no lock or the name is taken.
        self.tmp = os.path.join(store.root, f"{key}.{task or downloadlock.new_task()}.tmp")
        self._links: set[str] = set()
        self._link_depths: set[int] = set()
        try:
            store.check_root(create=True)
            try:
                os.mkdir(self.tmp, 0o755)
            except FileExistsError:
                self.tmp = os.path.join(store.root, f"{key}.{downloadlock.new_task()}.tmp")
                os.mkdir(self.tmp, 0o755)
        except OSError as error:
            raise _cache_error(error, f"creating {self.tmp}") from None

    def _path(self, path: str) -> str:
        """The full path of ``path`` in the temp dir, after refusing any that could leave it."""
        if paths.member_path(path, what="entry path") != path:
            raise UnsafeArchiveError(f"refusing to write {path!r}: not a path in normal form inside the entry",
                                     member=path)
        if self._links:  # only the links' own depths can be prefixes that are links
            parts = path.split("/")
            for depth in self._link_depths:
                if depth < len(parts) and "/".join(parts[:depth]) in self._links:
                    raise UnsafeArchiveError(f"refusing to write {path!r} through the symlink "
                                             f"{'/'.join(parts[:depth])!r}", member=path)
        # Validated above: a plain concatenation (os.path.join over thousands of names is slow).
        return self.tmp + os.sep + (path if os.sep == "/" else path.replace("/", os.sep))

    def _replace(self, full: str, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)  # an earlier member of the same name (a link is removed, not followed)
        self._links.discard(path)

    def add_dir(self, path: str) -> None:
        full = self._path(path)
        if path in self._links:
            raise UnsafeArchiveError(f"refusing to make {path!r} a directory: it is a symlink", member=path)
        try:
            try:
                os.mkdir(full, 0o755)
            except FileNotFoundError:  # parents first (callers normally add them themselves)
                cut = 0
                while (cut := path.find("/", cut + 1)) > 0:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(os.path.join(self.tmp, *path[:cut].split("/")), 0o755)
                os.mkdir(full, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(full).st_mode):
                raise UnsafeArchiveError(f"refusing to make {path!r} a directory: a file is there", member=path) from None
        except OSError as error:
            raise _cache_error(error, f"creating directory {path}") from None

    def add_file(self, path: str, chunks: Iterable[bytes], executable: bool = False) -> None:
        full = self._path(path)
        try:
            self._replace(full, path)
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | safefs.NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o755 if executable else 0o644)
            with open(fd, "wb", buffering=0) as f:
                for chunk in chunks:
                    f.write(chunk)
        except OSError as error:
            raise _cache_error(error, f"writing {path}") from None

    def add_symlink(self, path: str, target: str) -> None:
        full = self._path(path)
        paths.link_target(path, target, what="entry path")  # never one leaving the entry, whoever asks
        try:
            self._replace(full, path)
            os.symlink(target, full)
        except OSError as error:
            raise _cache_error(error, f"creating symlink {path}") from None
        self._links.add(path)
        self._link_depths.add(path.count("/") + 1)

    def add_hardlink(self, path: str, existing: str) -> None:
        full = self._path(path)
        source = self._path(existing)
        if existing in self._links:
            raise UnsafeArchiveError(f"refusing to link {path!r} to the symlink {existing!r}", member=path)
        try:
            self._replace(full, path)
            try:
                os.link(source, full, follow_symlinks=False)
            except OSError:
                src = safefs.open_file(source, safefs.trusted_owners())
                with os.fdopen(src, "rb") as f:
                    self.add_file(path, iter(lambda: f.read(1 << 20), b""))
        except OSError as error:
            raise _cache_error(error, f"linking {path}") from None

    def commit(self, manifest: Manifest) -> str:
        store, key = self.store, self.key
        entry = store.entry_path(key)
        head = layout.descriptor_text(self.handle)
        wrote_descriptor = renamed = False
        try:
            for _ in range(5):
                if os.path.lexists(entry):
                    # Something is in the way: a committed entry (a racing writer won) or debris.
                    found = store.lookup(key, self.handle)
                    if found is None:
                        store.discard(key)
                    elif self._may_stand(found[1], manifest):
                        self.abort()
                        return found[0]
                    else:
                        self._take_over(entry)
                    continue
                # hubcache's descriptor, no manifest yet: a descriptor left here before (one
                # tensorflow_hub wrote) must not make the renamed dir look like its entry.
                _atomic_write(store.descriptor_path(key), head.encode())
                wrote_descriptor = True
                try:
                    os.rename(self.tmp, entry)
                    renamed = True
                    break
                except OSError as error:
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                        raise
            else:
                raise CacheError(f"could not commit {entry}: it keeps reappearing")
            # Last use: when it became usable. Nothing changes the dir's mtime after this.
            usage.touch(entry)
            # The commit: the descriptor with the manifest, on disk before it replaces the other.
            _atomic_write(store.descriptor_path(key), layout.descriptor_with_manifest(head, manifest.to_json()),
                          durable=True)
        except OSError as error:
            self.abort()
            # Not committed (no manifest): take back what became visible, so a full disk gets
            # its space back and tensorflow_hub never picks up an entry hubcache disowned.
            if renamed:
                store.discard(key)
            if wrote_descriptor:
                with contextlib.suppress(OSError):
                    os.unlink(store.descriptor_path(key))
            raise _cache_error(error, f"committing {entry}") from None
        if key in store._using:
            usage.use(entry)  # in use by this process from now on (before the download lock goes)
        store._drop_legacy(key)
        return entry

    @staticmethod
    def _may_stand(theirs: Manifest, ours: Manifest) -> bool:
        """Whether a complete entry found in the way is kept instead of ours: always, unless ours
        comes from bytes this process verified and theirs does not vouch for the same digest
        (an adopted entry, or one copied from another tier, in the way of a pinned download)."""
        mine = ours.verified_digest()
        return mine is None or theirs.verified_digest() == mine

    def _take_over(self, entry: str) -> None:
        """Remove an unverified entry in the way of a verified one, unless a process uses it."""
        usage.release(entry)  # this process's own shared lock would count as a user
        with usage.exclusive(entry) as busy:
            busy = busy or self.store._in_use(self.key)
            if busy is None:
                self.store.discard(self.key)
                return
        if self.key in self.store._using:
            usage.use(entry)
        raise CacheError(f"{entry} holds an entry hubcache did not verify (adopted from tensorflow_hub "
                         f"or copied from another tier) and it is {busy}, so the verified download "
                         "cannot replace it now", hint="try again when it is no longer in use")

    def abort(self) -> None:
        treewalk.rmtree(self.tmp, ignore_errors=True)
