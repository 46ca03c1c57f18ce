"""A local store's download lock: ``<key>.lock``, tensorflow_hub's own name, there only while a
download runs.

tensorflow_hub announces a download with a plain file ``<key>.lock`` holding
``<host>.<pid>.<task>`` and downloads into ``<key>.<task>.tmp``; another tensorflow_hub process
waits while the file exists, and deletes it as abandoned when neither its content nor the size
of that temp dir changed for ten minutes (``resolver._wait_for_lock_to_disappear``). hubcache
writes the same file in the same format, with its writer's temp dir as the task, so:

- a tensorflow_hub process waits for hubcache's download, watches it progress, and finds the
  entry committed when the file goes;
- hubcache waits for tensorflow_hub's download (a ``.lock`` whose task is not hubcache's),
  judging it as tensorflow_hub would not have to: dead at once when its host is this one and
  its pid is gone, else abandoned once it is ``stale_after`` seconds old;
- between hubcache processes the file is also ``flock``-ed: liveness is the kernel's, so a
  holder killed with ``SIGKILL`` never blocks the next resolve, which takes the file over at
  once (its content says hubcache wrote it, and nobody holds its lock).

The file is unlinked by its holder before the lock is released, so a waiter that gets the lock
checks that the path still names the inode it locked (``fstat`` against ``lstat``) and starts
over if not. It is opened through :mod:`hubcache.stores.safefs` (no link followed, never
blocking, ``0600``: a lock file others can open is one they can hold forever); what is read
from it is capped and shown through :func:`hubcache.core.entry.printable`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
import uuid
from typing import Callable

from ..core import entry as layout
from ..core.errors import CacheError
from . import safefs, usage

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Largest lock file read (tensorflow_hub's are under 200 bytes).
MAX_LOCK_BYTES = 4096
_POLL = 0.05


class Busy(Exception):
    """The lock is held and the caller would not wait: ``holder`` says by whom (``host pid N``),
    ``tensorflow_hub`` whether it is tensorflow_hub's plain lock file."""

    def __init__(self, holder: str, tensorflow_hub: bool = False):
        super().__init__(holder)
        self.holder = holder
        self.tensorflow_hub = tensorflow_hub

    @property
    def reason(self) -> str:
        """``being downloaded (host pid N)`` or ``being downloaded by tensorflow_hub (host pid N)``."""
        return f"being downloaded{' by tensorflow_hub' if self.tensorflow_hub else ''} ({self.holder})"


class _Replaced(Exception):
    """A lock file held by an untrusted user was unlinked: open the fresh one."""


def new_task() -> str:
    """A task name for a lock and its writer's temp dir (``hc<pid>-<random>``)."""
    return f"{layout.LOCK_TASK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _read_fd(fd: int) -> str:
    try:
        data = os.pread(fd, MAX_LOCK_BYTES, 0)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def read(path: str, trusted: frozenset[int]) -> str | None:
    """The text of the lock file (capped), or ``None`` if absent or not one to trust."""
    try:
        return safefs.read_file(path, trusted, limit=MAX_LOCK_BYTES).decode("utf-8", "replace")
    except OSError:
        return None


def holder(path: str, trusted: frozenset[int]) -> str:
    """Who the lock file names (``host pid N``), else ``unknown``."""
    return layout.lock_holder(read(path, trusted))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def plain_lock_alive(text: str, mtime: float, stale_after: float) -> bool:
    """Whether a lock nobody ``flock``-s (tensorflow_hub's) still stands for a live download:
    for ``stale_after`` seconds after it was written, and on this host only while its process
    lives (tensorflow_hub itself would wait up to twenty minutes for a dead one)."""
    if time.time() - mtime >= stale_after:
        return False
    parsed = layout.parse_lock(text)
    return parsed is None or parsed[0] != socket.gethostname() or _pid_alive(parsed[1])


def _same(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.lstat(path), os.fstat(fd))
    except OSError:
        return False


