"""Walk, measure, remove and open inside directory trees of any depth, never following links.

A cache entry is untrusted input (another process, another user or an old tensorflow_hub wrote
it), and Linux lets a tree be nested thousands of directories deep. On Python 3.11 ``os.walk``
and ``shutil.rmtree`` recurse (``RecursionError`` near 1000 levels) and every path they build
grows with the depth until the kernel refuses it (``ENAMETOOLONG`` beyond ``PATH_MAX``, 4096
bytes). This module never builds a path longer than one name:

- one directory file descriptor is open at a time (plus the one ``scandir`` duplicates), moved
  down with ``openat(name, O_NOFOLLOW | O_DIRECTORY)`` and back up with ``openat("..")``;
- every step up is checked against the ``(st_dev, st_ino)`` remembered on the way down, so a
  directory moved away meanwhile can never lead the walk (or a removal) outside the tree; when
  the check fails the walk re-descends from the root, checking each level, or stops
  (:class:`TreeChanged`);
- symbolic links are reported, never followed, whatever their position (a link in the middle of
  a path given to :func:`open_beneath` is refused with ``ELOOP``/``ENOTDIR``);
- FIFOs, sockets and devices are reported apart (``other``) and never opened.

Memory is proportional to the depth plus the width of the directories on the current path; the
file descriptors in use stay at two or three whatever the depth.

Platforms without ``dir_fd`` support (Windows) get the same functions built on full paths; their
own path-length limits bound the depth there.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Iterator, NamedTuple

__all__ = ["Beneath", "TreeChanged", "WalkDir", "disk_usage", "open_beneath", "rmtree", "walk"]

_FD_BASED = (os.open in os.supports_dir_fd and os.scandir in os.supports_fd
             and os.unlink in os.supports_dir_fd and os.rmdir in os.supports_dir_fd
             and os.stat in os.supports_dir_fd and os.readlink in os.supports_dir_fd)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
#: Opening a file to read it: a FIFO planted in a tree must not block the opener.
READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)


class TreeChanged(OSError):
    """A directory on the walk's path was moved or replaced while the walk was inside it."""

    def __init__(self, where: str):
        super().__init__(errno.ESTALE, "the directory tree changed during the walk", where)


class WalkDir(NamedTuple):
    """One directory of a :func:`walk`.

    Attributes:
        path: the directory relative to the root, ``/``-separated (``""`` for the root).
        dirs: names of subdirectories (not links to directories); remove names from this list
            to keep the walk out of them, as with ``os.walk``.
        files: names of regular files.
        symlinks: names of symbolic links (to anything; never followed).
        other: names of everything else (FIFOs, sockets, devices); never opened.
        dir_fd: a descriptor of the directory, valid until the walk resumes: open, stat or
            readlink its entries with ``dir_fd=`` (always with ``O_NOFOLLOW``/``READ_FLAGS``).
            ``None`` on platforms without ``dir_fd`` support; join :attr:`path` to the root there.
    """

    path: str
    dirs: list[str]
    files: list[str]
    symlinks: list[str]
    other: list[str]
    dir_fd: int | None


