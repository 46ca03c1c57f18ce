"""Archive formats: detection from the first bytes, and streaming decoders.

Decoders read compressed bytes from a source in large chunks and hand out bounded pieces of
output (a decompression bomb can never make one call allocate more than ``max_length``).
Truncated streams are errors here, not silently short output: gzip, bz2 and xz decoders say when
their stream ended early; for zstd, whose streaming reader does not, a small frame walker follows
the frame and block headers as bytes pass.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from types import ModuleType
from typing import IO, Callable, Protocol, cast

from ..core.errors import ArchiveError, UnsafeArchiveError

CHUNK = 1 << 20
#: Chunks each queue may hold (raw into the decoder, decoded out of it, raw into the digest).
DEPTH = 4

#: Memory a decoder may use for its dictionary or window: what zstd allows by default (2**27), and
#: twice what ``xz -9`` needs; bzip2 needs no limit (its blocks are at most 900 kB, so its decoder
#: stays under 4 MiB whatever the input).
DECODER_MEMORY = 128 << 20
#: Compressed bytes a decoder may read in a row without producing output (zero padding, empty
#: gzip or bzip2 members, zstd skippable frames). Real compressed data yields output long before
#: (a deflate block at least every 64 KiB of input, a bzip2 block under 1 MiB, a zstd block at
#: most 128 KiB); tools pad archives to at most 1 MiB.
MAX_IDLE_INPUT = 4 << 20

MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def sniff(head: bytes) -> str:
    """Name the format of a stream from its first bytes (at least 512 if the stream has them).

    Returns one of ``gz``, ``zst``, ``bz2``, ``xz``, ``tar``, and for things that are not
    archives: ``empty``, ``html``, ``unknown``.
    """
    if not head:
        return "empty"
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 512 and _is_v7_tar_header(head[:512]):
        return "tar"
    text = head[:256].lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "html"
    return "unknown"


def _is_v7_tar_header(block: bytes) -> bool:
    try:
        stored = int(block[148:156].replace(b"\x00", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return stored == computed


class PrefixedReader:
    """A reader that first returns ``head`` and then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: Readable):
        self._head = head
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0 or size >= len(self._head):
                data, self._head = self._head, b""
                if size >= 0 and len(data) < size:
                    data += self._raw.read(size - len(data))
                elif size < 0:
                    data += self._raw.read()
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._raw.read(size)


def read_head(raw: Readable, size: int = 512) -> bytes:
    """Read up to ``size`` bytes, looping over short reads (network streams return them)."""
    parts, got = [], 0
    while got < size:
        part = raw.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _Idle:
    """The raw input of a decoder, counting the bytes read since the decoder last gave output."""

    def __init__(self, raw: Readable, name: str):
        self._raw = raw
        self._name = name
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        if self.count > MAX_IDLE_INPUT:
            raise ArchiveError(f"the {self._name} stream has more than {MAX_IDLE_INPUT} bytes in a row that decode "
                               "to nothing (zero padding, empty members or skippable frames)",
                               hint="the file is damaged or made to keep hubcache reading")
        return data


def _memory_error(name: str, error: BaseException) -> ArchiveError | None:
    text = str(error).lower()
    if "memory" in text and ("limit" in text or "too much" in text):
        return ArchiveError(f"the {name} stream needs more than {DECODER_MEMORY >> 20} MiB of memory to decode "
                            "(its dictionary or window is too large)",
                            hint="recompress it with a smaller dictionary, e.g. xz -9 or zstd without --long")
    return None


class _Decompressor(Protocol):
    """What :class:`_Decoder` uses of a stdlib-style decompressor (zlib's, bz2's, lzma's, isal's)."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, max_length: int, /) -> bytes: ...


class _ZlibDecompressor(_Decompressor, Protocol):
    """zlib's kind: hands back the input it has not consumed yet."""

    @property
    def unconsumed_tail(self) -> bytes: ...


class _BufferingDecompressor(_Decompressor, Protocol):
    """bz2's and lzma's kind: keeps its own input buffer, and says when it needs more."""

    @property
    def needs_input(self) -> bool: ...