def acquire(path: str, trusted: frozenset[int], *, wait: float | None, stale_after: float,
            on_wait: Callable[[str], None], task: str | None = None) -> tuple[int, str]:
    """Take the download lock ``path``; returns ``(fd, task)`` (release with :func:`release`).

    Args:
        path: ``<root>/<key>.lock``.
        trusted: the owners whose files the cache uses.
        wait: seconds to wait for another live holder (hubcache's or tensorflow_hub's); ``None``:
            do not wait, raise :class:`Busy`.
        stale_after: age after which a tensorflow_hub lock of another host counts as abandoned.
        on_wait: called once with the holder (``host pid N``) if this call waits.
        task: the task written into the file (default: :func:`new_task`): the writer's temp dir
            is ``<key>.<task>.tmp``, which tensorflow_hub watches.

    Raises:
        Busy: held and ``wait`` is ``None``.
        CacheError: a live holder kept it for ``wait`` seconds, or it keeps being replaced.
        UnsafeFileError: a planted lock file (a link, a FIFO, another user's) this user cannot
            replace (it does not own the root), or one a process of an untrusted user holds.
        OSError: the lock file cannot be made.
    """
    task = task or new_task()
    text = layout.lock_text(task).encode()
    if fcntl is None:  # pragma: no cover - Windows: plain files, judged like tensorflow_hub's
        return _acquire_plain(path, trusted, text, wait, stale_after, on_wait), task
    deadline: float | None = None
    for _ in range(100):
        # 0600: a lock file another user can open is one they can hold forever.
        fd = safefs.open_lock(path, trusted, mode=0o600)
        locked = False
        try:
            st = os.fstat(fd)
            if st.st_uid == safefs.euid() and stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, 0o600)  # tensorflow_hub's (umask) or made by another tool
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                if deadline is None:
                    _refuse_untrusted_holder(path, trusted)
                    who = layout.lock_holder(_read_fd(fd))
                    if wait is None:
                        raise Busy(who)
                    deadline = time.monotonic() + wait
                    on_wait(who)
                if time.monotonic() >= deadline:
                    raise CacheError(f"another process has been downloading this for over {wait:.0f} s "
                                     f"({layout.lock_holder(_read_fd(fd))})",
                                     hint="raise HUBCACHE_LOCK_TIMEOUT or try again later")
                time.sleep(_POLL)
            if not _same(fd, path):
                os.close(fd)  # its holder unlinked it before letting go: lock the file there now
                continue
            # Ours now; what is in it says who had it. A hubcache holder that got this far and
            # died, or an empty file (its creator died before writing): taken over at once.
            found = _read_fd(fd)
            if found.strip() and not layout.lock_by_hubcache(found):
                who = layout.lock_holder(found)
                if plain_lock_alive(found, os.fstat(fd).st_mtime, stale_after):
                    if deadline is None:
                        if wait is None:
                            raise Busy(who, tensorflow_hub=True)
                        deadline = time.monotonic() + wait
                        on_wait(f"{who}, tensorflow_hub")
                    if not _wait_plain(fd, path, found, deadline, stale_after):
                        raise CacheError(f"tensorflow_hub has been downloading this for over {wait:.0f} s ({who})",
                                         hint="raise HUBCACHE_LOCK_TIMEOUT or try again later")
                    if not _same(fd, path):
                        os.close(fd)  # tensorflow_hub finished (or gave up): start over
                        continue
            locked = True  # ours from here: never left behind
            with contextlib.suppress(OSError):  # a full disk: the lock works without its note
                os.ftruncate(fd, 0)
                os.pwrite(fd, text, 0)  # for tensorflow_hub and hubcache waiters: who, and the temp dir
            return fd, task
        except _Replaced:
            os.close(fd)
            continue
        except BaseException:
            if locked:
                release(fd, path)
            else:
                os.close(fd)
            raise
    raise CacheError(f"the lock file {path} keeps being replaced", hint="try again later")