class _Cursor:
    """One open directory descriptor inside a tree, moved by name, checked by inode."""

    def __init__(self, root: str):
        self.root = root
        self.fd = os.open(root, _DIR_FLAGS)
        st = os.fstat(self.fd)
        self.names: list[str] = []
        self.ids: list[tuple[int, int]] = [(st.st_dev, st.st_ino)]

    @property
    def where(self) -> str:
        """The current directory relative to the root (for error messages)."""
        return "/".join(self.names)

    def down(self, name: str) -> None:
        """Enter the subdirectory ``name`` (``ELOOP``/``ENOTDIR`` if it is a link or no directory)."""
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd = fd
        self.names.append(name)
        self.ids.append((st.st_dev, st.st_ino))

    def up(self) -> None:
        """Go back to the parent, which must be the very directory we came down from."""
        fd = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (st.st_dev, st.st_ino) == self.ids[-2]:
            os.close(self.fd)
            self.fd = fd
            self.names.pop()
            self.ids.pop()
            return
        os.close(fd)  # moved: '..' is somewhere else now; come back down from the root instead
        self._reopen(len(self.names) - 1)

    def _reopen(self, depth: int) -> None:
        names, ids = self.names[:depth], self.ids[:depth + 1]
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for level in range(depth + 1):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != ids[level]:
                    raise TreeChanged("/".join(names[:level]) or self.root)
                if level < depth:
                    child = os.open(names[level], _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = child
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)
        self.fd, self.names, self.ids = fd, names, ids

    def goto(self, names: list[str]) -> None:
        """Move to the directory ``names`` (components below the root) by the shortest way."""
        here = self.names
        if names[:len(here)] == here:  # below (or at) the current directory: the usual case
            common = len(here)
        elif here[:len(names)] == names:  # an ancestor
            common = len(names)
        else:
            common = 0
            limit = min(len(names), len(here))
            while common < limit and names[common] == here[common]:
                common += 1
        while len(self.names) > common:
            self.up()
        for name in names[common:]:
            self.down(name)

    def scan(self) -> list[os.DirEntry[str]]:
        with os.scandir(self.fd) as it:
            return list(it)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _classify(entries: list[os.DirEntry[str]]) -> tuple[list[str], list[str], list[str], list[str]]:
    dirs, files, links, other = [], [], [], []
    for entry in entries:
        try:
            if entry.is_symlink() or (not _FD_BASED and _is_junction(entry)):
                links.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                dirs.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
            else:
                other.append(entry.name)
        except OSError:  # removed between the listing and the lstat
            continue
    return dirs, files, links, other


def _walk_fd(root: str, onerror: Callable[[OSError], None] | None,
             ) -> Iterator[tuple[_Cursor, list[os.DirEntry[str]], list[str]]]:
    """Top-down: yields (cursor at the directory, its entries, its subdirectory names); the
    consumer may edit the names list to prune the walk."""
    try:
        cursor = _Cursor(root)
    except OSError as error:
        if onerror is not None:
            onerror(error)
        return
    try:
        entries = cursor.scan()
        dirs = [e.name for e in entries if _is_dir(e)]
        yield cursor, entries, dirs
        pending = [list(reversed(dirs))]
        while pending:
            if not pending[-1]:
                pending.pop()
                if pending:
                    try:
                        cursor.up()
                    except OSError as error:  # cannot get back: the rest of the tree is out of reach
                        if onerror is not None:
                            onerror(error)
                        return
                continue
            name = pending[-1].pop()
            try:
                cursor.down(name)
            except OSError as error:  # gone, replaced by a link, or not searchable
                if onerror is not None:
                    onerror(error)
                continue
            try:
                entries = cursor.scan()
            except OSError as error:  # entered but unreadable: come back up as from an empty one
                pending.append([])
                if onerror is not None:
                    onerror(error)
                continue
            dirs = [e.name for e in entries if _is_dir(e)]
            yield cursor, entries, dirs
            pending.append(list(reversed(dirs)))
    finally:
        cursor.close()


