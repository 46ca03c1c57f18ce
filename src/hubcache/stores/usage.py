"""Which local cache entries are in use, and when each was last used.

*In use* means: a live process resolved the entry and may still read files from it (TensorFlow
reads some assets lazily, and a TF1 hub module is read when its graph is built). The only thing
that knows when such a process is done with a path is the kernel, when the process exits, so:

- a process that resolves an entry takes a **shared** ``flock`` on the entry directory itself
  (opened ``O_RDONLY | O_DIRECTORY``, never through a link) and keeps it until it exits (or calls
  :func:`release`); the kernel drops it however the process dies, so a crash never pins an entry
  forever. Nothing is created for it: the cache directory holds no file per use;
- whatever removes entries (``hubcache rm``, ``hubcache prune``, the size budget) first takes an
  **exclusive, non-blocking** lock on the same directory (and the download lock
  ``<key>.lock``) and skips the entry if it cannot.

A resolving process takes its shared lock *before* it checks the entry, and checks that the
path still names the directory it locked, so it either finds the entry already gone (and
downloads it again) or keeps a remover from starting: there is no window in which it returns a
path that is being deleted. ``flock`` locks taken through different ``open`` calls conflict even
inside one process, so an entry this very process uses is protected from its own evictions too.
An entry that did not exist yet when a resolve began is locked by the store once it finds or
commits it (``LocalStore.mark_used``).

**Last use** is the entry directory's mtime. Nothing changes it after the commit (a writer fills
its temp dir before the ``rename``), so it is free to record uses in: the commit sets it, and a
use sets it again only when the recorded one is :data:`RECORD_SECONDS` (a day) old or more. A hit
on an entry used within the day therefore writes nothing at all; a long-running process looks
again (one ``fstat``) at most every :data:`REFRESH_SECONDS`.

Entry directories are opened through :mod:`hubcache.stores.safefs` (no link followed, a real
directory of a trusted owner, not writable by others); anything else protects nothing and is
never an error. Anyone who can read an entry can lock it, so a user waits at most
:data:`SHARED_WAIT_SECONDS` for a remover's exclusive lock, then goes on unprotected (the remover
removes the descriptor first, so that is a miss, not a torn hit).

Limits: a process holds at most :data:`MAX_HELD` shared locks (one file descriptor each); past
that its least recently resolved entries lose protection. Processes that do not use hubcache
(tensorflow_hub itself) take no lock. Where directories cannot be locked (no ``fcntl`` on
Windows; an NFS mount without ``local_lock=flock`` refuses an exclusive lock on a directory) an
entry counts as in use while its last recorded use is less than :data:`RECORD_SECONDS` old.
"""

from __future__ import annotations

import contextlib
import errno
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

#: Seconds a recorded use stays good: a use within them writes nothing.
RECORD_SECONDS = 86400.0
#: Seconds between two looks at an entry's recorded use by one process (memoised hits).
REFRESH_SECONDS = 600.0
#: Shared locks one process holds at most (each is an open file descriptor).
MAX_HELD = 256
#: Seconds a user waits for a remover's exclusive lock before going on without a shared one (a
#: removal takes less; a process of another user holding the lock forever must not stall us).
SHARED_WAIT_SECONDS = 10.0

_held: OrderedDict[str, int] = OrderedDict()
_looked: dict[str, float] = {}
_lock = threading.Lock()


def _same_file(fd: int, path: str) -> bool:
    """True if ``path`` still names the file open as ``fd`` (a remover may have moved it)."""
    try:
        st, fst = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _open(path: str) -> int | None:
    """The entry directory, opened safely for ``flock``; ``None`` if absent or not trusted."""
    try:
        return safefs.open_dir(path, safefs.trusted_in(os.path.dirname(path)))
    except OSError:
        return None


def _utime(fd: int | None, path: str) -> None:
    with contextlib.suppress(OSError, NotImplementedError):  # read-only or another user's: no record
        if fd is not None and os.utime in os.supports_fd:
            os.utime(fd)
        elif os.utime in os.supports_follow_symlinks:
            os.utime(path, follow_symlinks=False)  # a link planted in its place is not followed
        else:  # pragma: no cover - Windows
            os.utime(path)


def _record(fd: int | None, path: str) -> None:
    """Record a use now, unless one within :data:`RECORD_SECONDS` is on record already."""
    _looked[path] = time.monotonic()
    try:
        st = os.fstat(fd) if fd is not None else os.lstat(path)
    except OSError:
        return
    if abs(time.time() - st.st_mtime) < RECORD_SECONDS:
        return  # recent (a time in the future, a clock set back, is corrected once it is a day off)
    _utime(fd, path)


