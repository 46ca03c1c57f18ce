"""The rules for names inside a cache entry, shared by everything that writes or reads one.

Archive members, entries copied from another cache tier, objects written to a bucket, entries
adopted from tensorflow_hub and manifests read back from any tier all come from outside this
process. They get the same checks, from here:

- :func:`member_path`: one name, to its normal form ``a/b/c`` (or refused): no NUL, nothing
  absolute, no ``..``, bounded length, and, for Windows, no drive letters, alternate streams,
  reserved device names or characters Windows forbids.
- :func:`link_target`: where a symlink points, lexically, and that it stays inside the entry.
- :class:`EntryTree`: the shape of an entry as it is built, in whatever order the pieces come:
  parents are directories, nothing is written through a symlink, no symlink's target passes
  through another symlink, no symlink loops or long chains, and the limits hold.
- :func:`validate_manifest`: all of the above for a manifest read from a cache tier.

Every check costs time linear in the length of the path it looks at.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from .errors import UnsafeArchiveError

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import Manifest

#: Whether this process runs on Windows (the default for the ``windows`` arguments below).
WINDOWS: bool = os.name == "nt"

#: Longest path (UTF-8 bytes) of anything in an entry: Linux's PATH_MAX.
MAX_PATH_BYTES = 4096
#: Longest single name (UTF-8 bytes): NAME_MAX of Linux, macOS and NTFS alike.
MAX_NAME_BYTES = 255
#: Longest chain of symlinks the tree accepts (Linux resolves 40 before giving up with ELOOP).
MAX_LINK_HOPS = 40

_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{stem}{n}" for stem in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"])
_RESERVED_STEMS = ("CON", "PRN", "AUX", "NUL", "COM", "LPT")
_WINDOWS_BAD_CHAR = re.compile(r'[<>:"|?*\x00-\x1f]')
_UPS = re.compile(r"(?:\.\./)*")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one entry may hold.

    Attributes:
        max_bytes: total bytes of all files.
        max_members: number of members (files, directories, links; implied parent directories
            count too).
    """

    max_bytes: int = 256 << 30
    max_members: int = 50_000


def _show(name: str) -> str:
    """``repr(name)``, shortened if long: error messages stay one readable line."""
    if len(name) <= 200:
        return repr(name)
    return repr(name[:100]) + f"... ({len(name)} characters)"


def _whole(what: str) -> str:
    """"archive" from "archive member": what the names are part of, for messages."""
    return what.rpartition(" ")[0] or what


# Every test below runs at C speed (substring searches, one regex scan, one encode): a path
# thousands of names deep costs microseconds, not a Python step per name.

def _unclean(path: str) -> bool:
    """Whether a ``/``-separated path has an empty, ``.`` or ``..`` component."""
    return (not path or path[0] == "/" or path[-1] == "/" or "//" in path or "/./" in path
            or "/../" in path or path.startswith(("./", "../")) or path.endswith(("/.", "/.."))
            or path in (".", ".."))


def _name_at(path: str, index: int) -> str:
    """The component of ``path`` that holds ``path[index]``."""
    start = path.rfind("/", 0, index) + 1
    end = path.find("/", index)
    return path[start:end] if end >= 0 else path[start:]


