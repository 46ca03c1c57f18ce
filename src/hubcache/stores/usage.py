"""Which local cache entries are in use, and when each was last used.

*In use* means: a live process resolved the entry and may still read files from it (TensorFlow
reads some assets lazily, and a TF1 hub module is read when its graph is built). The only thing
that knows when such a process is done with a path is the kernel, when the process exits, so:

- a process that resolves an entry takes a **shared** ``flock`` on ``<key>.hubcache.use`` and
  keeps it until it exits (or calls :func:`release`); the kernel drops it however the process
  dies, so a crash never pins an entry forever;
- whatever removes entries (``hubcache rm``, ``hubcache prune``, the size budget) first takes an
  **exclusive, non-blocking** lock on that file (and on the download lock ``<key>.hubcache.lock``)
  and skips the entry if it cannot.

A resolving process takes its shared lock *before* it looks the entry up, so it either finds the
entry already gone (and downloads it again) or keeps a remover from starting: there is no window
in which it returns a path that is being deleted. ``flock`` locks taken through different
``open`` calls conflict even inside one process, so an entry this very process uses is protected
from its own evictions too.

Last use is the mtime of the same file, set when a process first uses the entry and refreshed on
later (memoised) hits at most every :data:`REFRESH_SECONDS`: a hot loop of resolves costs one
clock read each, not a write.

Use files are opened through :mod:`hubcache.stores.safefs` (no link followed, no blocking open, only
a regular file of a trusted owner): one another user planted is replaced when this user owns the
cache directory, else ignored (no protection, never an error). Anyone who can read a use file can
lock it, so a user waits at most :data:`SHARED_WAIT_SECONDS` for a remover's exclusive lock, then
goes on unprotected (the remover unlinks the manifest first, so that is a miss, not a torn hit).

Limits: a process holds at most :data:`MAX_HELD` shared locks (one file descriptor each); past
that its least recently resolved entries lose protection. Processes that do not use hubcache
(tensorflow_hub itself) take no lock. Where ``fcntl`` is missing (Windows) an entry counts as in
use for :data:`WINDOW_SECONDS` after its last recorded use instead.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from typing import Iterator

from . import safefs

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Seconds between two refreshes of an entry's last-use time by one process.
REFRESH_SECONDS = 600.0
#: Shared locks one process holds at most (each is an open file descriptor).
MAX_HELD = 256
#: Without ``fcntl``: seconds after its last use during which an entry counts as in use.
WINDOW_SECONDS = 600.0
#: Seconds a user waits for a remover's exclusive lock before going on without a shared one (a
#: removal takes less; a process of another user holding the lock forever must not stall us).
SHARED_WAIT_SECONDS = 10.0

_held: OrderedDict[str, int] = OrderedDict()
_touched: dict[str, float] = {}
_lock = threading.Lock()


def _same_file(fd: int, path: str) -> bool:
    """True if ``path`` still names the file open as ``fd`` (a remover may have unlinked it)."""
    try:
        st, fst = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _touch(fd: int | None, path: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: no last-use record, still a hit
        if fd is not None and os.utime in os.supports_fd:
            os.utime(fd)
        else:
            os.utime(path)
    _touched[path] = time.monotonic()


def use(path: str) -> None:
    """Mark the entry whose use file is ``path`` as used by this process, until it exits.

    Called on every resolve, memoised hits included: when the lock is already held this costs
    a dictionary lookup and a clock read (and a write every REFRESH_SECONDS). Blocks only while
    a remover holds the exclusive lock (the time of one removal). Never raises: in a read-only
    cache nobody can remove entries, so there is nothing to hold off.
    """
    fd = _held.get(path)
    if fd is not None:
        if time.monotonic() - _touched.get(path, 0.0) > REFRESH_SECONDS:
            _touch(fd, path)
        return
    if fcntl is None:  # pragma: no cover - Windows
        with contextlib.suppress(OSError):
            with open(path, "ab"):
                pass
        _touch(None, path)
        return
    trusted = safefs.trusted_in(os.path.dirname(path))
    for _ in range(10):
        try:
            # 0644: other users reading a shared cache lock it too, keeping its owner's prune off.
            fd = safefs.open_lock(path, trusted, mode=0o644)
        except safefs.UnsafeFileError:
            return  # planted by someone else where we cannot replace it: no protection
        except OSError:
            fd = safefs.open_existing(path, trusted)  # a read-only cache: a shared lock needs no write
            if fd is None:
                return
        if not _lock_shared(fd, path, trusted):
            os.close(fd)
            return
        if _same_file(fd, path):
            break
        os.close(fd)  # a remover unlinked it while we waited: lock the new one
    else:
        return
    _touch(fd, path)
    with _lock:
        old = _held.pop(path, None)
        _held[path] = fd
        while len(_held) > MAX_HELD:
            _, oldest = _held.popitem(last=False)
            os.close(oldest)
    if old is not None:  # another thread of ours got there first
        os.close(old)


def _lock_shared(fd: int, path: str, trusted: frozenset[int]) -> bool:
    """Take a shared lock, waiting at most SHARED_WAIT_SECONDS for an exclusive holder (and not
    at all for one of an untrusted user: no remover of this cache runs as them)."""
    deadline = time.monotonic() + SHARED_WAIT_SECONDS
    pause = 0.001
    first = True
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if first and any(uid not in trusted for uid in holder_uids(path)):
                return False
            first = False
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        except OSError:
            return False


def touch(path: str) -> None:
    """Record a use now (e.g. when a download this process made is committed)."""
    with _lock:
        fd = _held.get(path)
    _touch(fd, path)


def release(path: str) -> None:
    """Stop holding the entry (e.g. after a prefetch, which does not use what it fetches)."""
    with _lock:
        fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def last_used(path: str) -> float | None:
    """The Unix time of the entry's last recorded use, or ``None`` if it has none (or it is not a
    use file a trusted user made)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if safefs.problem(st, safefs.trusted_in(os.path.dirname(path)), others_may_write=True) is not None:
        return None
    mtime = st.st_mtime
    return mtime or None  # 0: created by a remover, never used (see exclusive)


