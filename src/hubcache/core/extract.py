"""Safe, streaming extraction of an archive into an :class:`~hubcache.core.store.EntryWriter`.

Bytes flow source -> digest/progress meter -> decoder -> tar reader -> writer, one bounded
chunk at a time: no archive copy on disk, memory independent of the archive's size. Every member
is checked before anything is written for it.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .errors import ArchiveError, UnsafeArchiveError
from .formats import CHUNK, Readable, read_head, sniff
from .manifest import FileRecord, Manifest, crc_hex
from .paths import Limits
from .pipeline import ForwardReader, background_digest, crc32_function, decoding, member_data
from .store import EntryWriter

_NOT_ARCHIVES = {
    "empty": "the server sent an empty body, not an archive",
    "html": "the server sent an HTML page, not an archive",
    "unknown": "the bytes are not a tar archive (nor gzip, zstd, bzip2 or xz compressed)",
}


class Meter:
    """Passes bytes through, hashing them and reporting progress at most every 0.1 s."""

    def __init__(self, raw: Readable, algorithms: tuple[str, ...] = ("sha256",),
                 on_progress: Callable[[int], None] | None = None):
        self._raw = raw
        self.hashes = {name: hashlib.new(name) for name in algorithms}
        self.bytes = 0
        self._on_progress = on_progress
        self._next_report = 0.0
        #: a ``pipeline.HashWorker`` that digests on another core while ``extract`` runs
        self.hasher = None

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self.bytes += len(data)
            if self.hasher is not None:
                self.hasher.put(data)
            else:
                for h in self.hashes.values():
                    h.update(data)
            if self._on_progress is not None:
                now = time.monotonic()
                if now >= self._next_report:
                    self._next_report = now + 0.1
                    self._on_progress(self.bytes)
        return data

    def drain(self) -> None:
        """Read to the end (trailing padding), so the digests cover every byte."""
        while self.read(CHUNK):
            pass


@dataclass
class Contents:
    """What the extractor wrote (becomes the manifest's file lists)."""

    files: dict[str, FileRecord] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    symlinks: dict[str, str] = field(default_factory=dict)
    format: str = ""

    def manifest(self, **fields) -> Manifest:
        return Manifest(files=sorted(self.files.values(), key=lambda f: f.path),
                        dirs=sorted(self.dirs), symlinks=dict(sorted(self.symlinks.items())), **fields)


def member_path(name: str) -> str | None:
    """Normalise a member name to a safe relative path; ``None`` for the archive root (``./``).

    Raises:
        UnsafeArchiveError: for absolute paths and ``..`` components.
    """
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path", member=name)
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} leaves the entry with '..'", member=name)
    return "/".join(parts) or None


def extract(raw: Readable, writer: EntryWriter, limits: Limits) -> Contents:
    """Detect the format of ``raw``, decode it and unpack its tar stream into ``writer``.

    Raises:
        ArchiveError: the bytes are not a readable archive.
        UnsafeArchiveError: a member would escape the entry or a limit is exceeded.
    """
    head = read_head(raw, 512)
    fmt = sniff(head)
    if fmt in _NOT_ARCHIVES:
        raise ArchiveError(_NOT_ARCHIVES[fmt])
    # The digest and the decoder run in threads, overlapping the unpacking (see pipeline.py).
    with background_digest(raw), decoding(fmt, head, raw) as decoded:
        return _extract_decoded(fmt, decoded, writer, limits)


def _extract_decoded(fmt: str, decoded: Readable, writer: EntryWriter, limits: Limits) -> Contents:
    contents = Contents(format=fmt)
    try:
        tar = tarfile.open(fileobj=ForwardReader(decoded), mode="r:")
        _unpack(tar, writer, limits, contents)
    except tarfile.TarError as error:
        if fmt != "tar" and "empty" in str(error).lower():
            raise ArchiveError(f"the {fmt} stream holds no tar archive") from None
        kind = "not a tar archive" if not contents.files and not contents.dirs else "a damaged tar archive"
        raise ArchiveError(f"{kind}: {error}") from None
    except EOFError as error:
        raise ArchiveError(f"the archive is truncated: {error}") from None
    # Decode to the end so compressed trailers (CRC, sizes, checksums) are checked too.
    _drain(decoded, limits)
    return contents


#: Decoded bytes allowed after the tar end-of-archive marker. Writers pad to a record (10 KiB by
#: default, 1 MiB with the largest blocking factors); more is refused at once, so a tiny download
#: cannot make hubcache decode gigabytes of trailing zeros before the size limit trips.
MAX_TRAILER = 16 << 20


