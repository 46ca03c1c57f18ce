"""Safe, streaming extraction of an archive into an :class:`~hubcache.core.store.EntryWriter`.

Bytes flow source -> digest/progress meter -> decoder -> tar reader -> writer, one bounded
chunk at a time: no archive copy on disk, memory independent of the archive's size. Every member
is checked before anything is written for it.
"""

from __future__ import annotations

import lzma
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Iterator, cast

from ..core.errors import ArchiveError, HubcacheError, UnsafeArchiveError
from ..core.manifest import FileRecord, Manifest, crc_hex
from ..core.paths import EntryTree, Limits, member_path
from ..core.store import EntryWriter
from .digest import Meter, background_digest
from .formats import MAX_TRAILER, Readable, read_head, read_to_end, sniff
from .pipeline import ForwardReader, crc32_function, decoding, member_data

if TYPE_CHECKING:
    from typing_extensions import NotRequired, TypedDict, Unpack

    class _ManifestFields(TypedDict):
        """The :class:`Manifest` fields besides the file lists (see :meth:`Contents.manifest`)."""

        handle: str
        source: NotRequired[str]
        archive: NotRequired[dict[str, object]]
        created: NotRequired[float]
        creator: NotRequired[str]

# Meter and MAX_TRAILER stay importable from here (their home before archive/digest.py, formats.py).
__all__ = ["MAX_TRAILER", "Contents", "Limits", "Meter", "extract", "member_path"]


_NOT_ARCHIVES = {
    "empty": "the server sent an empty body, not an archive",
    "html": "the server sent an HTML page, not an archive",
    "unknown": "the bytes are not a tar archive (nor gzip, zstd, bzip2 or xz compressed)",
}


@dataclass
class Contents:
    """What the extractor wrote (becomes the manifest's file lists)."""

    files: dict[str, FileRecord] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    symlinks: dict[str, str] = field(default_factory=dict)
    format: str = ""

    def manifest(self, **fields: Unpack[_ManifestFields]) -> Manifest:
        return Manifest(files=sorted(self.files.values(), key=lambda f: f.path),
                        dirs=sorted(self.dirs), symlinks=dict(sorted(self.symlinks.items())), **fields)


def extract(raw: Readable, writer: EntryWriter, limits: Limits) -> Contents:
    """Detect the format of ``raw``, decode it and unpack its tar stream into ``writer``.

    Raises:
        ArchiveError: the bytes are not a readable, complete archive (whatever tarfile or a
            decoder raised on them becomes one, with one line saying why).
        UnsafeArchiveError: a member would escape the entry or a limit is exceeded.
    """
    head = read_head(raw, 512)
    fmt = sniff(head)
    if fmt in _NOT_ARCHIVES:
        raise ArchiveError(_NOT_ARCHIVES[fmt])
    gate = _TrailerGate(raw)
    # The digest and the decoder run in threads, overlapping the unpacking (see pipeline.py).
    with background_digest(raw), decoding(fmt, head, gate) as decoded:
        return _extract_decoded(fmt, decoded, gate, writer, limits)


#: What tarfile, the decoders and Python raise on hostile input besides ``TarError``: a damaged
#: archive, never a crash (``HubcacheError`` subclasses are let through first).
_DAMAGE = (ValueError, UnicodeError, OverflowError, RecursionError, struct.error, KeyError, IndexError,
           zlib.error, lzma.LZMAError)


class _TrailerGate:
    """Counts the raw bytes read; once the tar has ended, refuses more than :data:`MAX_TRAILER`."""

    def __init__(self, raw: Readable):
        self._raw = raw
        self.bytes = 0
        self._stop_at: int | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.bytes += len(data)
        if self._stop_at is not None and self.bytes > self._stop_at:
            raise UnsafeArchiveError(f"the archive goes on for more than {MAX_TRAILER} compressed bytes after "
                                     "its end (an endless trailer?)", member="")
        return data

    def tar_ended(self) -> None:
        # The decoder reads ahead (a few chunks), so the count already includes some trailer.
        self._stop_at = self.bytes + MAX_TRAILER


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _extract_decoded(fmt: str, decoded: Readable, gate: _TrailerGate, writer: EntryWriter,
                     limits: Limits) -> Contents:
    contents = Contents(format=fmt)
    reader = ForwardReader(decoded)
    try:
        try:
            # Read-only, which is all the r: mode uses: tarfile neither writes nor closes a fileobj it is given.
            tar = tarfile.open(fileobj=cast(IO[bytes], reader), mode="r:")
        except tarfile.ReadError as error:
            if fmt != "tar" and "empty" in str(error).lower():
                raise ArchiveError(f"the {fmt} stream holds no tar archive") from None
            raise ArchiveError(f"not a tar archive: {_one_line(error)}") from None
        _unpack(tar, reader, writer, limits, contents)
        _check_end(reader)
    except HubcacheError:
        raise
    except tarfile.TarError as error:
        kind = "not a tar archive" if not contents.files and not contents.dirs else "a damaged tar archive"
        raise ArchiveError(f"{kind}: {_one_line(error)}") from None
    except EOFError as error:
        raise ArchiveError(f"the archive is truncated: {_one_line(error)}") from None
    except _DAMAGE as error:
        raise ArchiveError(f"a damaged tar archive ({type(error).__name__}: {_one_line(error)})",
                           hint="the file is damaged or was made to attack tar readers") from None
    # Decode to the end so compressed trailers (CRC, sizes, checksums) are checked too.
    gate.tar_ended()
    read_to_end(decoded, min(limits.max_bytes, MAX_TRAILER))
    return contents