def holders(path: str) -> list[int]:
    """Process ids holding a lock on ``path``, where the OS tells (Linux ``/proc/locks``)."""
    try:
        st = os.lstat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF" (blocked waiters carry a "->" field)
        if "->" in fields:
            continue
        if len(fields) >= 6 and fields[5] == wanted and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def holder_uids(path: str) -> list[int]:
    """Effective user ids of the processes holding a lock on ``path``, where the OS tells
    (Linux ``/proc``; a process whose status cannot be read is left out)."""
    uids = []
    for pid in holders(path):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uids.append(int(line.split()[2]))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return uids


def _users_text(path: str) -> str:
    pids = holders(path)
    if not pids:
        return "in use by a running process"
    if pids == [os.getpid()]:
        return "in use by this process"
    return "in use by pid " + ", ".join(str(p) for p in pids)


def probe(path: str) -> str | None:
    """Why the entry is in use, or ``None`` if it is not. Creates and changes nothing."""
    if fcntl is None:  # pragma: no cover - Windows
        when = last_used(path)
        return "used recently" if when is not None and time.time() - when < WINDOW_SECONDS else None
    fd = safefs.open_existing(path, safefs.trusted_in(os.path.dirname(path)))
    if fd is None:
        return None  # no use file (or a planted one, which protects nothing): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return _users_text(path)
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def exclusive(path: str, mode: int = 0o644) -> Iterator[str | None]:
    """Hold off every user of the entry while the block runs.

    Yields ``None`` when nobody uses the entry (users then wait until the block ends), or why
    it is in use (the block must then leave the entry alone). Call :func:`forget` inside the
    block after removing the entry. ``mode``: permissions of the file if it is created here.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield probe(path)
        return
    trusted = safefs.trusted_in(os.path.dirname(path))
    fd: int | None
    try:
        fd = safefs.open_file(path, trusted, flags=os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=mode)
        # Created here, not by a use: mtime 0 reads as "no use recorded", so the entry keeps
        # its age (from its manifest) if the removal does not go ahead.
        with contextlib.suppress(OSError):
            os.utime(fd, (0, 0)) if os.utime in os.supports_fd else os.utime(path, (0, 0))
    except FileExistsError:
        fd = _open_existing(path, trusted, mode)
    except OSError:
        fd = None
    if fd is None:
        yield None  # cannot even create the file in the cache dir: nobody can be holding it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield _users_text(path)
            return
        if not _same_file(fd, path):  # another remover unlinked it: it is theirs now
            yield "being removed by another process"
            return
        yield None
    finally:
        os.close(fd)


def _open_existing(path: str, trusted: frozenset[int], mode: int) -> int | None:
    try:
        return safefs.open_lock(path, trusted, mode=mode)  # a planted one is replaced if we can
    except OSError:
        return safefs.open_existing(path, trusted)


def forget(path: str) -> None:
    """Delete the use file of a removed entry (call inside :func:`exclusive`, after removal).

    Users blocked on the old file notice it was unlinked and lock a fresh one.
    """
    with contextlib.suppress(OSError):
        os.unlink(path)
    _touched.pop(path, None)