def _is_junction(entry: os.DirEntry[str]) -> bool:
    """A Windows junction (or any reparse point): a link in all but name, never to be entered."""
    attributes = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    return bool(attributes & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def walk(root: str, onerror: Callable[[OSError], None] | None = None) -> Iterator[WalkDir]:
    """Every directory of the tree at ``root``, top-down, never following links.

    Like ``os.walk(root)`` (errors are ignored unless ``onerror`` is given, and editing
    ``dirs`` prunes the walk) but iterative, at any depth, with a bounded number of open files,
    and never through a symbolic link (a ``root`` that is a link yields nothing).

    Args:
        root: the top directory.
        onerror: called with each ``OSError`` (an unreadable directory, a tree changed under
            the walk); the walk goes on where it can.

    Yields:
        One :class:`WalkDir` per directory.
    """
    if not _FD_BASED:
        yield from _walk_paths(root, onerror)
        return
    for cursor, entries, dirs in _walk_fd(root, onerror):
        _, files, links, other = _classify(entries)
        yield WalkDir("/".join(cursor.names), dirs, files, links, other, cursor.fd)


def disk_usage(root: str) -> int:
    """Bytes in the regular files of the tree at ``root`` (``lstat`` sizes; links not followed).

    A missing or unreadable tree counts what could be read (0 if nothing).
    """
    total = 0
    if not _FD_BASED:
        for d in _walk_paths(root, None):
            for name in d.files:
                try:
                    total += os.lstat(os.path.join(root, *d.path.split("/"), name)).st_size
                except OSError:
                    pass
        return total
    for _, entries, _ in _walk_fd(root, None):
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:  # removed meanwhile
                continue
    return total


def rmtree(path: str, *, ignore_errors: bool = False) -> None:
    """Remove ``path`` and everything under it, at any depth, never following links.

    A ``path`` that is a symbolic link (or any non-directory) is itself removed, not what it
    points to; a missing ``path`` is fine. Links inside are removed as links.

    Raises:
        OSError: the first failure, unless ``ignore_errors`` (then as much as possible is removed).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            if not ignore_errors:
                raise
        return
    if not _FD_BASED:
        _rmtree_paths(path, ignore_errors)
        return
    try:
        cursor = _Cursor(path)
    except FileNotFoundError:
        return
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced by a link or a file meanwhile
            return rmtree(path, ignore_errors=ignore_errors)
        if ignore_errors:
            return
        raise
    try:
        _empty(cursor, ignore_errors)
    finally:
        cursor.close()
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise


def _empty(cursor: _Cursor, ignore_errors: bool) -> None:
    """Remove everything below the cursor's root (post-order, one directory open at a time)."""

    def clear() -> list[str]:
        subdirs = []
        for entry in cursor.scan():
            if _is_dir(entry):
                subdirs.append(entry.name)
                continue
            try:
                os.unlink(entry.name, dir_fd=cursor.fd)
            except FileNotFoundError:
                pass
            except IsADirectoryError:  # became a directory meanwhile
                subdirs.append(entry.name)
            except OSError:
                if not ignore_errors:
                    raise
        return subdirs

    def fail(error: OSError) -> None:
        if not ignore_errors:
            raise error

    pending = [clear()]
    while pending:
        if pending[-1]:
            name = pending[-1].pop()
            try:
                cursor.down(name)
            except FileNotFoundError:
                continue
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.ENOTDIR):  # now a link or a file: unlink it
                    try:
                        os.unlink(name, dir_fd=cursor.fd)
                    except FileNotFoundError:
                        pass
                    except OSError as again:
                        fail(again)
                else:
                    fail(error)
                continue
            try:
                pending.append(clear())
            except OSError as error:
                pending.append([])
                fail(error)
            continue
        pending.pop()
        if not pending:
            return
        name = cursor.names[-1]
        try:
            cursor.up()
        except OSError as error:  # the tree moved under us: stop rather than remove elsewhere
            fail(error)
            return
        try:
            os.rmdir(name, dir_fd=cursor.fd)
        except FileNotFoundError:
            pass
        except OSError as error:
            fail(error)


def _split(rel: str) -> list[str]:
    # String searches, not a loop over the parts: paths thousands of components long are common here.
    wrapped = f"/{rel}/"
    if not rel or "//" in wrapped or "/./" in wrapped or "/../" in wrapped or "\0" in rel:
        raise OSError(errno.EINVAL, "not a plain relative path", rel)
    return rel.split("/")


