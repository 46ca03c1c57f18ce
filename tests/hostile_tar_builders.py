"""Raw tar bytes for hostile-archive tests: headers built field by field (so checksums, sizes and
types can be anything), pax and GNU metadata members, sparse members, deep trees, and endless
compressed trailers served from generators.

Everything here builds bytes in memory in milliseconds; nothing touches the disk.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from typing import Iterator

BLOCK = 512
END = bytes(2 * BLOCK)


def pad(data: bytes) -> bytes:
    """``data`` padded with zeros to a whole number of 512-byte blocks."""
    return data + bytes(-len(data) % BLOCK)


def header(name: bytes | str, size: int = 0, kind: bytes = b"0", *, linkname: bytes | str = b"",
           mode: int = 0o644, checksum_delta: int = 0, sparse: bytes = b"") -> bytes:
    """One ustar header block (GNU magic), checksum computed unless ``checksum_delta`` spoils it.

    ``size`` is written in octal when it fits 11 digits, else in base-256 (as GNU tar does).
    ``sparse`` fills the old-GNU sparse area (offset 386) as given.
    """
    name = name.encode() if isinstance(name, str) else name
    linkname = linkname.encode() if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:len(name[:100])] = name[:100]
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"0000000\x00"
    block[116:124] = b"0000000\x00"
    if size < 8 ** 11:
        block[124:136] = b"%011o\x00" % size
    else:
        block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[136:148] = b"00000000000\x00"
    block[156:157] = kind
    block[157:157 + len(linkname[:100])] = linkname[:100]
    block[257:265] = b"ustar  \x00"  # GNU magic and version
    if sparse:
        block[386:386 + len(sparse)] = sparse
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % (sum(block) + checksum_delta)
    return bytes(block)


def member(name: str, data: bytes = b"", kind: bytes = b"0", **fields) -> bytes:
    """A header and its padded data."""
    return header(name, len(data), kind, **fields) + pad(data)


def pax_records(**records: str | bytes) -> bytes:
    """Pax extended-header records (``"%d %s=%s\\n"``, the length counting itself)."""
    out = []
    for key, value in records.items():
        value = value.encode() if isinstance(value, str) else value
        body = b" " + key.replace("_", ".").encode() + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out.append(str(length).encode() + body)
    return b"".join(out)


def pax(records: bytes, kind: bytes = b"x") -> bytes:
    """A pax extended header member ('x') or global header ('g') holding ``records``."""
    return member("././@PaxHeader", records, kind)


def tar(*members: bytes, end: bytes = END) -> bytes:
    return b"".join(members) + end


def tarfile_archive(*infos: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An archive written by :mod:`tarfile` (complete, with its end marker and record padding)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as out:
        for info, data in infos:
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, data: bytes | None = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    out = tarfile.TarInfo(name)
    out.type = kind
    out.size = len(data) if data is not None and kind == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(out, key, value)
    return out, data if kind == tarfile.REGTYPE else None


# -- compressed bombs --------------------------------------------------------------------------------


def zstd_zeros(count: int) -> bytes:
    """A zstd frame of ``count`` zero bytes from RLE blocks: 4 bytes per 128 KiB (1 GiB in 32 KiB)."""
    block = 128 << 10
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, (17 - 10) << 3])  # no size, 128 KiB window
    full, rest = divmod(count, block)

    def block_header(last: int, size: int) -> bytes:
        return ((size << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\x00"

    if rest:
        return frame + block_header(0, block) * full + block_header(1, rest)
    return frame + block_header(0, block) * (full - 1) + block_header(1, block)


def zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def zstd_then_zeros(prefix: bytes, zeros: int) -> bytes:
    """``prefix`` (zstd-compressed) followed by ``zeros`` zero bytes as RLE blocks: a stream whose
    decoded form is ``prefix + bytes(zeros)``, a few bytes per 128 KiB."""
    return zstd(prefix) + zstd_zeros(zeros)


def xz_with_dictionary(data: bytes, size: int) -> bytes:
    """``data`` as xz whose header asks for a ``size`` dictionary (a power of two from 4 KiB),
    compressed with a small one: the decoder must reserve ``size`` before decoding anything.
    (Compressing with a real 1 GiB dictionary would take gigabytes here.)"""
    import lzma
    import zlib

    out = bytearray(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                  filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 16}]))
    start = 12  # the stream header
    length = (out[start] + 1) * 4
    block = out[start:start + length]
    assert block[2:4] == b"\x21\x01", "expected one LZMA2 filter with a 1-byte property"
    block[4] = 2 * (size.bit_length() - 1 - 12)  # dictionary size = 2 ** (prop / 2 + 12)
    block[-4:] = zlib.crc32(bytes(block[:-4])).to_bytes(4, "little")
    out[start:start + length] = block
    return bytes(out)


EMPTY_GZIP_MEMBER = gzip.compress(b"", mtime=0)
#: A zstd skippable frame of 1 KiB.
SKIPPABLE_FRAME = struct.pack("<II", 0x184D2A50, 1024) + bytes(1024)


class Endless:
    """A readable source: ``prefix``, then ``unit`` again and again up to ``cap`` bytes in all.

    Stands for a server or file that never ends (``cap`` only keeps a test that fails finite);
    ``served`` says how much was read.
    """

    def __init__(self, prefix: bytes, unit: bytes, cap: int = 1 << 30):
        self._parts = self._generate(prefix, unit, cap)
        self._pending = b""
        self.served = 0

    @staticmethod
    def _generate(prefix: bytes, unit: bytes, cap: int) -> Iterator[bytes]:
        yield prefix
        block = unit * max(1, (256 << 10) // len(unit))
        sent = len(prefix)
        while sent < cap:
            yield block
            sent += len(block)

    def read(self, size: int = -1) -> bytes:
        while not self._pending:
            self._pending = next(self._parts, None)
            if self._pending is None:
                self._pending = b""
                return b""
        if size is None or size < 0:
            size = len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        self.served += len(data)
        return data


# -- deep trees ----------------------------------------------------------------------------------------


def deep_tree(depth: int, members: int) -> bytes:
    """A plain tar with a chain of ``depth`` directories (``d/d/d/...``, one header each, long
    names in GNU ``L`` members) and then empty files spread over all depths, ``members`` in all,
    built header by header (a second, not minutes). The end marker is included."""
    parts: list[bytes] = []
    path = ""

    def named(name: str, kind: bytes) -> bytes:
        raw = name.encode()
        if len(raw) < 100:
            return header(raw, 0, kind)
        return member("././@LongLink", raw + b"\x00", b"L") + header(raw[:99], 0, kind)

    paths = []
    for _ in range(depth):
        path = f"{path}/d" if path else "d"
        paths.append(path)
        parts.append(named(path + "/", b"5"))
    for i in range(members - depth):
        parts.append(named(f"{paths[(i * 7919) % depth]}/f{i}", b"0"))
    return b"".join(parts) + END
