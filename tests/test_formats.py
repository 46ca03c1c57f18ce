"""Unit tests of format detection and the streaming decoders (``hubcache.archive.formats``).

The public-API tests resolve one archive per format; these pin down the pieces underneath where
a resolve would be too indirect: what ``sniff`` says for every kind of first bytes, that every
decoder turns a truncated or corrupt stream into an ``ArchiveError`` (never short output), that
output is bounded per call, and the zstd frame walker that catches truncation zstandard misses.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import struct
import tarfile

import pytest
import zstandard

from hubcache import ArchiveError
from hubcache.archive.formats import (
    PrefixedReader,
    ZstdFrameWalker,
    open_decoder,
    read_head,
    sniff,
)
from hubcache.testing import FORMATS, compress

PAYLOAD = random.Random(7).randbytes(150_000) + bytes(100_000)


def small_tar(fmt: str = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("saved_model.pb")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"model"))
    return buf.getvalue()


def decode_all(fmt: str, data: bytes, size: int = 65536) -> bytes:
    reader = open_decoder(fmt, io.BytesIO(data))
    out = []
    while chunk := reader.read(size):
        assert len(chunk) <= size
        out.append(chunk)
    return b"".join(out)


class Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int):
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size is None or size < 0 else min(size, self._step)
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk


# -- sniff ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_sniff_names_every_format_from_its_first_bytes(fmt):
    data = compress(small_tar(), fmt)
    assert sniff(data[:512]) == fmt


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_sniff_knows_every_tar_dialect(tar_format):
    assert sniff(small_tar(tar_format)[:512]) == "tar"


def v7_tar() -> bytes:
    """A pre-POSIX tar (no ``ustar`` magic): recognised only by its header checksum."""
    data = bytearray(small_tar(tarfile.USTAR_FORMAT))
    header = data[:512]
    header[257:265] = bytes(8)  # remove magic and version
    header[148:156] = b" " * 8
    checksum = sum(header)
    header[148:156] = b"%06o\x00 " % checksum
    data[:512] = header
    return bytes(data)


def test_sniff_recognises_a_v7_tar_by_its_checksum_and_tarfile_agrees():
    data = v7_tar()
    assert data[257:262] != b"ustar"
    assert sniff(data[:512]) == "tar"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["saved_model.pb"]
    # The same header with a wrong checksum is not a tar.
    broken = bytearray(data)
    broken[0] ^= 0x01
    assert sniff(bytes(broken[:512])) == "unknown"


@pytest.mark.parametrize("head", [
    b"<!DOCTYPE html><html><body>Sign in</body></html>",
    b"\n\n   <html lang='en'>",
    b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
    b"<HEAD><title>x</title></HEAD>",
])
def test_sniff_calls_html_and_xml_error_pages_html(head):
    assert sniff(head) == "html"


@pytest.mark.parametrize("head, expected", [
    (b"", "empty"),
    (b"\x1f", "unknown"),  # one byte of a gzip magic is not gzip
    (b"PK\x03\x04" + bytes(600), "unknown"),  # a zip
    (b"{\"error\": \"not found\"}", "unknown"),
    (bytes(512), "unknown"),  # a block of zeros is tar's end marker, not an archive
])
def test_sniff_says_what_is_not_an_archive(head, expected):
    assert sniff(head) == expected


def test_read_head_loops_over_short_reads():
    data = compress(small_tar(), "gz")
    assert read_head(Trickle(data, 7), 512) == data[:512]
    assert read_head(io.BytesIO(b"abc"), 512) == b"abc"


@pytest.mark.parametrize("sizes", [[-1], [3, -1], [10, 10, 10, -1], [1000], [2, 1000]])
def test_prefixed_reader_replays_the_head_then_the_rest(sizes):
    reader = PrefixedReader(b"0123456789", io.BytesIO(b"abcdefghij"))
    out = b""
    for size in sizes:
        out += reader.read(size)
    out += reader.read()
    assert out == b"0123456789abcdefghij"


# -- decoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_decoder_round_trips_in_bounded_pieces(fmt):
    assert decode_all(fmt, compress(PAYLOAD, fmt), size=4096) == PAYLOAD


@pytest.mark.parametrize("fmt", ["gz", "zst", "bz2", "xz"])
def test_a_bomb_never_makes_one_read_return_more_than_asked(fmt):
    # 8 MiB of zeros compress to a few KiB; every read must still be bounded.
    bomb = compress(bytes(8 << 20), fmt)
    assert len(bomb) < 1 << 16
    reader = open_decoder(fmt, io.BytesIO(bomb))
    for _ in range(50):
        assert 0 < len(reader.read(1 << 16)) <= 1 << 16


@pytest.mark.parametrize("fmt", ["gz", "zst", "bz2", "xz"])
def test_concatenated_streams_decode_as_one(fmt):
    # pigz/pzstd/pbzip2 and `cat a.gz b.gz` write several members; tar sees one stream.
    data = compress(PAYLOAD[:1000], fmt) + compress(PAYLOAD[1000:], fmt)
    assert decode_all(fmt, data) == PAYLOAD


def test_gzip_with_zero_padding_after_the_last_member_is_accepted():
    assert decode_all("gz", gzip.compress(PAYLOAD) + bytes(1024)) == PAYLOAD


@pytest.mark.parametrize("fmt", ["gz", "zst", "bz2", "xz"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_a_truncated_stream_is_an_error_not_short_output(fmt, fraction):
    data = compress(PAYLOAD, fmt)
    with pytest.raises(ArchiveError, match="truncated|corrupt"):
        decode_all(fmt, data[: int(len(data) * fraction)])


@pytest.mark.parametrize("fmt", ["gz", "zst", "bz2", "xz"])
def test_a_truncated_stream_read_through_a_slow_socket_is_still_an_error(fmt):
    data = compress(PAYLOAD, fmt)
    reader = open_decoder(fmt, Trickle(data[:-5], 1000))
    with pytest.raises(ArchiveError):
        while reader.read(1 << 16):
            pass


@pytest.mark.parametrize("fmt", ["gz", "zst", "bz2", "xz"])
def test_flipped_bytes_in_the_middle_are_corrupt_data(fmt):
    data = bytearray(compress(PAYLOAD, fmt))
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xA5
    with pytest.raises(ArchiveError):
        decode_all(fmt, bytes(data))


@pytest.mark.parametrize("fmt", ["bz2", "xz"])
def test_garbage_after_the_last_stream_is_corrupt(fmt):
    with pytest.raises(ArchiveError):
        decode_all(fmt, compress(PAYLOAD[:1000], fmt) + b"trailing garbage")


def test_open_decoder_refuses_an_unknown_format():
    with pytest.raises(ValueError):
        open_decoder("zip", io.BytesIO(b""))


def test_stdlib_compressors_used_by_the_builders_match_the_magic_table():
    assert sniff(bz2.compress(b"x")) == "bz2"
    assert sniff(lzma.compress(b"x")) == "xz"
    assert sniff(zstandard.ZstdCompressor().compress(b"x")) == "zst"


# -- the zstd frame walker -------------------------------------------------------------------------


def handmade_frame(content: bytes = b"a" * 300, *, checksum: bool = False) -> bytes:
    """A zstd frame built byte by byte: single-segment header, one raw block and one RLE block.

    zstandard decodes it (checked in the test), so the walker is tested on block kinds the
    compressor may never choose for small inputs.
    """
    half = len(content) // 2
    raw, rle = content[:half], content[half:]
    assert set(rle) == {rle[0]}
    fhd = (1 << 6) | (1 << 5) | (int(checksum) << 2)  # 2-byte content size, single segment
    header = struct.pack("<IBH", 0xFD2FB528, fhd, len(content) - 256)
    raw_block = ((len(raw) << 3) | (0 << 1) | 0).to_bytes(3, "little") + raw
    rle_block = ((len(rle) << 3) | (1 << 1) | 1).to_bytes(3, "little") + rle[:1]
    tail = struct.pack("<I", zstandard_checksum(content)) if checksum else b""
    return header + raw_block + rle_block + tail


def zstandard_checksum(content: bytes) -> int:
    # The frame checksum is the low 32 bits of XXH64(content); take it from a real frame.
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(content)
    return struct.unpack("<I", frame[-4:])[0]


def skippable_frame(payload: bytes = b"metadata") -> bytes:
    return struct.pack("<II", 0x184D2A53, len(payload)) + payload


def real_frames() -> dict[str, bytes]:
    compressible = (b"weights " * 5000) + random.Random(3).randbytes(5000)
    streaming = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(streaming, closefd=False) as w:
        w.write(compressible)  # no content size in the header, several blocks
    return {
        "checksum": zstandard.ZstdCompressor(write_checksum=True).compress(compressible),
        "no_checksum": zstandard.ZstdCompressor(write_checksum=False).compress(compressible),
        "streamed": streaming.getvalue(),
        "multi_block": zstandard.ZstdCompressor(level=1).compress(random.Random(4).randbytes(300_000)),
        "handmade": handmade_frame(),
        "handmade_checksum": handmade_frame(checksum=True),
        "two_frames_and_a_skippable_one": (zstandard.ZstdCompressor().compress(b"one")
                                           + skippable_frame()
                                           + zstandard.ZstdCompressor().compress(b"two")),
    }


@pytest.mark.parametrize("name", sorted(real_frames()))
def test_walker_sees_a_whole_stream_as_complete(name):
    data = real_frames()[name]
    # The stream is valid zstd in the first place.
    decoded = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    assert decoded
    walker = ZstdFrameWalker()
    walker.feed(data)
    assert walker.complete


@pytest.mark.parametrize("name", sorted(real_frames()))
def test_walker_sees_every_proper_prefix_as_incomplete(name):
    data = real_frames()[name]
    boundaries = frame_boundaries(data)
    # Every cut for small streams; for big ones, every cut near the ends and frame boundaries
    # plus a stride through the middle (all cuts of 300 kB would be quadratic).
    cuts = set(range(1, len(data))) if len(data) < 20_000 else (
        set(range(1, 300)) | set(range(len(data) - 300, len(data))) | set(range(1, len(data), 97))
        | {b + d for b in boundaries for d in range(-8, 9) if 0 < b + d < len(data)})
    for cut in sorted(cuts):
        walker = ZstdFrameWalker()
        walker.feed(data[:cut])
        assert walker.complete == (cut in boundaries), f"cut at {cut} of {len(data)}"


def frame_boundaries(data: bytes) -> set[int]:
    """Offsets where one frame ends and the next begins, found with zstandard itself."""
    ends, pos = set(), 0
    while pos < len(data):
        magic = struct.unpack_from("<I", data, pos)[0]
        if magic & 0xFFFFFFF0 == 0x184D2A50:
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
        else:
            pos += len(_one_frame(data[pos:]))
        ends.add(pos)
    return ends


def _one_frame(data: bytes) -> bytes:
    # Find the shortest prefix zstandard accepts as a full frame (frames here are small).
    obj = zstandard.ZstdDecompressor().decompressobj()
    obj.decompress(data)
    return data[: len(data) - len(obj.unused_data)]


@pytest.mark.parametrize("name", ["checksum", "handmade_checksum", "two_frames_and_a_skippable_one"])
def test_walker_gives_the_same_answer_byte_by_byte(name):
    data = real_frames()[name]
    walker = ZstdFrameWalker()
    states = []
    for i in range(len(data)):
        walker.feed(data[i:i + 1])
        states.append(walker.complete)
    assert states[-1] is True
    assert states.count(True) == len(frame_boundaries(data))


def test_walker_rejects_a_bad_magic_and_a_reserved_block_type():
    with pytest.raises(ArchiveError, match="bad frame magic"):
        ZstdFrameWalker().feed(b"\x00\x01\x02\x03rest")
    frame = bytearray(handmade_frame())
    frame[7] |= 0b110  # first block header, type bits 1-2 = 3 (reserved)
    with pytest.raises(ArchiveError, match="reserved block type"):
        ZstdFrameWalker().feed(bytes(frame))


def test_zstd_cut_exactly_at_a_frame_boundary_is_not_mistaken_for_truncation():
    # Two frames; cutting after the first leaves a valid, shorter stream (that is the origin's
    # business, caught by Content-Length); cutting inside the second is an error.
    first, second = zstandard.ZstdCompressor().compress(b"A" * 5000), zstandard.ZstdCompressor().compress(b"B" * 5000)
    assert decode_all("zst", first) == b"A" * 5000
    with pytest.raises(ArchiveError, match="truncated"):
        decode_all("zst", first + second[:-3])


# -- bounded memory and bounded idle input (issue 11, class 5) ----------------------------------------


def endless(prefix: bytes, unit: bytes, cap: int = 64 << 20):
    """A source: ``prefix``, then ``unit`` over and over (``cap`` keeps a failing run finite);
    returns (reader, bytes served so far)."""
    import sys

    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from hostile_tar_builders import Endless

    return Endless(prefix, unit, cap)


@pytest.mark.parametrize("fmt, unit", [
    ("gz", b"\x00" * 4096),  # zero padding after the last member
    ("gz", gzip.compress(b"", mtime=0)),  # empty members
    ("bz2", bz2.compress(b"")),  # empty streams
    ("zst", struct.pack("<II", 0x184D2A50, 1024) + bytes(1024)),  # skippable frames
])
def test_input_that_decodes_to_nothing_is_bounded(fmt, unit):
    """Before: zero padding was read to the end of the source (i.e. forever from an endless
    one), and empty members or skippable frames likewise, with no output to trip a limit."""
    from hubcache.archive.formats import MAX_IDLE_INPUT

    source = endless(compress(b"payload", fmt), unit)
    decoder = open_decoder(fmt, source)
    with pytest.raises(ArchiveError, match="decode to nothing"):
        while decoder.read(1 << 20):
            pass
    assert source.served <= MAX_IDLE_INPUT + (2 << 20)


@pytest.mark.parametrize("fmt", ["gz", "zst"])
def test_idle_input_is_counted_from_the_last_output(fmt):
    """More compressed input than the idle bound decodes fine when it yields output as it goes
    (incompressible data, many members): the count restarts at every output."""
    from hubcache.archive.formats import MAX_IDLE_INPUT

    piece = random.Random(9).randbytes(1 << 20)
    stream = compress(piece, fmt) * (MAX_IDLE_INPUT // len(piece) + 4)
    decoder, total = open_decoder(fmt, io.BytesIO(stream)), 0
    while chunk := decoder.read(1 << 20):
        total += len(chunk)
    assert total == len(piece) * (MAX_IDLE_INPUT // len(piece) + 4) and len(stream) > MAX_IDLE_INPUT


def test_xz_and_zstd_decode_within_128_mib():
    """A dictionary or window over 128 MiB is refused before anything is decoded (xz before: no
    limit; zstd: the same limit, now explicit, with a message that says what is wrong)."""
    import sys

    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from hostile_tar_builders import xz_with_dictionary

    with pytest.raises(ArchiveError, match="needs more than 128 MiB of memory"):
        open_decoder("xz", io.BytesIO(xz_with_dictionary(b"model" * 100, 1 << 30))).read(100)
    assert open_decoder("xz", io.BytesIO(xz_with_dictionary(b"model" * 100, 64 << 20))).read(5) == b"model"
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    big_window = compressor.compress(b"model" * 100) + compressor.flush()
    with pytest.raises(ArchiveError, match="needs more than 128 MiB of memory"):
        open_decoder("zst", io.BytesIO(big_window)).read(100)