def use(path: str) -> None:
    """Mark the entry directory ``path`` as used by this process, until it exits.

    Called on every resolve, memoised hits included: when the lock is already held this costs
    a dictionary lookup and a clock read (and an ``fstat`` every REFRESH_SECONDS). Blocks only
    while a remover holds the exclusive lock (the time of one removal). Does nothing if the
    directory is absent (a miss: the store calls it again once the entry is there). Never raises.
    """
    fd = _held.get(path)
    if fd is not None:
        if time.monotonic() - _looked.get(path, 0.0) > REFRESH_SECONDS:
            _record(fd, path)
        return
    if fcntl is None:  # pragma: no cover - Windows
        _record(None, path)
        return
    trusted = safefs.trusted_in(os.path.dirname(path))
    for _ in range(10):
        fd = _open(path)
        if fd is None:
            return
        if not _lock_shared(fd, path, trusted):
            os.close(fd)
            return
        if _same_file(fd, path):
            break
        os.close(fd)  # a remover moved it away while we waited: lock what is there now
    else:
        return
    _record(fd, path)
    with _lock:
        old = _held.pop(path, None)
        _held[path] = fd
        while len(_held) > MAX_HELD:
            _, oldest = _held.popitem(last=False)
            os.close(oldest)
    if old is not None:  # another thread of ours got there first
        os.close(old)


def held(path: str) -> bool:
    """Whether this process holds its shared lock on the entry directory ``path``."""
    return path in _held


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
    """Record a use now, whatever is on record (when a download this process made is committed)."""
    with _lock:
        fd = _held.get(path)
    _utime(fd, path)
    _looked[path] = time.monotonic()


def release(path: str) -> None:
    """Stop holding the entry (e.g. after a prefetch, which does not use what it fetches)."""
    with _lock:
        fd = _held.pop(path, None)
    _looked.pop(path, None)
    if fd is not None:
        os.close(fd)


def last_used(path: str) -> float | None:
    """The Unix time of the entry directory's last recorded use (its mtime), or ``None`` if it
    is not a real directory of a trusted user."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if safefs.problem(st, safefs.trusted_in(os.path.dirname(path)), kind="dir", others_may_write=True) is not None:
        return None
    return st.st_mtime or None


def holders(path: str) -> list[int]:
    """Process ids holding a lock on ``path`` (a file or a directory), where the OS tells
    (Linux ``/proc/locks``)."""
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


def users_text(path: str) -> str:
    """``in use by pid N`` (or by this process, or by a running process when the OS does not say)."""
    pids = holders(path)
    if not pids:
        return "in use by a running process"
    if pids == [os.getpid()]:
        return "in use by this process"
    return "in use by pid " + ", ".join(str(p) for p in pids)


def _unlockable(path: str) -> str | None:
    """Where directories cannot be locked: in use if used within :data:`RECORD_SECONDS`."""
    when = last_used(path)
    if when is not None and time.time() - when < RECORD_SECONDS:
        return "used within a day (this file system cannot lock directories)"
    return None


def probe(path: str) -> str | None:
    """Why the entry directory ``path`` is in use, or ``None`` if it is not. Changes nothing."""
    if fcntl is None:  # pragma: no cover - Windows
        return _unlockable(path)
    fd = _open(path)
    if fd is None:
        return None  # no entry (or not one we trust, which protects nothing): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return users_text(path)
    except OSError:
        return _unlockable(path)
    finally:
        os.close(fd)
    return None


def probe_file(path: str) -> str | None:
    """Why a lock or use file an older hubcache made is held (``in use by pid N``), else
    ``None`` (absent, planted, or free). Changes nothing."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    fd = safefs.open_existing(path, safefs.trusted_in(os.path.dirname(path)))
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return users_text(path)
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[str | None]:
    """Hold off every user of the entry directory ``path`` while the block runs.

    Yields ``None`` when nobody uses the entry (users then wait until the block ends), or why
    it is in use (the block must then leave the entry alone). Creates nothing: with no
    directory there, nobody can be using it.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield probe(path)
        return
    fd = _open(path)
    if fd is None:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield users_text(path)
            return
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # pragma: no cover - BlockingIOError
                yield users_text(path)
            else:
                yield _unlockable(path)
            return
        if not _same_file(fd, path):  # another remover moved it away: it is theirs now
            yield "being removed by another process"
            return
        yield None
    finally:
        os.close(fd)
