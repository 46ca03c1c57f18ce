"""Bounded resources on hostile archives: small archives built to make the extractor take
unbounded memory, time or input are unpacked by the real extractor into a real cache temp dir
(or, for the peak memory, in a child process whose peak RSS is read from ``/proc``). Tried: a
32 KiB zstd archive whose metadata member (pax header, GNU long name or link, global header)
declares 1 GiB, which tarfile read whole (peak RSS over 2 GiB); 10,000 chained pax headers (a
``RecursionError`` in tarfile); xz and zstd streams asking for a 1 GiB dictionary or window;
1 GiB of bzip2-compressed zeros; a complete archive followed by compressed input that never ends
and decodes to nothing (zero padding, empty gzip members, zstd skippable frames), which was read
to the end of the source, i.e. forever, holding the entry's lock; an archive of 50,000 members
2,000 directories deep, whose path checks were quadratic in the depth (a quarter of an hour);
and sparse members, whose expansion through tarfile is quadratic on a crafted map. Each is now
refused with a one-line error (or, for bzip2, decoded in bounded memory) in a bounded time.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from hubcache import ArchiveError, UnsafeArchiveError
from hubcache.archive.digest import Meter
from hubcache.archive.extract import Limits, extract
from hubcache.archive.formats import MAX_TRAILER
from hubcache.archive.formats import MAX_IDLE_INPUT
from hubcache.archive.pipeline import MAX_METADATA_READ, MAX_READS_PER_MEMBER
from hubcache.core.store import EntryWriter

from extract_sandbox import refused, sandbox, unpack  # noqa: F401 (fixtures)
from hostile_tar_builders import (EMPTY_GZIP_MEMBER, SKIPPABLE_FRAME, Endless, deep_tree, member, pax, pax_records,
                                  tar, xz_with_dictionary, zstd)

SCENARIO = "13. Bounded resources on hostile archives"

#: tests/, where the child processes import the archive builders from.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = member("saved_model.pb", b"model bytes")
MIB = 1 << 20

# -- metadata members ----------------------------------------------------------------------------

#: Peak RSS of the child's own memory: /proc's VmHWM (ru_maxrss would also count the parent's
#: RSS at the fork, which Linux carries across execve).
PEAK_RSS = textwrap.dedent("""
    def peak_rss_kib():
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
""")

RSS_CHILD = PEAK_RSS + textwrap.dedent("""
    import io, json, sys, tempfile, time
    sys.path.insert(0, {here!r})
    import hostile_tar_builders as b
    from hubcache.archive.extract import extract, Limits
    from hubcache.stores.localstore import LocalStore
    body = {body}
    before = peak_rss_kib()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        writer = LocalStore(root).writer("0" * 40, "h")
        try:
            extract(io.BytesIO(body), writer, Limits())
            error = None
        except Exception as caught:
            error = type(caught).__name__ + ": " + str(caught)
        writer.abort()
    print(json.dumps({{"error": error, "bytes": len(body), "seconds": time.perf_counter() - began,
                      "rss_before_kib": before, "peak_rss_kib": peak_rss_kib()}}))
""")

#: Header bombs: a metadata member that declares 1 GiB, its data zeros in 32 KiB of zstd.
HEADER_BOMBS = {
    "pax header of 1 GiB": "b.zstd_then_zeros(b.header('././@PaxHeader', 1 << 30, b'x'), 1 << 30)",
    "GNU long name of 1 GiB": "b.zstd_then_zeros(b.header('././@LongLink', 1 << 30, b'L'), 1 << 30)",
    "GNU long link of 1 GiB": "b.zstd_then_zeros(b.header('././@LongLink', 1 << 30, b'K'), 1 << 30)",
    "global pax header of 1 GiB": "b.zstd_then_zeros(b.header('pax_global_header', 1 << 30, b'g'), 1 << 30)",
}


def run_child(script: str) -> dict:
    """Run ``script`` in a fresh interpreter; its last line of output, as JSON."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(HEADER_BOMBS))
def test_a_header_bomb_takes_no_memory(name, figures):
    """A 32 KiB archive whose metadata member declares 1 GiB is refused before it is read; peak
    RSS of the whole process stays under 150 MiB (before: tarfile read the member whole: >2 GiB)."""
    result = run_child(RSS_CHILD.format(here=TESTS, body=HEADER_BOMBS[name]))
    assert result["bytes"] < 40 << 10
    assert result["error"] and result["error"].startswith("UnsafeArchiveError"), result
    assert "more than 1048576" in result["error"]
    peak_mib = result["peak_rss_kib"] / 1024
    assert peak_mib < 150, f"{name}: peak RSS {peak_mib:.0f} MiB"
    error, _, message = result["error"].partition(": ")
    figures.update(run=f"{name} in {result['bytes'] >> 10} KiB of zstd, in a child process",
                   error=error, message=message[:110], refused_in_s=round(result["seconds"], 3),
                   peak_rss_mib=round(peak_mib, 1), rss_at_start_mib=round(result["rss_before_kib"] / 1024, 1))