class _Decoder:
    """Bounded-output decoding of a multi-member stream with a stdlib-style decompressor.

    Input goes to the decompressor in slices of at most :data:`SLICE` bytes (views, not copies):
    at the end of a member the decompressor copies what is left of its input, so whole chunks
    would make a stream of tiny members (empty gzip members, bgzf blocks) quadratic.
    """

    SLICE = 64 << 10

    def __init__(self, raw: Readable, new: Callable[[], _Decompressor], name: str, trailing_zeros_ok: bool):
        self._raw = _Idle(raw, name)
        self._new = new
        self._name = name
        self._trailing_zeros_ok = trailing_zeros_ok
        self._dec = new()
        self._zlib = not hasattr(self._dec, "needs_input")  # bz2 / lzma keep their own input buffer
        self._chunk = memoryview(b"")
        self._pos = 0
        self._carry: bytes | memoryview = b""
        self._eof = False

    def _take(self) -> bytes | memoryview:
        """The next piece of input, at most :data:`SLICE` bytes; empty at the end of the source."""
        if self._carry:
            data, self._carry = self._carry, b""
            return data
        if self._pos >= len(self._chunk):
            self._chunk, self._pos = memoryview(self._raw.read(CHUNK)), 0
        data = self._chunk[self._pos:self._pos + self.SLICE]
        self._pos += len(data)
        return data

    def _next_member(self, rest: bytes | memoryview) -> None:
        if not rest:
            rest = self._take()
        # Zero padding after the last member (some tools write it) is read past and dropped;
        # looping on it without consuming it would spin forever. (_Idle bounds an endless one.)
        while self._trailing_zeros_ok and rest and not bytes(rest).strip(b"\x00"):
            rest = self._take()
        if not rest:
            self._eof = True
            return
        self._dec = self._new()
        self._carry = rest

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = CHUNK
        while not self._eof:
            dec = self._dec
            if dec.eof:
                self._next_member(dec.unused_data)
                continue
            if self._zlib:
                data = cast(_ZlibDecompressor, dec).unconsumed_tail or self._take()
                missing = not data
            else:
                buffering = cast(_BufferingDecompressor, dec)
                data = self._take() if buffering.needs_input else b""
                missing = buffering.needs_input and not data
            if missing:
                raise ArchiveError(f"the {self._name} stream is truncated (it ends before its end marker)",
                                   hint="the download was cut short or the file is damaged")
            try:
                out = dec.decompress(data, size)
            # mypy does not follow the starred tuple (every item is an exception class).
            except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError,  # type: ignore[misc]
                    *_inflate_errors()) as error:
                raise _memory_error(self._name, error) or ArchiveError(f"corrupt {self._name} data: {error}") from None
            if out:
                self._raw.count = 0
                return out
        return b""