class Beneath:
    """Open, stat and read links inside a tree, component by component, never through a link.

    Keeps one directory open and moves it the shortest way between lookups, so visiting the
    paths of a tree in sorted order costs about one ``openat`` per directory, at any depth.
    Use as a context manager.

    Args:
        root: the top directory (itself opened with ``O_NOFOLLOW``: a link there is refused).

    Raises:
        OSError: if ``root`` cannot be opened as a directory.
    """

    def __init__(self, root: str):
        self.root = root
        self._cursor = _Cursor(root) if _FD_BASED else None

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()

    def _at(self, rel: str) -> tuple[str, int | None]:
        parts = _split(rel)
        if self._cursor is None:  # no dir_fd: check every component with lstat instead
            path = self.root
            for part in parts[:-1]:
                path = os.path.join(path, part)
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise OSError(errno.ENOTDIR, "a component is a link or not a directory", rel)
            return os.path.join(path, parts[-1]), None
        self._cursor.goto(parts[:-1])
        return parts[-1], self._cursor.fd

    def open(self, rel: str, flags: int = READ_FLAGS, mode: int = 0o644) -> int:
        """A descriptor of ``rel`` opened with ``flags | O_NOFOLLOW`` (a link anywhere: ``ELOOP``
        or ``ENOTDIR``). The caller closes it."""
        name, fd = self._at(rel)
        if fd is None:
            if os.path.islink(name):
                raise OSError(errno.ELOOP, "a symbolic link", rel)
            return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode)
        return os.open(name, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=fd)

    def open_file(self, rel: str) -> int:
        """A read descriptor of the regular file ``rel``; never blocks on a FIFO.

        Raises:
            OSError: ``ELOOP``/``ENOTDIR`` for a link on the way, ``EINVAL`` for anything but a
                regular file, or the open's own error.
        """
        fd = self.open(rel, READ_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", rel)
            if READ_FLAGS & getattr(os, "O_NONBLOCK", 0):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, rel: str) -> os.stat_result:
        """``lstat`` of ``rel`` (the last component may be a link; none before it may)."""
        name, fd = self._at(rel)
        return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def readlink(self, rel: str) -> str:
        """The target of the link ``rel``."""
        name, fd = self._at(rel)
        return os.readlink(name, dir_fd=fd)


def open_beneath(root: str, rel: str, flags: int = READ_FLAGS, mode: int = 0o644) -> int:
    """Open ``root/rel`` component by component with ``O_NOFOLLOW``: any symbolic link on the
    way (or at the end) is refused, so the result is always inside ``root``, at any depth.

    Args:
        root: the top directory.
        rel: a ``/``-separated relative path without ``.``, ``..`` or empty components.
        flags: ``os.open`` flags (``O_NOFOLLOW`` is always added); the default reads without
            blocking on a FIFO.
        mode: for ``O_CREAT``.

    Returns:
        A file descriptor the caller closes.

    Raises:
        OSError: ``ELOOP``/``ENOTDIR`` for a link, ``EINVAL`` for a malformed ``rel``, or the
            open's own error.
    """
    with Beneath(root) as tree:
        return tree.open(rel, flags, mode)


# -- platforms without dir_fd (Windows): the same, on full paths ----------------------------------


def _walk_paths(root: str, onerror: Callable[[OSError], None] | None) -> Iterator[WalkDir]:
    if os.path.islink(root):
        return
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, *rel.split("/")) if rel else root
        try:
            with os.scandir(full) as it:
                entries = list(it)
        except OSError as error:
            if onerror is not None:
                onerror(error)
            continue
        dirs, files, links, other = _classify(entries)
        yield WalkDir(rel, dirs, files, links, other, None)
        stack.extend(f"{rel}/{d}" if rel else d for d in reversed(dirs))


def _rmtree_paths(path: str, ignore_errors: bool) -> None:
    order = []
    for d in _walk_paths(path, None if ignore_errors else _raise):
        full = os.path.join(path, *d.path.split("/")) if d.path else path
        for name in d.files + d.symlinks + d.other:
            try:
                os.unlink(os.path.join(full, name))
            except FileNotFoundError:
                pass
            except OSError:
                try:  # a directory link or junction on Windows: removed as a directory entry
                    os.rmdir(os.path.join(full, name))
                except OSError:
                    if not ignore_errors:
                        raise
        order.append(full)
    for full in reversed(order):
        try:
            os.rmdir(full)
        except FileNotFoundError:
            pass
        except OSError:
            if not ignore_errors:
                raise


def _raise(error: OSError) -> None:
    raise error
