"""The cache entry protocol on a local filesystem (used by the ``tmp`` and ``home`` backends).

Commit: extract into ``<key>.hc<pid>-<rand>.tmp``, write the descriptor, ``rename`` the temp dir
to ``<key>`` (atomic: tensorflow_hub, which trusts any non-empty entry dir, never sees a partial
one), then write ``<key>.manifest.json`` with ``os.replace`` (atomic: hubcache trusts only
entries with a manifest). A crash at any point leaves either nothing visible or an entry without
a manifest, which hubcache rebuilds. The OS file lock ``<key>.hubcache.lock`` is released by the
kernel when its holder dies, so a crashed downloader never blocks anyone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from typing import Callable, Iterable, Iterator

from .._version import __version__
from .errors import CacheError
from . import usage
from .manifest import FileRecord, Manifest, crc_hex
from .store import EntryInfo, EntryWriter, Store

_KEY = re.compile(r"^[0-9a-f]{40}$")
WRITER_TAG = f"Writer: hubcache {__version__}"


def _atomic_write(path: str, data: bytes) -> None:
    part = f"{path}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not keep our half-written part
            os.unlink(part)
        raise


def _cache_error(error: OSError, what: str) -> CacheError:
    if error.errno == errno.ENOSPC:
        return CacheError(f"no space left on the device while {what}", hint="free space or set TFHUB_CACHE_DIR elsewhere")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(f"the cache is not writable ({error.strerror}) while {what}",
                          hint="set TFHUB_CACHE_DIR to a writable directory")
    return CacheError(f"{error.strerror or error} while {what}")


def describe_model_dir(path: str) -> list[str]:
    """Problems that make a directory an incomplete SavedModel or hub module (``[]``: complete).

    Used to adopt entries written by tensorflow_hub, which have no manifest.
    """
    try:
        names = set(os.listdir(path))
    except OSError:
        return ["the entry directory is missing"]
    if not names:
        return ["the entry directory is empty"]
    markers = [n for n in ("saved_model.pb", "saved_model.pbtxt", "tfhub_module.pb") if n in names]
    if not markers:
        return ["no saved_model.pb, saved_model.pbtxt or tfhub_module.pb"]
    problems = [f"{m} is empty" for m in markers if os.path.getsize(os.path.join(path, m)) == 0]
    variables = os.path.join(path, "variables")
    if os.path.isfile(os.path.join(variables, "variables.index")):
        shards = [n for n in os.listdir(variables) if n.startswith("variables.data-")]
        match = re.match(r"variables\.data-\d+-of-(\d+)$", shards[0]) if shards else None
        count = int(match.group(1)) if match else 1
        for i in range(count):
            if f"variables.data-{i:05d}-of-{count:05d}" not in shards:
                problems.append(f"variables shard {i} of {count} is missing")
    return problems


def scan_files(path: str, *, digests: bool = True) -> Manifest:
    """Build the file lists of a manifest by walking a directory."""
    manifest = Manifest(handle="")
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                filenames.append(d)
            else:
                manifest.dirs.append(rel + d)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                manifest.symlinks[rel + name] = os.readlink(full)
                continue
            crc = 0
            if digests:
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        crc = zlib.crc32(chunk, crc)
            manifest.files.append(FileRecord(rel + name, os.path.getsize(full), crc_hex(crc)))
    manifest.files.sort(key=lambda f: f.path)
    manifest.dirs.sort()
    return manifest


class LocalStore(Store):
    """Entries in a local directory.

    Args:
        root: the cache directory (created on the first download).
        lock_timeout: seconds to wait for another process downloading the same handle.
    """

    def __init__(self, root: str, *, lock_timeout: float = 3600.0):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.lock_timeout = lock_timeout

    # -- paths --------------------------------------------------------------------------------

    def entry_path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def manifest_path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.manifest.json")

    def descriptor_path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.descriptor.txt")

    def lock_path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.hubcache.lock")

    def use_path(self, key: str) -> str:
        """The file whose shared locks mark the entry in use and whose mtime is its last use."""
        return os.path.join(self.root, f"{key}.hubcache.use")

    # -- reading ------------------------------------------------------------------------------

    def read_manifest(self, key: str) -> Manifest | None:
        """The entry's manifest, or ``None`` if it has no readable one."""
        try:
            with open(self.manifest_path(key), "rb") as f:
                return Manifest.from_json(f.read())
        except (OSError, ValueError):
            return None

    def check(self, path: str, manifest: Manifest, full: bool = False) -> list[str]:
        """Compare an entry directory with its manifest."""
        problems = []
        for record in manifest.files:
            file = os.path.join(path, record.path)
            try:
                size = os.stat(file).st_size
            except OSError:
                problems.append(f"{record.path} is missing")
                continue
            if size != record.size:
                problems.append(f"{record.path} has {size} bytes, expected {record.size}")
            elif full:
                crc = 0
                with open(file, "rb") as f:
                    while chunk := f.read(1 << 20):
                        crc = zlib.crc32(chunk, crc)
                if crc_hex(crc) != record.crc32:
                    problems.append(f"{record.path} has CRC-32 {crc_hex(crc)}, expected {record.crc32}")
        for link in manifest.symlinks:
            if not os.path.islink(os.path.join(path, link)):
                problems.append(f"symlink {link} is missing")
        for d in manifest.dirs:
            if not os.path.isdir(os.path.join(path, d)):
                problems.append(f"directory {d} is missing")
        if not manifest.files and not manifest.dirs and not os.path.isdir(path):
            problems.append("the entry directory is missing")
        return problems

    def lookup(self, key: str, handle: str) -> tuple[str, Manifest] | None:
        path = self.entry_path(key)
        manifest = self.read_manifest(key)
        if manifest is None:
            return self._adopt(key, handle)
        if self.check(path, manifest):
            return None
        return path, manifest

    def _is_foreign(self, key: str) -> bool:
        """True for an entry tensorflow_hub wrote (its descriptor does not name hubcache)."""
        try:
            with open(self.descriptor_path(key), encoding="utf-8", errors="replace") as f:
                return "Writer: hubcache" not in f.read()
        except OSError:
            return False

    def _adopt(self, key: str, handle: str) -> tuple[str, Manifest] | None:
        path = self.entry_path(key)
        if not os.path.isdir(path) or not self._is_foreign(key) or describe_model_dir(path):
            return None
        # Digests mean reading every byte: worth it only when the manifest can be kept. A
        # read-only (shared) cache gets a sizes-only manifest in memory and writes nothing.
        writable = os.access(self.root, os.W_OK)
        manifest = scan_files(path, digests=writable)
        manifest.handle = handle
        manifest.creator = "adopted from tensorflow_hub"
        if writable:
            with contextlib.suppress(OSError):  # e.g. a full disk: still a hit
                _atomic_write(self.manifest_path(key), manifest.to_json())
        return path, manifest

    def validator(self, path: str, manifest: Manifest) -> Callable[[], bool]:
        # One stat per memoised hit, of the file TensorFlow opens first (a temp cleaner deleting
        # it is the "SavedModel file does not exist" failure); else the first file, or the dir.
        names = {f.path for f in manifest.files}
        first = next((n for n in ("saved_model.pb", "saved_model.pbtxt", "tfhub_module.pb") if n in names),
                     manifest.files[0].path if manifest.files else None)
        sentinel = os.path.join(path, first) if first else path
        use = self.use_path(os.path.basename(path))

        def still_valid() -> bool:
            # In use again first (a prefetch may have released it), then check it is still there.
            usage.use(use)  # held already: a dict lookup and a clock read
            return os.path.exists(sentinel)

        return still_valid

    # -- use tracking (see hubcache.core.usage) ---------------------------------------------------

    def mark_used(self, key: str) -> None:
        if not os.path.isdir(self.root):
            with contextlib.suppress(OSError):
                os.makedirs(self.root, exist_ok=True)
        usage.use(self.use_path(key))

    def release(self, key: str) -> None:
        usage.release(self.use_path(key))

    def _foreign_download(self, key: str) -> str | None:
        # tensorflow_hub announces its download with a plain `<key>.lock` file (no OS lock).
        try:
            age = time.time() - os.stat(os.path.join(self.root, f"{key}.lock")).st_mtime
        except OSError:
            return None
        return "being downloaded by tensorflow_hub (its .lock file is there)" if age < self.lock_timeout else None

    def _downloading(self, key: str) -> str | None:
        if usage.probe(self.lock_path(key)) is not None:
            return f"being downloaded ({self._holder(key)})"
        return self._foreign_download(key)

    def busy(self, key: str) -> str | None:
        # The download lock first: a downloader also holds the use lock, and this says more.
        return self._downloading(key) or usage.probe(self.use_path(key))

    @contextlib.contextmanager
    def guard(self, key: str) -> Iterator[str | None]:
        reason = self._downloading(key)
        if reason is not None:
            yield reason
            return
        with usage.exclusive(self.use_path(key)) as in_use:
            if in_use is not None:
                yield in_use
                return
            with usage.exclusive(self.lock_path(key)) as downloading:
                if downloading is not None:
                    yield f"being downloaded ({self._holder(key)})"
                    return
                try:
                    yield None
                finally:
                    if not os.path.lexists(self.entry_path(key)) and not os.path.exists(self.manifest_path(key)):
                        usage.forget(self.use_path(key))

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[str], None]) -> Iterator[None]:
        import filelock

        try:
            os.makedirs(self.root, exist_ok=True)
            lock = filelock.FileLock(self.lock_path(key))
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                on_wait(self._holder(key))
                try:
                    lock.acquire(timeout=self.lock_timeout)
                except filelock.Timeout:
                    raise CacheError(f"another process has been downloading this for over "
                                     f"{self.lock_timeout:.0f} s ({self._holder(key)})",
                                     hint="raise HUBCACHE_LOCK_TIMEOUT or try again later") from None
        except OSError as error:
            raise _cache_error(error, f"locking {self.lock_path(key)}") from None
        try:
            with contextlib.suppress(OSError):
                _atomic_write(self._owner_path(key), f"{socket.gethostname()} pid {os.getpid()}".encode())
            yield
        finally:
            lock.release()

    def _owner_path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.hubcache.owner")

    def _holder(self, key: str) -> str:
        try:
            with open(self._owner_path(key), encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return "unknown"

    def writer(self, key: str, handle: str) -> LocalWriter:
        return LocalWriter(self, key, handle)

    def cleanup(self, key: str) -> None:
        # Every hubcache writer of this key holds the lock while it writes, so whatever
        # temp dir, trash dir or half-written file of ours is here now was abandoned.
        root = glob.escape(self.root)
        for leftover in glob.glob(os.path.join(root, f"{key}.hc*.tmp")) + glob.glob(os.path.join(root, f"{key}.hc*.trash")):
            shutil.rmtree(leftover, ignore_errors=True)
        for part in glob.glob(os.path.join(root, f"{key}.*.part")):
            with contextlib.suppress(OSError):
                os.unlink(part)

    def discard(self, key: str) -> None:
        """Remove an entry's manifest, then its directory (never seen half-removed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.manifest_path(key))
        path = self.entry_path(key)
        if os.path.lexists(path):
            trash = f"{path}.hc{os.getpid()}-{uuid.uuid4().hex[:8]}.trash"
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    # -- listing and maintenance ----------------------------------------------------------------

    def entries(self) -> Iterator[EntryInfo]:
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return
        keys: dict[str, set[str]] = {}
        for name in names:
            key = name.split(".", 1)[0]
            if _KEY.match(key):
                keys.setdefault(key, set()).add(name[len(key):])
        for key, suffixes in keys.items():
            info = self._info(key, suffixes)
            if info is not None:
                yield info

    def entry(self, key: str) -> EntryInfo | None:
        try:
            names = os.listdir(self.root)
        except OSError:
            return None
        return self._info(key, {name[len(key):] for name in names if name.startswith(key)})

    def _info(self, key: str, suffixes: set[str]) -> EntryInfo | None:
        path = self.entry_path(key)
        manifest = self.read_manifest(key)
        in_progress = any(s.endswith(".tmp") for s in suffixes)
        if manifest is not None and "" in suffixes and not self.check(path, manifest):
            state = "committed"
        elif manifest is None and "" in suffixes and self._is_foreign(key) and not describe_model_dir(path):
            state = "foreign"
        elif in_progress:
            state = "in progress"
        elif "" in suffixes or manifest is not None:
            state = "damaged"
        else:
            return None
        size = manifest.total_bytes if manifest else _du(path)
        last = usage.last_used(self.use_path(key))
        if last is None:
            with contextlib.suppress(OSError):
                last = manifest.created if manifest else os.stat(path).st_mtime
        return EntryInfo(key, path, state, manifest, size, last, manifest.handle if manifest else self._module(key))

    def _module(self, key: str) -> str | None:
        """The handle a descriptor names (``Module: ...``, as tensorflow_hub writes it)."""
        try:
            with open(self.descriptor_path(key), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("Module: "):
                        return line[len("Module: "):].strip()
        except OSError:
            pass
        return None

    def remove(self, key: str) -> bool:
        existed = os.path.lexists(self.entry_path(key)) or os.path.exists(self.manifest_path(key))
        self.discard(key)
        for suffix in (".descriptor.txt", ".hubcache.owner"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, key + suffix))
        return existed

    def verify(self, key: str, full: bool = False) -> list[str]:
        manifest = self.read_manifest(key)
        if manifest is None:
            return ["no manifest (not committed)"]
        return self.check(self.entry_path(key), manifest, full=full)


def _du(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class LocalWriter(EntryWriter):
    """Fills a private temp dir next to the entry, then commits it with ``rename``."""

    def __init__(self, store: LocalStore, key: str, handle: str):
        self.store = store
        self.key = key
        self.handle = handle
        self.tmp = os.path.join(store.root, f"{key}.hc{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.makedirs(self.tmp)
        except OSError as error:
            raise _cache_error(error, f"creating {self.tmp}") from None

    def _path(self, path: str) -> str:
        return os.path.join(self.tmp, *path.split("/"))

    def _replace(self, full: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)

    def add_dir(self, path: str) -> None:
        try:
            os.makedirs(self._path(path), exist_ok=True)
        except OSError as error:
            raise _cache_error(error, f"creating directory {path}") from None

    def add_file(self, path: str, chunks: Iterable[bytes], executable: bool = False) -> None:
        full = self._path(path)
        try:
            self._replace(full)
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o755 if executable else 0o644)
            with open(fd, "wb", buffering=0) as f:
                for chunk in chunks:
                    f.write(chunk)
        except OSError as error:
            raise _cache_error(error, f"writing {path}") from None

    def add_symlink(self, path: str, target: str) -> None:
        full = self._path(path)
        try:
            self._replace(full)
            os.symlink(target, full)
        except OSError as error:
            raise _cache_error(error, f"creating symlink {path}") from None

    def add_hardlink(self, path: str, existing: str) -> None:
        full = self._path(path)
        try:
            self._replace(full)
            try:
                os.link(self._path(existing), full)
            except OSError:
                shutil.copyfile(self._path(existing), full)
        except OSError as error:
            raise _cache_error(error, f"linking {path}") from None

    def commit(self, manifest: Manifest) -> str:
        store, key = self.store, self.key
        entry = store.entry_path(key)
        wrote_descriptor = renamed = False
        try:
            descriptor = (f"Module: {self.handle}\nDownload Time: {time.ctime()}\n"
                          f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})\n{WRITER_TAG}\n")
            _atomic_write(store.descriptor_path(key), descriptor.encode())
            wrote_descriptor = True
            for _ in range(5):
                try:
                    os.rename(self.tmp, entry)
                    renamed = True
                    break
                except OSError as error:
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                        raise
                # Something is in the way: a committed entry (a racing writer won) or debris.
                found = store.lookup(key, self.handle)
                if found is not None:
                    self.abort()
                    return found[0]
                store.discard(key)
            else:
                raise CacheError(f"could not commit {entry}: it keeps reappearing")
            _atomic_write(store.manifest_path(key), manifest.to_json())
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
        usage.touch(store.use_path(key))  # last use: when it became usable, not when the download began
        return entry

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
