"""Hostile tar streams against the extractor (``hubcache.archive.extract``), built byte by byte: the
unit-level edges of

- class 5, bounded resources: record-heavy and spread-out extended headers, global headers,
  malformed and endless sparse maps, ``Meter.drain`` on an endless source;
- class 7, whatever tarfile or a decoder raises on hostile bytes is an ``ArchiveError``.

The telling cases, with their measured figures, are reliability scenarios: a tar is complete or
refused (end marker, bad checksums, every cut, GNU tar's verdicts) in
``reliability/test_complete_tar.py``; header bombs (peak RSS), chained headers, decoder memory,
endless trailers, deep trees and sparse members in ``reliability/test_bounded.py``.

Every archive is unpacked by the real extractor into a real ``LocalWriter`` temp dir, and a
refusal leaves nothing outside that temp dir.
"""

from __future__ import annotations

import io
import random
import tarfile
import time

import pytest

from hubcache import ArchiveError, HubcacheError, UnsafeArchiveError
from hubcache.archive.digest import Meter
from hubcache.archive.formats import MAX_TRAILER
from hubcache.archive.pipeline import MAX_METADATA_READ

from extract_sandbox import refused, sandbox, unpack  # noqa: F401 (fixtures)
from hostile_tar_builders import BLOCK, Endless, header, info, member, pax, pax_records, tar, tarfile_archive, zstd

MODEL = member("saved_model.pb", b"model bytes")


# -- class 5: bounded resources ----------------------------------------------------------------------

def test_record_heavy_extended_headers_are_bounded(unpack, sandbox):
    """Members each with a pax header of a million bytes of tiny records: parsing costs per
    record, so the records (not only the bytes) are counted: refused in well under a second."""
    records = pax_records(**{f"a{i}": "" for i in range(60_000)})[: MAX_METADATA_READ - BLOCK]
    records = records[: records.rfind(b"\n") + 1]
    body = b"".join(pax(records) + member(f"f{i}", b"") for i in range(30))
    began = time.perf_counter()
    refused(unpack, sandbox, zstd(tar(body)), UnsafeArchiveError, "records|bytes of headers")
    assert time.perf_counter() - began < 3


def test_metadata_counts_against_a_budget(unpack, sandbox):
    """Each member's metadata may be large, but not all of them: a header bomb spread over many
    members (900 KiB comments each) is refused after a few MiB."""
    comment = pax(pax_records(comment="x" * (900 << 10)))
    body = b"".join(comment + member(f"f{i}", b"") for i in range(200))
    error = refused(unpack, sandbox, zstd(tar(body)), UnsafeArchiveError, "bytes of headers and metadata")
    assert isinstance(error, UnsafeArchiveError)


def test_global_extended_headers_are_bounded(unpack, sandbox):
    """Global headers apply to every later member (tarfile copies them each time): at most 64
    entries or 64 KiB; git archive's one-line global header is fine."""
    many = pax(pax_records(**{f"k{i}": "v" for i in range(100)}), b"g")
    refused(unpack, sandbox, tar(many, MODEL), UnsafeArchiveError, "global extended headers")
    big = pax(pax_records(comment="x" * (65 << 10)), b"g")
    refused(unpack, sandbox, tar(big, MODEL), UnsafeArchiveError, "global extended headers")
    contents, _ = unpack(tar(pax(pax_records(comment="0123456789abcdef" * 2), b"g"), MODEL))  # as git archive
    assert list(contents.files) == ["saved_model.pb"]


#: Malformed sparse maps (pax 0.1 map, 0.0 offsets, 1.0 map in the data, old GNU extension blocks).
BAD_SPARSE = {
    "0.1 map not numbers": pax(pax_records(**{"GNU.sparse.map": "1,x,3", "GNU.sparse.size": "9"})),
    "0.0 size not a number": pax(pax_records(**{"GNU.sparse.size": "many"})),
    "realsize not a number": pax(pax_records(**{"GNU.sparse.map": "0,1", "GNU.sparse.realsize": "?"})),
    "1.0 map count not a number": pax(pax_records(**{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})),
}


@pytest.mark.parametrize("name", sorted(BAD_SPARSE))
def test_malformed_sparse_maps_are_archive_errors(name, unpack, sandbox):
    """Before: tarfile's ValueError escaped as it was."""
    body = BAD_SPARSE[name] + member("f", b"not a number\n" + bytes(600))
    refused(unpack, sandbox, tar(MODEL, body), ArchiveError)