def _check_end(reader: ForwardReader) -> None:
    """tarfile stops quietly at a damaged header or at the end of the data; GNU tar calls both
    errors. Tell them from the end-of-archive marker by the block tarfile stopped at."""
    block = reader.last_read
    if len(block) == 512 and block.count(0) != 512:
        raise ArchiveError(f"a damaged tar archive: the header at byte {reader.tell() - 512} is corrupt "
                           "(a bad checksum or field)", hint="the file is damaged; download it again")
    if len(block) != 512:
        where = "between two members" if not block else "inside a header"
        raise ArchiveError(f"the tar archive is truncated: it ends {where}, without the end-of-archive "
                           "marker", hint="the download was cut short or the file is incomplete")


def _unpack(tar: tarfile.TarFile, reader: ForwardReader, writer: EntryWriter, limits: Limits,
            contents: Contents) -> None:
    crc32 = crc32_function()
    tree = EntryTree(limits)
    count = 0
    while True:
        member = tar.next()
        if member is None:
            break
        # tarfile keeps every member otherwise (pax headers and all); typeshed leaves the list out.
        tar.members.clear()  # type: ignore[attr-defined]
        reader.member_done()
        if tar.pax_headers and (len(tar.pax_headers) > 64
                                or sum(len(k) + len(v) for k, v in tar.pax_headers.items()) > 64 << 10):
            raise UnsafeArchiveError("the archive's global extended headers hold more than 64 entries or "
                                     "64 KiB (a header bomb?)", member=member.name)
        count += 1
        if count > limits.max_members:
            raise UnsafeArchiveError(
                f"the archive has more than {limits.max_members} members",
                member=member.name, hint="raise HUBCACHE_MAX_MEMBERS if this archive is trusted")
        path = member_path(member.name)
        if member.sparse is not None or member.type == tarfile.GNUTYPE_SPARSE or any(
                key.startswith("GNU.sparse.") for key in member.pax_headers):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a sparse file, which hubcache does not "
                                     "unpack", member=member.name,
                                     hint="make the archive without --sparse (-S)")
        if path is None:
            if member.isdir():
                continue
            raise UnsafeArchiveError(f"archive member {member.name!r} is not a directory, but is named as the "
                                     "entry's root", member=member.name)
        if member.isdir():
            created = tree.add_dir(path)
            for sub in created:
                writer.add_dir(sub)
            contents.dirs.update(created)
        elif member.isreg():
            _made(tree.add_file(path, member.size), writer, contents)
            contents.symlinks.pop(path, None)
            crc = [0]
            written = [0]

            def chunks(pieces: Iterator[bytes] = member_data(tar, member)) -> Iterator[bytes]:
                for data in pieces:
                    crc[0] = crc32(data, crc[0])
                    written[0] += len(data)
                    yield data

            writer.add_file(path, chunks(), executable=bool(member.mode & 0o111))
            if written[0] != member.size:
                raise ArchiveError(f"archive member {member.name!r} is truncated")
            contents.files[path] = FileRecord(path, written[0], crc_hex(crc[0]))
        elif member.issym():
            _made(tree.add_symlink(path, member.linkname), writer, contents)
            contents.files.pop(path, None)
            writer.add_symlink(path, member.linkname)
            contents.symlinks[path] = member.linkname
        elif member.islnk():
            target = member_path(member.linkname)
            if target is None:
                raise UnsafeArchiveError(f"archive member {member.name!r} is a hard link to {member.linkname!r}, "
                                         "the entry's root",
                                         member=member.name)
            _made(tree.add_hardlink(path, target), writer, contents)
            contents.symlinks.pop(path, None)
            writer.add_hardlink(path, target)
            record = contents.files[target]
            contents.files[path] = FileRecord(path, record.size, record.crc32)
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
                    tarfile.FIFOTYPE: "fifo"}.get(member.type, f"special file (type {member.type!r})")
            raise UnsafeArchiveError(f"archive member {member.name!r} is a {kind}", member=member.name)
    tree.finish()


def _made(created: list[str], writer: EntryWriter, contents: Contents) -> None:
    """Create the directories an addition implied, parents first."""
    for sub in created:
        writer.add_dir(sub)
    contents.dirs.update(created)
