"""Safe opens and reads inside a cache directory.

A cache directory can hold what other users put there (the default ``<tmp>/tfhub_modules`` is
shared by every user of a machine, a team cache is published by one user and read by others).
Everything hubcache opens inside one goes through this module, which never follows a symbolic
link, never blocks, and never trusts what an untrusted user owns or can change:

- opens use ``O_NOFOLLOW`` (a link in the last component is refused, not followed) and
  ``O_NONBLOCK`` (a FIFO or device planted as a model file, manifest or lock never blocks the
  open); files inside an entry are reached through :class:`hubcache.stores.treewalk.Beneath`, one
  directory at a time, so no component on the way is followed either;
- the open file is ``fstat``-checked: a regular file, owned by a *trusted owner* (this process's
  user, root, or the owner of the cache root, who controls the root anyway), and not writable by
  other users (group write counts only when the group is the owner's private group, as Debian's
  OpenSSH allows for ``StrictModes``).

Anything that fails is refused with :class:`UnsafeFileError`, an ``OSError``: code that treats an
unreadable file as absent treats a planted one the same way. On Windows (no POSIX owners or
modes) only the link and file-type checks apply.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Callable, Collection

try:  # imported now, not on first use: a process that drops privileges later cannot load them
    import grp
    import pwd
except ImportError:  # pragma: no cover - Windows
    grp = pwd = None  # type: ignore[assignment]

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BASE = NOFOLLOW | NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
#: POSIX owners and modes exist here (not on Windows).
POSIX = hasattr(os, "geteuid")
#: What a manifest, descriptor or note may weigh at most: a planted huge file is not read.
MAX_READ = 256 << 20

_private_groups: dict[tuple[int, int], bool] = {}


class UnsafeFileError(OSError):
    """A file or directory in a cache that must not be used (a link, a FIFO, another user's).

    ``str(error)`` names the path and the reason.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(errno.EPERM, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"


def euid() -> int:
    """This process's effective user id (-1 where there is none)."""
    return os.geteuid() if POSIX else -1


def trusted_owners(root_stat: os.stat_result | None = None) -> frozenset[int]:
    """The users whose files a cache may serve: this process's, root, and the root's owner."""
    if not POSIX:
        return frozenset()
    owners = {os.geteuid(), 0}
    if root_stat is not None:
        owners.add(root_stat.st_uid)
    return frozenset(owners)


def trusted_in(directory: str) -> frozenset[int]:
    """:func:`trusted_owners` for files in ``directory`` (its owner is trusted)."""
    try:
        return trusted_owners(os.stat(directory))
    except OSError:
        return trusted_owners()


def private_group(gid: int, uid: int) -> bool:
    """True if ``gid`` is ``uid``'s private group: its only member, primary or listed.

    The rule of Debian's OpenSSH (``user-group-modes``): with the user-private-group convention
    (umask 002, each user's own group) a group-writable file is writable by its owner alone.
    """
    key = (gid, uid)
    if key not in _private_groups:
        _private_groups[key] = _compute_private_group(gid, uid)
    return _private_groups[key]


def _compute_private_group(gid: int, uid: int) -> bool:
    if grp is None or pwd is None:  # pragma: no cover - Windows
        return False
    try:
        group = grp.getgrgid(gid)
        owner = pwd.getpwuid(uid)
        members = 0
        for user in pwd.getpwall():
            if user.pw_gid == gid:
                members += 1
                if user.pw_uid != uid:
                    return False
    except (KeyError, OSError):
        return False
    if group.gr_mem:
        members += 1
        if group.gr_mem != [owner.pw_name]:
            return False
    return members > 0


def writable_by_others(st: os.stat_result) -> bool:
    """True if someone other than the owner (and root) can write the file or directory."""
    if not POSIX:
        return False
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not private_group(st.st_gid, st.st_uid)


def problem(st: os.stat_result, trusted: Collection[int], *, kind: str = "file",
            others_may_write: bool = False) -> str | None:
    """Why a file or directory (``kind``: ``file`` or ``dir``) must not be used, else ``None``.

    Args:
        st: its ``lstat``/``fstat``.
        trusted: the trusted owners (:func:`trusted_owners`).
        kind: what it must be.
        others_may_write: accept it even if other users can write it.
    """
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if kind == "dir" and not stat.S_ISDIR(mode):
        return "is not a directory"
    if kind == "file" and not stat.S_ISREG(mode):
        return "is not a regular file" + (" (a FIFO)" if stat.S_ISFIFO(mode) else "")
    if POSIX and trusted and st.st_uid not in trusted:
        return f"belongs to another user (uid {st.st_uid})"
    if not others_may_write and writable_by_others(st):
        return "is writable by other users"
    return None


def open_file(path: str, trusted: Collection[int], *, flags: int = os.O_RDONLY, mode: int = 0o644,
              dir_fd: int | None = None, others_may_write: bool = False, single_link: bool = False) -> int:
    """Open a regular file without following a link or blocking; checks as :func:`problem`.

    Args:
        path: the file (relative to ``dir_fd`` when given).
        trusted: its trusted owners.
        flags: ``os.O_RDONLY``, or ``os.O_RDWR | os.O_CREAT`` and the like.
        mode: permissions of a file created here.
        dir_fd: a directory descriptor ``path`` is relative to.
        others_may_write: accept a file other users can write.
        single_link: refuse a file with another hard link (one we might change the times of).

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        UnsafeFileError: a link, not a regular file, an untrusted owner, writable by others.
        OSError: as ``os.open`` fails otherwise (``FileNotFoundError`` when it is absent).
    """
    try:
        fd = os.open(path, flags | _BASE, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP or (error.errno == errno.EMLINK and NOFOLLOW):
            raise UnsafeFileError(path, "is a symbolic link") from None
        if error.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
            raise UnsafeFileError(path, "is not a regular file (a FIFO)") from None
        if error.errno == errno.EISDIR:
            raise UnsafeFileError(path, "is not a regular file (a directory)") from None
        raise
    def reason(st: os.stat_result) -> str | None:
        found = problem(st, trusted, others_may_write=others_may_write)
        if found is None and single_link and st.st_nlink > 1:
            found = "has other hard links"
        return found

    return _checked(fd, path, reason)


def _checked(fd: int, path: str, reason: Callable[[os.stat_result], str | None]) -> int:
    """``fd`` if ``reason(fstat(fd))`` finds nothing wrong; else it is closed and refused."""
    try:
        found = reason(os.fstat(fd))
        if found is not None:
            raise UnsafeFileError(path, found)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str, trusted: Collection[int], *, limit: int = MAX_READ) -> bytes:
    """The bytes of a trusted regular file (:func:`open_file`); at most ``limit`` of them.

    Raises:
        UnsafeFileError: as :func:`open_file`, or the file is larger than ``limit``.
        OSError: it cannot be read.
    """
    fd = open_file(path, trusted)
    try:
        if os.fstat(fd).st_size > limit:
            raise UnsafeFileError(path, f"is larger than {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UnsafeFileError(path, f"is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)


def open_dir(path: str, trusted: Collection[int], *, dir_fd: int | None = None,
             others_may_write: bool = False) -> int:
    """Open a directory without following a link; it must pass :func:`problem` as a ``dir``.

    Raises:
        UnsafeFileError, OSError: as :func:`open_file`.
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _BASE
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFileError(path, "is a symbolic link") from None
        if error.errno == errno.ENOTDIR:
            raise UnsafeFileError(path, "is not a directory") from None
        raise
    return _checked(fd, path, lambda st: problem(st, trusted, kind="dir", others_may_write=others_may_write))


def open_lock(path: str, trusted: Collection[int], *, mode: int = 0o600, create: bool = True,
              replace: bool = True) -> int:
    """Open (creating it if absent) a lock or use file for ``flock``; never blocks, never follows.

    A planted one (a link, a FIFO, another user's, one with other hard links) is refused; with
    ``replace``, when this process's user owns the directory, it is unlinked and a fresh file
    created in its place (unlinking removes the link or FIFO itself, never what it points to).

    Args:
        path: the lock file.
        trusted: its trusted owners.
        mode: permissions of a file created here.
        create: create it if absent (else ``FileNotFoundError``).
        replace: replace a planted file in a directory this user owns.

    Raises:
        UnsafeFileError: a planted file that could not be replaced.
        OSError: as ``os.open`` fails (read-only file system, no permission...).
    """
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return open_file(path, trusted, flags=flags, mode=mode, single_link=True)
    except UnsafeFileError:
        if not (replace and create and own_directory(os.path.dirname(path))):
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise UnsafeFileError(path, f"cannot be replaced ({error.strerror})") from None
    return open_file(path, trusted, flags=flags | os.O_EXCL, mode=mode, single_link=True)


def open_existing(path: str, trusted: Collection[int]) -> int | None:
    """Open an existing lock or use file read-write, else read-only (enough for ``flock``).

    ``None`` if it is absent, unsafe, or cannot be opened.
    """
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return open_file(path, trusted, flags=flags, single_link=True)
        except UnsafeFileError:
            return None
        except OSError:
            continue
    return None


def own_directory(directory: str) -> bool:
    """True if ``directory`` is a real directory of this process's user (so it may replace what
    others planted there)."""
    if not POSIX:  # pragma: no cover - Windows
        return False
    with contextlib.suppress(OSError):
        st = os.lstat(directory or ".")
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    return False


def write_new(path: str, data: bytes, mode: int = 0o644, *, durable: bool = False) -> None:
    """Create ``path`` (which must not exist) with ``data``; never through a link. ``durable``:
    ``fsync`` it before returning (a commit marker must not reach the disk before its bytes).

    Raises:
        OSError: ``FileExistsError`` if something (a link included) is already there.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BASE, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