def test_old_gnu_sparse_extension_blocks_are_bounded(unpack, sandbox):
    """An old-GNU sparse header whose 'more extension blocks follow' flag never clears."""
    ext = bytearray(BLOCK)
    ext[504] = 1  # isextended
    sparse = bytearray(100)
    sparse[96] = 1  # isextended in the header itself (offset 482)
    body = header("s", 0, b"S", sparse=bytes(sparse)) + bytes(ext) * 5000
    refused(unpack, sandbox, tar(MODEL, body), UnsafeArchiveError, "header blocks")


def test_meter_drain_is_bounded():
    """``Meter.drain`` (called after extract to digest the last bytes) stops an endless source."""
    source = Endless(b"", b"\x00" * 4096, cap=256 << 20)
    with pytest.raises(UnsafeArchiveError, match="after its end"):
        Meter(source).drain()
    assert source.served <= MAX_TRAILER + (1 << 20)
    Meter(io.BytesIO(bytes(1000))).drain()  # a short tail is read and digested


# -- class 1 and 7 in the extractor -------------------------------------------------------------------


@pytest.mark.parametrize("members, words", [
    ([pax(pax_records(path="a\x00b")), member("x", b"1")], "NUL"),
    ([pax(pax_records(linkpath="saved\x00model.pb")), header("l", 0, b"2")], "NUL"),
    ([pax(pax_records(linkpath="x\x00")), header("h", 0, b"1")], "NUL"),
])
def test_nul_in_names_is_an_unsafe_archive_error(members, words, unpack, sandbox):
    """Before: os.open raised ValueError ('embedded null byte')."""
    refused(unpack, sandbox, tar(MODEL, *members), UnsafeArchiveError, words)


def fix_checksum(data: bytearray, start: int) -> None:
    block = data[start:start + BLOCK]
    block[148:156] = b" " * 8
    data[start + 148:start + 156] = b"%06o\x00 " % sum(block)


def test_hostile_bytes_only_ever_raise_archive_errors(unpack, sandbox):
    """Random damage to the headers and extended headers of a pax archive (checksums fixed up, so
    tarfile parses the damaged fields): each outcome is a clean unpack or a HubcacheError, never
    another exception (before: ValueError, RecursionError... escaped from tarfile)."""
    base = tarfile_archive(
        info("saved_model.pb", b"model"), info("variables/" + "v" * 150, b"weights" * 10),
        info("assets", None, tarfile.DIRTYPE), info("link", None, tarfile.SYMTYPE, linkname="saved_model.pb"),
        info("hard", None, tarfile.LNKTYPE, linkname="saved_model.pb"),
        info("meta.txt", b"x", pax_headers={"comment": "hello", "mtime": "1.5", "uname": "u" * 40}))
    headers = [i for i in range(0, len(base) - 1024, BLOCK) if base[i + 257:i + 262] == b"ustar"]
    pax_data = [i + BLOCK for i in headers if base[i + 156:i + 157] in (b"x", b"g")]
    rng = random.Random(11)
    seen: dict[str, int] = {}
    for _ in range(600):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                start = rng.choice(headers)
                at = start + rng.choice([rng.randrange(BLOCK), *range(100, 157), *range(124, 136), 156, 156])
            else:
                start = None
                at = rng.choice(pax_data) + rng.randrange(60)
            data[at] = rng.choice([0, 0x20, 0x30, 0x31, 0x37, 0x39, 0x0A, 0x3D, 0x53, 0x4B, 0x4C, 0x78, 0x67,
                                   0xFF, 0x80, rng.randrange(256)])
            if start is not None and rng.random() < 0.9:
                fix_checksum(data, start)
        try:
            unpack(bytes(data))
            outcome = "ok"
        except HubcacheError as error:
            outcome = type(error).__name__
            assert "\n" not in str(error)
        seen[outcome] = seen.get(outcome, 0) + 1
    assert set(seen) <= {"ok", "ArchiveError", "UnsafeArchiveError", "CacheError"}, seen
    assert seen.get("ArchiveError", 0) + seen.get("UnsafeArchiveError", 0) > 100, seen


@pytest.mark.parametrize("name, body", [
    ("size in base-256 larger than any disk", header("big", 1 << 80) + bytes(BLOCK)),
    ("negative size in base-256", bytearray(header("neg", 0))),
    ("pax record longer than its header", pax(b"99999 path=x\n")),
    ("pax record of length zero", pax(b"0 path=x\n")),
    ("pax path of 5000 bytes", pax(pax_records(path="p" * 5000)) + member("f", b"")),
    ("a number of 5000 digits in a sparse map", pax(pax_records(**{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
     + member("f", b"9" * 5000 + b"\n")),
])
def test_crafted_header_fields_are_archive_errors(name, body, unpack, sandbox):
    if name == "negative size in base-256":
        body[124:136] = b"\xff" * 12  # -1
        fix_checksum(body, 0)
        body = bytes(body)
    refused(unpack, sandbox, tar(MODEL, body), ArchiveError)