def _encoded(path: str) -> bytes | None:
    """The bytes a file system gets for ``path`` (``None``: a lone surrogate, storable nowhere)."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def _names_problem(path: str, encoded: bytes, windows: bool) -> str | None:
    """Why a clean ``/``-separated path holds a name no file system (or Windows) takes, or ``None``."""
    size = len(encoded)
    if size > MAX_NAME_BYTES:
        # A name over 255 bytes covers a whole aligned 128-byte block with no '/': look only there.
        for block in range(0, size, 128):
            if encoded.find(b"/", block, block + 128) < 0:
                start = encoded.rfind(b"/", 0, block) + 1
                end = encoded.find(b"/", block)
                if (size if end < 0 else end) - start > MAX_NAME_BYTES:
                    return f"a name is longer than {MAX_NAME_BYTES} bytes"
    if not windows:
        return None
    bad = _WINDOWS_BAD_CHAR.search(path)
    if bad is not None:
        name = _name_at(path, bad.start())
        if bad.group() == ":":
            return f"{_show(name)} has a ':' (a drive letter or an alternate data stream on Windows)"
        return f"{_show(name)} has a character Windows forbids in file names"
    ends = [at for at in (path.find("./"), path.find(" /")) if at >= 0]
    if path[-1] in ". ":
        ends.append(len(path) - 1)
    if ends:
        return f"{_show(_name_at(path, min(ends)))} ends with a dot or a space, which Windows drops"
    upper = path.upper()
    if any(stem in upper for stem in _RESERVED_STEMS):
        for name in path.split("/"):
            if name[:3].upper() in _RESERVED_STEMS and name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
                return f"{_show(name)} is a reserved device name on Windows"
    return None


def _is_drive(text: str) -> bool:
    return len(text) > 1 and text[1] == ":" and text[0].isalpha()


def member_path(name: str, *, windows: bool = WINDOWS, what: str = "archive member") -> str | None:
    """Normalise a name inside an entry to ``a/b/c``; ``None`` for the entry's root (``./``).

    Backslashes are separators on every platform; empty and ``.`` components are dropped.

    Args:
        name: the name as it came (an archive member's name, a manifest's path...).
        windows: also refuse what Windows cannot create or would misread: ``:`` in any name
            (drive letters, alternate data streams), reserved device names (``CON``, ``nul.txt``,
            ``COM1``...), names ending in a dot or a space, and the characters ``<>"|?*`` and
            control characters.
        what: how to call the name in the error (``"archive member"``, ``"manifest entry"``).

    Raises:
        UnsafeArchiveError: for a NUL byte, an absolute path (``/x``, ``\\x``, ``C:``, UNC), a
            ``..`` component, a path over 4096 bytes or a name over 255, or (``windows``) a name
            Windows refuses.
    """
    if not isinstance(name, str):
        raise UnsafeArchiveError(f"{what} {name!r} is not a text name", member=str(name))
    if "\x00" in name:
        raise UnsafeArchiveError(f"{what} {_show(name)} has a NUL byte in its name", member=name)
    if len(name) > MAX_PATH_BYTES:
        raise UnsafeArchiveError(f"{what} {_show(name)} has a path longer than {MAX_PATH_BYTES} bytes",
                                 member=name)
    if name.startswith(("/", "\\")) or _is_drive(name):
        raise UnsafeArchiveError(f"{what} {_show(name)} has an absolute path", member=name)
    path = name.replace("\\", "/") if "\\" in name else name
    if _unclean(path):
        parts = path.split("/")
        if ".." in parts:
            raise UnsafeArchiveError(f"{what} {_show(name)} leaves the entry with '..'", member=name)
        parts = list(filter(None, parts))
        if "." in parts:
            parts = [part for part in parts if part != "."]
        if not parts:
            return None
        path = "/".join(parts)
    encoded = _encoded(path)
    if encoded is None:
        raise UnsafeArchiveError(f"{what} {_show(name)} is not a valid file name (it holds a lone "
                                 "surrogate, which no file system stores)", member=name)
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafeArchiveError(f"{what} {_show(name)} has a path longer than {MAX_PATH_BYTES} bytes",
                                 member=name)
    problem = _names_problem(path, encoded, windows)
    if problem:
        raise UnsafeArchiveError(f"{what} {_show(name)} is not a valid file name: {problem}", member=name)
    return path


def _resolve(path: str, target: str, windows: bool, what: str) -> tuple[str, bool]:
    """:func:`link_target`, and whether the target was plain: ``../`` steps, then names only."""
    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{what} {_show(path)} is a symlink to {_show(str(target))}, {why}", member=path)

    if not isinstance(target, str) or not target:
        raise refuse("which is empty")
    if "\x00" in target:
        raise refuse("which has a NUL byte")
    if len(target) > MAX_PATH_BYTES:
        raise refuse(f"a path longer than {MAX_PATH_BYTES} bytes")
    if target.startswith(("/", "\\")):
        raise refuse("an absolute path")
    if _is_drive(target):
        raise refuse("a path with a drive letter")
    if "\\" in target:
        raise refuse("a path with a backslash (a separator on Windows, a plain character elsewhere)")
    ups = _UPS.match(target).end()  # type: ignore[union-attr]  # it matches the empty string: never None
    rest = target[ups:]
    parents = path.split("/")[:-1]
    plain = bool(rest) and not _unclean(rest)
    if plain:
        ups //= 3
        if ups > len(parents):
            raise refuse("outside the entry")
        encoded = _encoded(rest)
        problem = "it holds a lone surrogate" if encoded is None else _names_problem(rest, encoded, windows)
        if problem:
            raise refuse(f"which is not a valid file name: {problem}")
        base = "/".join(parents[:len(parents) - ups])
        resolved = f"{base}/{rest}" if base else rest
    else:
        stack = parents
        for part in target.split("/"):
            if not part or part == ".":
                continue
            if part == "..":
                if not stack:
                    raise refuse("outside the entry")
                stack.pop()
                continue
            encoded = _encoded(part)
            problem = "it holds a lone surrogate" if encoded is None else _names_problem(part, encoded, windows)
            if problem:
                raise refuse(f"which is not a valid file name: {problem}")
            stack.append(part)
        resolved = "/".join(stack)
    if resolved == path or resolved.startswith(path + "/"):
        raise refuse("itself (a symlink loop)")
    return resolved, plain


def link_target(path: str, target: str, *, windows: bool = WINDOWS, what: str = "archive member") -> str:
    """The entry-relative path a symlink at ``path`` points to, resolved lexically.

    ``""`` is the entry's root. Whether the target passes through *other* symlinks is
    :class:`EntryTree`'s business: this looks at the text only.

    Args:
        path: the link's own path, in normal form.
        target: the link's target as stored.
        windows: also refuse target names Windows refuses.
        what: how to call the link in the error.

    Raises:
        UnsafeArchiveError: the target is empty, has a NUL byte, is absolute (``/``, ``C:``, UNC),
            has a backslash, leaves the entry, or is the link itself (or inside it).
    """
    return _resolve(path, target, windows, what)[0]


# -- the tree ------------------------------------------------------------------------------------

_NONE, _DIR, _FILE, _LINK = 0, 1, 2, 3

#: Steps through names that are not directories (yet) that symlink targets may take, per member
#: allowed: plain targets into known directories take none; this bounds the crafted rest.
_WALK_STEPS_PER_MEMBER = 64


class _Node:
    """One name in the tree. A ``_NONE`` node is a name only symlink targets mention so far (a
    placeholder): it carries the index of the links whose targets walk through it."""

    __slots__ = ("name", "parent", "kind", "children", "size", "walkers", "walked_by", "target", "walked")

    def __init__(self, name: str, parent: _Node | None, kind: int = _NONE):
        self.name = name
        self.parent = parent
        self.kind = kind
        self.children: dict[str, _Node] | None = None
        self.size = 0
        #: how many symlink targets pass through this name as a directory; the first one's path
        self.walkers = 0
        self.walked_by = ""
        #: for a symlink: the node its target names, and the non-directories it walks through
        self.target: _Node | None = None
        self.walked: tuple[_Node, ...] = ()

    def path(self) -> str:
        parts = []
        node: _Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/".join(reversed(parts))


class EntryTree:
    """The shape of an entry being built; every addition is checked before it is made.

    Invariants, whatever order the additions come in:

    - every parent is a directory (missing ones are implied, and count as members);
    - nothing is added through a symlink;
    - no symlink's target passes *through* another symlink (or itself) as a directory: a link
      whose target walks through a link is refused, and so is a link at a name an earlier
      link's target walks through (an index of those names is kept). So every target resolves
      lexically, and :func:`link_target` keeps it inside the entry;
    - a later file or link replaces an earlier one of the same name (tar's rule), never a
      directory;
    - at most ``limits.max_members`` members and ``limits.max_bytes`` bytes of files (a hard
      link counts at its file's size: copies of it may be made).

    :meth:`finish` then refuses symlink cycles and chains longer than 40 links.

    The ``add_*`` methods take paths in normal form (:func:`member_path`) and return the
    directories they created, parents first: what a writer must create before the addition.
    Each costs time linear in the length of its path. After an error the tree is unusable.

    Args:
        limits: the bounds (defaults: :class:`Limits`).
        windows: apply Windows' name rules too.
        what: how to call a name in errors (``"archive member"``, ``"manifest entry"``).
    """

    def __init__(self, limits: Limits | None = None, *, windows: bool = WINDOWS, what: str = "archive member"):
        self.limits = limits or Limits()
        self.windows = windows
        self.what = what
        self._root = _Node("", None, _DIR)
        #: full path -> node of every directory. Most additions find their parent with one
        #: lookup, and a directory's ancestors are directories too (each was checked when made).
        self._dirs: dict[str, _Node] = {"": self._root}
        self._links: dict[str, _Node] = {}
        #: members added (implied directories included), and bytes of files
        self.members = 0
        self.total_bytes = 0
        self._placeholders = 0
        self._steps = 0

    # -- helpers --------------------------------------------------------------------------------

    def _error(self, path: str, text: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.what} {_show(path)} {text}", member=path)

    def _normal(self, path: str) -> None:
        if not isinstance(path, str) or member_path(path, windows=self.windows, what=self.what) != path:
            raise UnsafeArchiveError(f"{self.what} {_show(str(path))} is not in normal form (an empty, '.' "
                                     "or '..' name, '//', a trailing '/' or a backslash)", member=str(path))

    def _count(self, path: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchiveError(
                f"the {_whole(self.what)} has more than {self.limits.max_members} members "
                "(counting the directories they imply)", member=path,
                hint="raise HUBCACHE_MAX_MEMBERS if this archive is trusted")

    def _add_bytes(self, path: str, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise self._error(path, f"has an invalid size {size!r}")
        self.total_bytes += size
        if self.total_bytes > self.limits.max_bytes:
            raise UnsafeArchiveError(
                f"the {_whole(self.what)}'s files add up to more than {self.limits.max_bytes} bytes", member=path,
                hint="raise HUBCACHE_MAX_EXTRACT_SIZE if this archive is trusted")

    def _child(self, parent: _Node, name: str, path: str) -> _Node:
        """``parent``'s child ``name``, made a placeholder (and counted) if new."""
        children = parent.children
        if children is None:
            children = parent.children = {}
        node = children.get(name)
        if node is None:
            self._placeholders += 1
            if self._placeholders > self.limits.max_members:
                raise self._error(path, f"is a symlink, and the {_whole(self.what)}'s symlinks name more than "
                                  f"{self.limits.max_members} paths that do not exist")
            node = children[name] = _Node(name, parent)
        return node

    def _slot(self, parent: _Node, name: str, path: str) -> tuple[_Node, bool]:
        """The node for a new member ``name`` in ``parent`` (a placeholder is taken over), and
        whether it was a file or a link before."""
        children = parent.children
        if children is None:
            children = parent.children = {}
        node = children.get(name)
        if node is None:
            node = children[name] = _Node(name, parent)
            return node, False
        if node.kind == _NONE:
            self._placeholders -= 1
            return node, False
        if node.kind == _DIR:
            raise self._error(path, "replaces a directory")
        if node.kind == _LINK:
            for step in node.walked:
                step.walkers -= 1
                if not step.walkers:
                    step.walked_by = ""
            del self._links[path]
            node.target, node.walked = None, ()
        else:
            self.total_bytes -= node.size
        return node, True

    def _parent(self, path: str, created: list[str]) -> _Node:
        """The directory ``path`` goes in, making missing ancestors (appended to ``created``)."""
        cut = path.rfind("/")
        if cut < 0:
            return self._root
        node = self._dirs.get(path[:cut])
        if node is not None:
            return node
        # Up to the nearest directory (each step makes a member, or ends in an error), then down.
        ends = [cut]
        while True:
            cut = path.rfind("/", 0, cut)
            if cut < 0:
                node = self._root
                break
            node = self._dirs.get(path[:cut])
            if node is not None:
                break
            ends.append(cut)
        start = cut + 1
        for end in reversed(ends):
            sub = path[:end]
            children = node.children
            if children is None:
                children = node.children = {}
            child = children.get(path[start:end])
            if child is None:
                child = children[path[start:end]] = _Node(path[start:end], node)
            elif child.kind == _NONE:
                self._placeholders -= 1
            elif child.kind == _LINK:
                raise self._error(path, f"would be written through the symlink {_show(sub)}")
            else:
                raise self._error(path, f"needs {_show(sub)} to be a directory, but it is a file")
            self._count(sub)
            child.kind = _DIR
            self._dirs[sub] = child
            created.append(sub)
            node, start = child, end + 1
        return node

    def _walk(self, link: _Node, path: str, target: str) -> tuple[_Node, tuple[_Node, ...]]:
        """Follow ``target`` from ``link``'s directory name by name (``..`` included).

        Returns the node the target names and the non-directories it passes through. Names not
        in the tree get placeholders, so a link that arrives at one of them later is caught.
        """
        node = cast(_Node, link.parent)  # a link is never the root
        walked: list[_Node] = []
        pushed = False
        for part in target.split("/"):
            if not part or part == ".":
                continue
            self._steps += 1
            if self._steps > _WALK_STEPS_PER_MEMBER * max(self.limits.max_members, 1024):
                raise self._error(path, f"is a symlink, and the {_whole(self.what)}'s symlink targets take too "
                                  "many steps through names that are not directories")
            if pushed and node.kind != _DIR:
                if node is link:
                    raise self._error(path, f"is a symlink to {_show(target)}, through itself (a symlink loop)")
                if node.kind == _LINK:
                    raise self._error(path, f"is a symlink to {_show(target)}, through another symlink "
                                      f"({_show(node.path())})")
                walked.append(node)
            if part == "..":
                node = cast(_Node, node.parent)  # never above the root: _resolve checked the text
                pushed = False
                continue
            node = self._child(node, part, path)
            pushed = True
        return node, tuple(walked)

    # -- additions ------------------------------------------------------------------------------

    def add_dir(self, path: str) -> list[str]:
        """Add a directory (a no-op, but counted, if it exists).

        Raises:
            UnsafeArchiveError: the name, a parent, or a limit breaks a rule.
        """
        self._normal(path)
        self._count(path)
        created: list[str] = []
        if path in self._dirs:
            return created
        parent = self._parent(path, created)
        node = parent.children.get(path.rpartition("/")[2]) if parent.children else None
        if node is not None and node.kind in (_FILE, _LINK):
            raise self._error(path, "needs to be a directory, but it is a file or a symlink")
        node, _ = self._slot(parent, path.rpartition("/")[2], path)
        node.kind = _DIR
        self._dirs[path] = node
        created.append(path)
        return created

    def add_file(self, path: str, size: int) -> list[str]:
        """Add (or replace) a regular file of ``size`` bytes.

        Raises:
            UnsafeArchiveError: the name, a parent, or a limit breaks a rule.
        """
        self._normal(path)
        self._count(path)
        created: list[str] = []
        node, _ = self._slot(self._parent(path, created), path.rpartition("/")[2], path)
        self._add_bytes(path, size)
        node.kind, node.size = _FILE, size
        return created

    def add_hardlink(self, path: str, existing: str) -> list[str]:
        """Add ``path`` as a hard link to (a copy of) ``existing``, a file already in the tree.

        Raises:
            UnsafeArchiveError: ``existing`` is not a file added earlier, or a rule breaks.
        """
        self._normal(path)
        if not isinstance(existing, str) or member_path(existing, windows=self.windows, what=self.what) != existing:
            raise self._error(path, f"is a hard link to {_show(str(existing))}, which is not a plain relative path")
        folder = self._dirs.get(existing.rpartition("/")[0])
        source = folder.children.get(existing.rpartition("/")[2]) if folder is not None and folder.children else None
        if source is None or source.kind != _FILE:
            raise self._error(path, f"is a hard link to {_show(existing)}, which is not a file earlier in the "
                              f"{_whole(self.what)}")
        if existing == path:
            raise self._error(path, "is a hard link to itself")
        self._count(path)
        created: list[str] = []
        node, _ = self._slot(self._parent(path, created), path.rpartition("/")[2], path)
        self._add_bytes(path, source.size)
        node.kind, node.size = _FILE, source.size
        return created

    def add_symlink(self, path: str, target: str) -> list[str]:
        """Add (or replace) a symlink to ``target`` (as stored; see :func:`link_target`).

        Raises:
            UnsafeArchiveError: the target leaves the entry, passes through a symlink (or an
                earlier link's target passes through this name), or another rule breaks.
        """
        self._normal(path)
        resolved, plain = _resolve(path, target, self.windows, self.what)
        self._count(path)
        created: list[str] = []
        parent = self._parent(path, created)
        existing = parent.children.get(path.rpartition("/")[2]) if parent.children else None
        if existing is not None and existing.walkers and existing.kind != _DIR:
            raise self._error(path, f"is a symlink, but the target of the symlink {_show(existing.walked_by)} "
                              "passes through this name (a symlink through another symlink)")
        node, _ = self._slot(parent, path.rpartition("/")[2], path)
        # A plain target ("../" steps, then names) into a known directory walks only through
        # directories: nothing to check or index. Anything else is walked name by name.
        folder = self._dirs.get(resolved.rpartition("/")[0]) if plain else None
        if folder is not None:
            node.target, node.walked = self._child(folder, resolved.rpartition("/")[2], path), ()
        else:
            node.target, node.walked = self._walk(node, path, target)
        for step in node.walked:
            step.walkers += 1
            if not step.walked_by:
                step.walked_by = path
        node.kind = _LINK
        self._links[path] = node
        return created

    def finish(self) -> None:
        """Check what only the whole tree shows: no symlink cycles, no chain over 40 links.

        Raises:
            UnsafeArchiveError: a cycle or a chain too long.
        """
        hops: dict[int, int] = {}
        for path, start in self._links.items():
            if id(start) in hops:
                continue
            chain: list[_Node] = []
            seen: set[int] = set()
            node = start
            while node.kind == _LINK and id(node) not in hops:
                if id(node) in seen:
                    raise self._error(path, "is part of a symlink cycle")
                seen.add(id(node))
                chain.append(node)
                node = cast(_Node, node.target)  # a link's target is set when it is added
            base = hops.get(id(node), 0)
            for i, link in enumerate(reversed(chain), 1):
                hops[id(link)] = base + i
            if hops[id(start)] > MAX_LINK_HOPS:
                raise self._error(path, f"starts a chain of more than {MAX_LINK_HOPS} symlinks")


def validate_manifest(manifest: Manifest, limits: Limits | None = None, *, windows: bool = WINDOWS,
                      what: str = "manifest entry") -> None:
    """Check a manifest read from a cache tier as if its entry were an archive being unpacked.

    Every name must already be in normal form (``a//b``, ``./x`` and ``a/../b`` are refused, not
    merged), link targets must stay inside and pass the :class:`EntryTree` rules, sizes are
    integers ``>= 0``, no name is listed twice or as two kinds, and the limits hold.

    Raises:
        UnsafeArchiveError: the first problem found.
    """
    tree = EntryTree(limits, windows=windows, what=what)
    files, dirs, symlinks = manifest.files, manifest.dirs, manifest.symlinks
    if not isinstance(files, list) or not isinstance(dirs, list) or not isinstance(symlinks, dict):
        raise UnsafeArchiveError(f"the {_whole(what)} is malformed (files, dirs or symlinks of the wrong type)",
                                 member="")
    seen: dict[str, str] = {}

    def claim(path: object, kind: str) -> str:
        if not isinstance(path, str):
            raise UnsafeArchiveError(f"{what} {path!r} is not a text name", member=str(path))
        if path in seen:
            again = "twice" if seen[path] == kind else f"as both a {seen[path]} and a {kind}"
            raise UnsafeArchiveError(f"{what} {_show(path)} is listed {again}", member=path)
        seen[path] = kind
        return path

    for path in sorted(dirs, key=str):  # parents before children
        tree.add_dir(claim(path, "directory"))
    for record in files:
        path = claim(getattr(record, "path", record), "file")
        # A record without an int size is refused by add_file (an invalid size), as it should be.
        tree.add_file(path, getattr(record, "size", None))  # type: ignore[arg-type]
    for path, target in symlinks.items():
        tree.add_symlink(claim(path, "symlink"), target)
    tree.finish()