class ZstdFrameWalker:
    """Follows zstd frame and block headers to tell whether the stream ended cleanly.

    zstandard's stream reader returns short output, not an error, when its input is truncated;
    watching the headers as the bytes pass costs almost nothing and catches that.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "magic"
        self._header_len = 0
        self._skip = 0
        self._after = ""
        self._checksum = False
        #: True when the bytes seen so far end exactly at a frame boundary.
        self.complete = True

    def _need(self) -> int:
        return {"magic": 4, "fhd": 1, "header": self._header_len, "block": 3, "skiplen": 4}[self._state]

    def feed(self, data: bytes) -> None:
        view, pos, end = memoryview(data), 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._skipped()
                continue
            take = min(self._need() - len(self._buf), end - pos)
            self._buf += view[pos:pos + take]
            pos += take
            if self._state == "magic":
                self.complete = False  # a frame has begun, even if its magic is not all here
            if len(self._buf) == self._need():
                self._parse(bytes(self._buf))
                self._buf.clear()

    def _skip_then(self, count: int, after: str) -> None:
        self._skip, self._after = count, after
        if not count:
            self._skipped()

    def _skipped(self) -> None:
        after = self._after
        if after == "block":
            self._state = "block"
        elif after == "checksum":
            self._skip_then(4 if self._checksum else 0, "end")
        else:  # end of a frame
            self.complete = True
            self._state = "magic"

    def _parse(self, buf: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(buf, "little")
            self.complete = False
            if magic == 0xFD2FB528:
                self._state = "fhd"
            elif magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame
                self._state = "skiplen"
            else:
                raise ArchiveError("corrupt zstd data: bad frame magic")
        elif state == "skiplen":
            self._skip_then(int.from_bytes(buf, "little"), "end")
        elif state == "fhd":
            fhd = buf[0]
            fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
            self._checksum = bool((fhd >> 2) & 1)
            self._header_len = (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + (single, 2, 4, 8)[fcs_flag]
            if self._header_len:
                self._state = "header"
            else:
                self._state = "block"
        elif state == "header":
            self._state = "block"
        elif state == "block":
            header = int.from_bytes(buf, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise ArchiveError("corrupt zstd data: reserved block type")
            self._skip_then(1 if kind == 1 else size, "checksum" if last else "block")


class _ZstdDecoder:
    def __init__(self, raw: Readable):
        import zstandard

        self._walker = ZstdFrameWalker()
        self._idle = _Idle(raw, "zstd")
        # zstandard reads any object with a read(); its stubs ask for a whole binary file.
        self._reader = zstandard.ZstdDecompressor(max_window_size=DECODER_MEMORY).stream_reader(
            cast(IO[bytes], _Watched(self._idle, self._walker)), read_size=CHUNK, read_across_frames=True)

    def read(self, size: int = -1) -> bytes:
        import zstandard

        if size is None or size < 0:
            size = CHUNK
        try:
            out = self._reader.read(size)
        except zstandard.ZstdError as error:
            raise _memory_error("zstd", error) or ArchiveError(f"corrupt zstd data: {error}") from None
        if out:
            self._idle.count = 0
        if not out and not self._walker.complete:
            raise ArchiveError("the zstd stream is truncated (it ends inside a frame)",
                               hint="the download was cut short or the file is damaged")
        return out


class _Watched:
    def __init__(self, raw: Readable, walker: ZstdFrameWalker):
        self._raw = raw
        self._walker = walker

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._walker.feed(data)
        return data


_inflate: ModuleType | None = None


def inflate_module() -> ModuleType:
    """The gzip inflater: ISA-L's (``isal``, same API as :mod:`zlib`, about 1.5x faster here) when
    installed, else the standard library's."""
    global _inflate
    if _inflate is None:
        module: ModuleType  # zlib or isal_zlib, whichever is installed (the same API)
        try:
            from isal import isal_zlib as module
        except ImportError:
            module = zlib
        _inflate = module
    return _inflate


def _inflate_errors() -> tuple[type[BaseException], ...]:
    module = inflate_module()
    return () if module is zlib else (module.error,)  # isal's error is not a zlib.error


def open_decoder(fmt: str, raw: Readable) -> Readable:
    """Return a reader of the decompressed bytes of ``raw`` (format from :func:`sniff`)."""
    if fmt == "tar":
        return raw
    if fmt == "gz":
        return _Decoder(raw, lambda: inflate_module().decompressobj(wbits=31), "gzip", trailing_zeros_ok=True)
    if fmt == "bz2":
        return _Decoder(raw, bz2.BZ2Decompressor, "bzip2", trailing_zeros_ok=False)
    if fmt == "xz":
        return _Decoder(raw, lambda: lzma.LZMADecompressor(memlimit=DECODER_MEMORY), "xz", trailing_zeros_ok=False)
    if fmt == "zst":
        return _ZstdDecoder(raw)
    raise ValueError(fmt)


#: Bytes allowed after the tar end-of-archive marker, both decoded and raw (compressed). Writers
#: pad to a record (10 KiB by default, 1 MiB with the largest blocking factors); more is refused
#: at once, so a tiny download cannot make hubcache decode gigabytes of trailing zeros, and an
#: endless trailer (zero padding, empty gzip members, zstd skippable frames) cannot hold the lock.
MAX_TRAILER = 16 << 20


def read_to_end(reader: Readable, limit: int) -> None:
    """Read ``reader`` to its end, refusing more than ``limit`` bytes: whatever follows an
    archive's end is bounded (an endless trailer, a decompression bomb), never read forever."""
    left = limit
    while True:
        data = reader.read(CHUNK)
        if not data:
            return
        left -= len(data)
        if left < 0:
            raise UnsafeArchiveError(f"the archive goes on for more than {limit} bytes after its end "
                                     "(an endless trailer or a decompression bomb?)", member="")