def _drain(decoded: Readable, limits: Limits) -> None:
    left = min(limits.max_bytes, MAX_TRAILER)
    while True:
        data = decoded.read(CHUNK)
        if not data:
            return
        left -= len(data)
        if left < 0:
            raise UnsafeArchiveError(f"the archive has more than {min(limits.max_bytes, MAX_TRAILER)} bytes "
                                     "after its end (a decompression bomb?)", member="")


def _unpack(tar: tarfile.TarFile, writer: EntryWriter, limits: Limits, contents: Contents) -> None:
    crc32 = crc32_function()
    total = 0
    count = 0
    for member in tar:
        count += 1
        if count > limits.max_members:
            raise UnsafeArchiveError(
                f"the archive has more than {limits.max_members} members",
                member=member.name, hint="raise HUBCACHE_MAX_MEMBERS if this archive is trusted")
        path = member_path(member.name)
        if path is None:
            continue
        _check_not_through_link(path, member.name, contents)
        if member.isdir():
            _add_parents(path, writer, contents, include_self=True)
        elif member.isreg():
            total += member.size
            if total > limits.max_bytes:
                raise UnsafeArchiveError(
                    f"the archive unpacks to more than {limits.max_bytes} bytes",
                    member=member.name, hint="raise HUBCACHE_MAX_EXTRACT_SIZE if this archive is trusted")
            _add_parents(path, writer, contents)
            _forget(path, contents)
            pieces = member_data(tar, member)
            crc = [0]
            written = [0]

            def chunks(pieces=pieces) -> Iterator[bytes]:
                for data in pieces:
                    crc[0] = crc32(data, crc[0])
                    written[0] += len(data)
                    yield data

            writer.add_file(path, chunks(), executable=bool(member.mode & 0o111))
            if written[0] != member.size:
                raise ArchiveError(f"archive member {member.name!r} is truncated")
            contents.files[path] = FileRecord(path, written[0], crc_hex(crc[0]))
        elif member.issym():
            _check_link_target(path, member.linkname, member.name, contents)
            _add_parents(path, writer, contents)
            _forget(path, contents)
            writer.add_symlink(path, member.linkname)
            contents.symlinks[path] = member.linkname
        elif member.islnk():
            target = member_path(member.linkname)
            if target is None or target not in contents.files:
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} is a hard link to {member.linkname!r}, "
                    "which is not a file earlier in the archive", member=member.name)
            _add_parents(path, writer, contents)
            _forget(path, contents)
            writer.add_hardlink(path, target)
            record = contents.files[target]
            contents.files[path] = FileRecord(path, record.size, record.crc32)
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "fifo"}.get(member.type, f"special file (type {member.type!r})")
            raise UnsafeArchiveError(f"archive member {member.name!r} is a {kind}", member=member.name)


def _forget(path: str, contents: Contents) -> None:
    # A later member replaces an earlier one of the same name, as tar does.
    if path in contents.dirs:
        raise UnsafeArchiveError(f"archive member {path!r} replaces a directory", member=path)
    contents.files.pop(path, None)
    contents.symlinks.pop(path, None)


def _add_parents(path: str, writer: EntryWriter, contents: Contents, include_self: bool = False) -> None:
    parts = path.split("/")
    end = len(parts) if include_self else len(parts) - 1
    for i in range(1, end + 1):
        sub = "/".join(parts[:i])
        if sub in contents.dirs:
            continue
        if sub in contents.files or sub in contents.symlinks:
            raise UnsafeArchiveError(f"archive member {path!r} needs {sub!r} to be a directory, "
                                     "but it is a file or link", member=path)
        writer.add_dir(sub)
        contents.dirs.add(sub)


def _check_not_through_link(path: str, name: str, contents: Contents) -> None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in contents.symlinks:
            raise UnsafeArchiveError(
                f"archive member {name!r} would be written through the symlink {'/'.join(parts[:i])!r}",
                member=name)


def _check_link_target(path: str, target: str, name: str, contents: Contents) -> None:
    if not target or target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} is a symlink to the absolute path {target!r}",
                                 member=name)
    stack = path.split("/")[:-1]
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(f"archive member {name!r} is a symlink to {target!r}, "
                                         "outside the entry", member=name)
            stack.pop()
            continue
        stack.append(part)
        if "/".join(stack) in contents.symlinks:
            raise UnsafeArchiveError(f"archive member {name!r} is a symlink through another symlink "
                                     f"({'/'.join(stack)!r})", member=name)
    if posixpath.normpath(posixpath.join(posixpath.dirname(path), target)).startswith(".."):
        raise UnsafeArchiveError(f"archive member {name!r} is a symlink outside the entry", member=name)