def test_chained_extended_headers_are_bounded(unpack, sandbox, figures):
    """10,000 pax headers in a row before one member (before: RecursionError from tarfile, or
    every header parsed)."""
    chain = pax(pax_records(comment="x")) * 10_000
    body = zstd(tar(chain + MODEL))
    began = time.perf_counter()
    error = refused(unpack, sandbox, body, UnsafeArchiveError, f"more than {MAX_READS_PER_MEMBER} header blocks")
    seconds = time.perf_counter() - began
    assert isinstance(error, UnsafeArchiveError)
    figures.update(run=f"10,000 chained pax headers before one member, {len(body):,} bytes of zstd",
                   error=type(error).__name__, message=error.message[:120], refused_in_s=round(seconds, 3),
                   header_blocks_limit=MAX_READS_PER_MEMBER, metadata_read_limit_mib=MAX_METADATA_READ / MIB)


# -- decoder memory ------------------------------------------------------------------------------


def test_xz_decodes_within_a_memory_limit(unpack, sandbox, figures):
    """An xz stream asking for a 1 GiB dictionary is refused at once (before: decoded); one made
    by ``xz -9e`` (a 64 MiB dictionary) is unpacked."""
    data = tar(MODEL)
    big = xz_with_dictionary(data, 1 << 30)
    began = time.perf_counter()
    error = refused(unpack, sandbox, big, ArchiveError, "needs more than 128 MiB of memory")
    seconds = time.perf_counter() - began
    contents, _ = unpack(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))  # xz -9e: 64 MiB, fine
    assert "saved_model.pb" in contents.files
    figures.update(run="an xz stream whose header asks for a 1 GiB dictionary; then one made with xz -9e",
                   error=type(error).__name__, message=error.message[:120], refused_in_s=round(seconds, 3),
                   xz_9e="unpacked")


def test_zstd_decodes_within_a_window_limit(unpack, sandbox, figures):
    """A zstd stream made with a 256 MiB window (``--long=28``) is refused before decoding."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, write_content_size=False)
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    body = compressor.compress(tar(MODEL)) + compressor.flush()
    began = time.perf_counter()
    error = refused(unpack, sandbox, body, ArchiveError, "needs more than 128 MiB of memory")
    figures.update(run="a zstd stream with a 256 MiB window (window_log 28)", error=type(error).__name__,
                   message=error.message[:120], refused_in_s=round(time.perf_counter() - began, 3))


DECODE_CHILD = PEAK_RSS + textwrap.dedent("""
    import bz2, io, json, time
    from hubcache.archive.formats import open_decoder
    stream = bz2.compress(bytes(8 << 20), 9) * 128  # 1 GiB of zeros in 128 bzip2 streams
    before = peak_rss_kib()
    began = time.perf_counter()
    decoder, total = open_decoder("bz2", io.BytesIO(stream)), 0
    while True:
        data = decoder.read(1 << 20)
        if not data:
            break
        total += len(data)
    print(json.dumps({"compressed": len(stream), "decoded": total, "seconds": time.perf_counter() - began,
                      "rss_before_kib": before, "peak_rss_kib": peak_rss_kib()}))