def _wait_plain(fd: int, path: str, text: str, deadline: float, stale_after: float) -> bool:
    """Wait, holding our ``flock`` on it (other hubcache processes queue behind us), until
    tensorflow_hub's lock file goes, is replaced, or is abandoned; ``False`` at the deadline."""
    while _same(fd, path):
        try:
            mtime = os.fstat(fd).st_mtime
        except OSError:
            return True
        now_text = _read_fd(fd)
        if now_text != text and layout.lock_by_hubcache(now_text):
            return True  # pragma: no cover - nobody else writes it while we hold the flock
        if not plain_lock_alive(now_text, mtime, stale_after):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL * 4)
    return True


def _refuse_untrusted_holder(path: str, trusted: frozenset[int]) -> None:
    """Raise if the lock is held by a process of an untrusted user (no downloader of this cache
    runs as one): :class:`_Replaced` after unlinking the file where this user owns the root (the
    next open makes a fresh one), else ``UnsafeFileError``."""
    foreign = [uid for uid in usage.holder_uids(path) if uid not in trusted]
    if not foreign:
        return
    if safefs.own_directory(os.path.dirname(path)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise _Replaced
    raise safefs.UnsafeFileError(path, f"is held by a process of another user (uid {foreign[0]})")


def release(fd: int, path: str) -> None:
    """Unlink the lock file (if it is still ours: tensorflow_hub may have replaced it), then let
    go of the lock: waiters find the path gone or new, never a file nobody will unlink."""
    if fd < 0:  # pragma: no cover - Windows: a plain file, ours if it names this process
        parsed = layout.parse_lock(read(path, safefs.trusted_in(os.path.dirname(path))) or "")
        if parsed is not None and parsed[0] == socket.gethostname() and parsed[1] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return
    try:
        if _same(fd, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def probe(path: str, trusted: frozenset[int], stale_after: float) -> str | None:
    """Why the key is being downloaded (``being downloaded (host pid N)``), else ``None`` (no
    lock file, or one nobody holds: a crashed holder's). Creates and changes nothing."""
    fd = safefs.open_existing(path, trusted)
    if fd is None:
        return None
    try:
        text = _read_fd(fd)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Busy(layout.lock_holder(text)).reason
            except OSError:
                pass
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        if text.strip() and not layout.lock_by_hubcache(text) and plain_lock_alive(text, os.fstat(fd).st_mtime,
                                                                                 stale_after):
            return Busy(layout.lock_holder(text), tensorflow_hub=True).reason
        return None
    finally:
        os.close(fd)


def drop_if_free(path: str, trusted: frozenset[int], stale_after: float) -> bool:
    """Unlink a lock file nobody holds and no live tensorflow_hub download stands for (what a
    process killed during its download left); ``True`` if one was removed."""
    if not os.path.lexists(path):
        return False
    try:
        fd, _ = acquire(path, trusted, wait=None, stale_after=stale_after, on_wait=lambda who: None)
    except (Busy, CacheError, OSError):
        return False
    release(fd, path)
    return True


def _acquire_plain(path: str, trusted: frozenset[int], text: bytes, wait: float | None, stale_after: float,
                   on_wait: Callable[[str], None]) -> int:  # pragma: no cover - Windows
    """Without ``flock``: an ``O_EXCL`` file, judged as tensorflow_hub's locks are (returns -1;
    :func:`release` then unlinks it if its text is still ours)."""
    deadline: float | None = None
    while True:
        try:
            safefs.write_new(path, text, mode=0o600)
            return -1
        except FileExistsError:
            pass
        found = read(path, trusted) or ""
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        if not plain_lock_alive(found, mtime, stale_after):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        if deadline is None:
            if wait is None:
                raise Busy(layout.lock_holder(found), tensorflow_hub=not layout.lock_by_hubcache(found))
            deadline = time.monotonic() + wait
            on_wait(layout.lock_holder(found))
        if time.monotonic() >= deadline:
            raise CacheError(f"another process has been downloading this for over {wait:.0f} s "
                             f"({layout.lock_holder(found)})", hint="raise HUBCACHE_LOCK_TIMEOUT or try again later")
        time.sleep(_POLL * 4)