""")


def test_bz2_decoder_memory_is_bounded_by_its_format(figures):
    """bzip2 needs no memory limit: its blocks are at most 900 kB. Decoding 1 GiB of zeros from a
    few KiB raises peak RSS by a few MiB at most."""
    result = run_child(DECODE_CHILD)
    assert result["decoded"] == 1 << 30
    grew_mib = (result["peak_rss_kib"] - result["rss_before_kib"]) / 1024
    assert grew_mib < 16, grew_mib
    figures.update(run=f"decode 1 GiB of zeros from {result['compressed']:,} bytes of bzip2 (128 streams), "
                       "in a child process",
                   decoded_mib=result["decoded"] / MIB, decoded_in_s=round(result["seconds"], 2),
                   peak_rss_growth_mib=round(grew_mib, 1), peak_rss_mib=round(result["peak_rss_kib"] / 1024, 1))


# -- input after the end of the archive ----------------------------------------------------------

#: name -> (format, the unit repeated forever, whether the tar before it is complete). The first
#: five decode to nothing (the idle-input limit), the last two to something (the trailer limits).
ENDLESS = {
    "gzip zero padding": ("gz", b"\x00" * 4096, True),
    "empty gzip members": ("gz", EMPTY_GZIP_MEMBER, True),
    "zstd skippable frames": ("zst", SKIPPABLE_FRAME, True),
    "gzip zeros of a tar that never ends": ("gz", b"\x00" * 4096, False),
    "zstd skippable frames before the tar ends": ("zst", SKIPPABLE_FRAME, False),
    "zeros after a plain tar": ("tar", b"\x00" * 4096, True),
    "gzip members of random data": ("gz", gzip.compress(random.Random(13).randbytes(64 << 10), mtime=0), True),
}


def _limit_hit(message: str) -> str:
    if "decode to nothing" in message:
        return f"idle input ({MAX_IDLE_INPUT // MIB} MiB)"
    if "compressed bytes after its end" in message:
        return f"raw trailer ({MAX_TRAILER // MIB} MiB)"
    return f"decoded trailer ({MAX_TRAILER // MIB} MiB)"


@pytest.mark.parametrize("name", list(ENDLESS))
def test_an_endless_trailer_ends_in_an_error(name, unpack, sandbox, figures):
    """Input that never ends, after a tar or before its end, is refused after a bounded read:
    at most ``MAX_IDLE_INPUT`` bytes in a row that decode to nothing, at most ``MAX_TRAILER``
    raw or decoded bytes after the end marker, plus read-ahead (before: read to the end of the
    source, i.e. forever, holding the entry's lock; the source here stops at 96 MiB to keep a
    failing run finite)."""
    fmt, unit, complete = ENDLESS[name]
    archive = tar(MODEL) if complete else MODEL
    prefix = {"gz": gzip.compress, "zst": zstd, "tar": bytes}[fmt](archive)
    source = Endless(prefix, unit, cap=96 << 20)
    meter = Meter(source)
    began = time.perf_counter()
    error = refused(unpack, sandbox, meter, ArchiveError, "after its end|decode to nothing")
    seconds = time.perf_counter() - began
    assert source.served < max(MAX_TRAILER, MAX_IDLE_INPUT) + (8 << 20), source.served
    kind = {"gz": ".tar.gz", "zst": ".tar.zst", "tar": "plain .tar"}[fmt]
    figures.update(run=f"{'a complete ' + kind if complete else kind + ' with no end marker'}, "
                       f"then {len(unit):,}-byte units forever",
                   error=type(error).__name__, message=error.message[:110], limit_hit=_limit_hit(error.message),
                   raw_bytes_read_mib=round(source.served / MIB, 1), refused_in_s=round(seconds, 3))


# -- deep paths ----------------------------------------------------------------------------------


class NullWriter(EntryWriter):
    """Consumes and discards: this test measures the extractor's checks, not the file system
    (creating 50,000 files 2,000 directories deep costs the kernel a path walk per call, ~1 ms
    each on this machine's overlay file system, whatever the extractor does)."""

    def add_dir(self, path):
        pass

    def add_file(self, path, chunks, executable=False):
        for _ in chunks:
            pass

    def add_symlink(self, path, target):
        pass

    def add_hardlink(self, path, existing):
        pass

    def commit(self, manifest):
        return ""

    def abort(self):
        pass


def test_a_deep_tree_at_the_member_limit_takes_seconds(figures):
    """50,000 members in a chain 2,000 directories deep (paths up to 4 KiB): the checks cost
    time linear in the depth (before: every prefix of every path was joined and looked up,
    quadratic: the 2,000 directories and 2,000 files took 55 s, the whole archive a quarter
    of an hour)."""
    limits = Limits(max_members=50_000)
    data = zstd(deep_tree(2000, limits.max_members))
    began = time.perf_counter()
    contents = extract(io.BytesIO(data), NullWriter(), limits)
    seconds = time.perf_counter() - began
    assert len(contents.files) + len(contents.dirs) == limits.max_members
    assert seconds < 20, f"{seconds:.1f} s"
    figures.update(run=f"{limits.max_members:,} members (2,000 nested directories, files spread over every "
                       f"depth) in {len(data) >> 10} KiB of zstd, extracted to a writer that discards",
                   members=limits.max_members, depth=2000,
                   longest_path_bytes=max(len(p.encode()) for p in contents.files), extracted_in_s=round(seconds, 2))


# -- sparse members ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse archives")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_are_refused(fmt, tmp_path, unpack, sandbox, figures):
    """GNU tar --sparse members (old GNU headers; pax 1.0 maps) are refused with a clear message
    (expanding them through tarfile costs quadratic time on a crafted map)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "variables.data", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"tail")
    (src / "saved_model.pb").write_bytes(b"model")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(archive), "-C", str(src), "."], check=True)
    began = time.perf_counter()
    error = refused(unpack, sandbox, archive.read_bytes(), UnsafeArchiveError, "is a sparse file")
    seconds = time.perf_counter() - began
    assert "variables.data" in error.member and "--sparse" in str(error)
    figures.update(run=f"tar --sparse --format={fmt} of a 3 MiB file with a hole ({archive.stat().st_size:,} bytes)",
                   error=type(error).__name__, message=error.message[:120], refused_in_s=round(seconds, 3))
