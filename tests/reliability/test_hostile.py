"""Hostile archives: each is refused with a clear, one-line error naming the handle; nothing is
written outside the entry (the whole sandbox is snapshotted), nothing is committed, nothing is
left behind.

The cache sits three levels deep in a sandbox, so a ``..`` or symlink escape would land inside
the snapshot rather than somewhere unobserved.
"""

from __future__ import annotations

import gzip
import os
import struct
import tarfile
import time

import pytest

import hubcache
from hubcache import ArchiveError, UnsafeArchiveError
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer, hostile_archives

from .helpers import leftovers, snapshot

SCENARIO = "6. Hostile archives"

MAX_BYTES = 1 << 20
MAX_MEMBERS = 500
UNSAFE = {"absolute_path", "dotdot", "dotdot_nested", "symlink_escape", "symlink_absolute",
          "symlink_write_through", "hardlink_escape", "hardlink_outside", "char_device", "block_device",
          "fifo", "bomb", "too_many_members"}
#: What the cache dir may hold for a refused handle: nothing (its download lock goes with it).
BOOKKEEPING: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def origin():
    with OriginServer() as server:
        yield server


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    root = tmp_path / "sandbox"
    cache = root / "a" / "b" / "cache"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "victim.txt").write_text("must stay as it is")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    return str(root), str(cache)


def refuse(origin, sandbox, name: str, body: bytes) -> tuple[BaseException, float, dict]:
    """Serve ``body``, resolve it, and check it was refused with no trace; (error, seconds, info)."""
    root, cache = sandbox
    url = origin.add(f"/hostile/{name}.tar.gz", body)
    before = snapshot(root)
    began = time.perf_counter()
    with pytest.raises(ArchiveError) as info:
        hubcache.resolve(url)
    seconds = time.perf_counter() - began
    error = info.value
    message = str(error)
    assert message.startswith(repr(url)) and "\n" not in message, message
    key = cache_key(url)
    after = snapshot(root)
    new = {p for p in after if p not in before}
    allowed = {os.path.relpath(os.path.join(cache, key + s), root) for s in BOOKKEEPING}
    allowed.add(os.path.relpath(cache, root))
    assert new <= allowed, f"written outside the entry or left behind: {sorted(new - allowed)}"
    # Existing files and links unchanged (a directory's mtime moves when the cache is created).
    unchanged = {p: v for p, v in before.items() if v[0] != "dir"}
    assert {p: after.get(p) for p in unchanged} == unchanged, "something existing was changed"
    assert set(before) <= set(after), "something existing was removed"
    assert not os.path.exists("/tmp/hubcache-escape.txt")
    assert leftovers(cache) == []
    sent = sum(r.sent for r in origin.requests if r.path == f"/hostile/{name}.tar.gz")
    return error, seconds, {"new_files": sorted(os.path.basename(p) for p in new), "sent": sent}


@pytest.mark.parametrize("name", sorted(hostile_archives(max_bytes=MAX_BYTES, max_members=MAX_MEMBERS)))
def test_hostile_archive_refused_without_trace(name, origin, sandbox, monkeypatch, figures):
    """Every archive of the kit's hostile set is refused; nothing escapes, nothing is committed."""
    monkeypatch.setenv("HUBCACHE_MAX_EXTRACT_SIZE", str(MAX_BYTES))
    monkeypatch.setenv("HUBCACHE_MAX_MEMBERS", str(MAX_MEMBERS))
    body = hostile_archives(max_bytes=MAX_BYTES, max_members=MAX_MEMBERS)[name]
    error, seconds, info = refuse(origin, sandbox, name, body)
    if name in UNSAFE:
        assert isinstance(error, UnsafeArchiveError), f"{name}: {error!r}"
    figures.update(run=f"hostile archive '{name}' ({len(body)} bytes)", error=type(error).__name__,
                   message=error.message[:120], refused_in_s=round(seconds, 3))


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if info.isreg() else None


MORE_HOSTILE = {
    # sub/up -> .. stays inside (it is the entry root), but a -> sub/up/.. is the entry's parent:
    # only following the links, not normalising the text, shows the escape
    "symlink_chain_escape": [_member("saved_model.pb", b"m"), _member("sub", None, type=tarfile.DIRTYPE),
                             _member("sub/up", None, type=tarfile.SYMTYPE, linkname=".."),
                             _member("a", None, type=tarfile.SYMTYPE, linkname="sub/up/..")],
    # a hard link to a symlink (the link would alias whatever the symlink points to)
    "hardlink_to_symlink": [_member("saved_model.pb", b"m"),
                            _member("s", None, type=tarfile.SYMTYPE, linkname="saved_model.pb"),
                            _member("h", None, type=tarfile.LNKTYPE, linkname="s")],
    # a pax header that renames a harmless-looking member to an absolute path
    "pax_absolute": [_member("ok.txt", b"x", pax_headers={"path": "/tmp/hubcache-escape.txt"})],
    # a pax header that renames a member to a '..' path
    "pax_dotdot": [_member("ok.txt", b"x", pax_headers={"path": "../../victim.txt"})],
    # a file, then a directory of the same name holding a file (replace-a-file tricks)
    "file_then_dir": [_member("x", b"1"), _member("x/y", b"2")],
    # a directory, then a symlink of the same name (swap a checked dir for a link)
    "dir_then_symlink": [_member("variables", None, type=tarfile.DIRTYPE),
                         _member("variables", None, type=tarfile.SYMTYPE, linkname="assets")],
    # (links through links in either order, self-loops and cycles: scenario 11, test_escape.py)
    # NUL bytes in names through pax headers (before: ValueError from os.open)
    "pax_nul_name": [_member("saved_model.pb", b"m"), _member("ok.txt", b"x", pax_headers={"path": "a\x00b"})],
    "pax_nul_hardlink": [_member("saved_model.pb", b"m"),
                         _member("h", None, type=tarfile.LNKTYPE, pax_headers={"linkpath": "saved\x00model.pb"})],
}


@pytest.mark.parametrize("name", sorted(MORE_HOSTILE))
def test_link_and_header_tricks_refused(name, origin, sandbox, figures):
    """Escapes through symlink chains, links to links, pax path headers, file/dir swaps."""
    import gzip

    body = gzip.compress(_tar(*MORE_HOSTILE[name]))
    error, seconds, info = refuse(origin, sandbox, name, body)
    assert isinstance(error, UnsafeArchiveError), f"{name}: {error!r}"
    root, _ = sandbox
    assert open(os.path.join(root, "a", "victim.txt")).read() == "must stay as it is"
    figures.update(run=f"hostile archive '{name}'", error=type(error).__name__,
                   message=error.message[:120], refused_in_s=round(seconds, 3))


def zstd_zeros(count: int) -> bytes:
    """A zstd frame of ``count`` zero bytes built from RLE blocks: 4 bytes per 128 KiB."""
    block = 128 << 10
    header = struct.pack("<I", 0xFD2FB528) + bytes([0x00, (17 - 10) << 3])  # no size, 128 KiB window
    full, rest = divmod(count, block)

    def block_header(last: int, size: int) -> bytes:
        return ((size << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\x00"

    if rest:
        return header + block_header(0, block) * full + block_header(1, rest)
    return header + block_header(0, block) * (full - 1) + block_header(1, block)


@pytest.mark.slow
def test_decompression_bombs_with_default_limits(origin, sandbox, figures):
    """Real bombs against the default limits (256 GiB): a 300 GiB member in 9 MiB of zstd, and
    4 GiB of zeros after the tar end in 128 KiB. Both refused after reading a sliver."""
    import zstandard

    declared = 300 << 30
    head = tarfile.TarInfo("variables/variables.data-00000-of-00001")
    head.size = declared
    member_bomb = zstandard.ZstdCompressor().compress(head.tobuf(tarfile.GNU_FORMAT)) + zstd_zeros(declared)
    error, seconds, info = refuse(origin, sandbox, "bomb300g", member_bomb)
    assert isinstance(error, UnsafeArchiveError) and "more than" in error.message
    first = {"seconds": seconds, "sent": info["sent"], "size": len(member_bomb)}

    ok = _tar(_member("saved_model.pb", b"model"))
    trailer_bomb = zstandard.ZstdCompressor().compress(ok) + zstd_zeros(4 << 30)
    error2, seconds2, info2 = refuse(origin, sandbox, "trailer4g", trailer_bomb)
    assert isinstance(error2, UnsafeArchiveError) and "after its end" in error2.message
    assert seconds2 < 5.0, "the trailer must be refused long before 4 GiB are decoded"
    figures.update(
        run=f"zstd bombs: a 300 GiB member in {first['size'] / 2**20:.1f} MiB; "
            f"4 GiB of zeros after the tar end in {len(trailer_bomb) >> 10} KiB (default limits)",
        member_bomb_refused_in_s=round(first["seconds"], 3),
        trailer_bomb_refused_in_s=round(seconds2, 3),
        errors=f"{type(error).__name__}, {type(error2).__name__}")


def many_members(count: int) -> bytes:
    """A zstd-compressed tar of ``count`` empty files, built header by header (seconds, not minutes)."""
    import zstandard

    template = bytearray(tarfile.TarInfo("f0000000").tobuf(tarfile.GNU_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - sum(b"f0000000")
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    out, batch = [], []
    for i in range(count):
        name = b"f%07d" % i
        header = template[:]
        header[0:8] = name
        header[148:156] = b"%06o\x00 " % (base + sum(name))
        batch.append(bytes(header))
        if len(batch) == 8192:
            out.append(compressor.compress(b"".join(batch)))
            batch = []
    out.append(compressor.compress(b"".join(batch) + bytes(1024)))
    out.append(compressor.flush())
    return b"".join(out)


@pytest.mark.slow
def test_a_million_members(origin, sandbox, monkeypatch, figures):
    """A tar of 1,048,576 empty files (2.7 MB of zstd) is refused at the member limit, having
    read only the part of the stream up to the limit."""
    limit = 10_000  # the default is 200,000: each member is a file creation before the refusal
    monkeypatch.setenv("HUBCACHE_MAX_MEMBERS", str(limit))
    count = 1 << 20
    body = many_members(count)
    error, seconds, info = refuse(origin, sandbox, "million", body)
    assert isinstance(error, UnsafeArchiveError) and f"more than {limit} members" in error.message
    figures.update(run=f"{count:,} empty members in {len(body) / 2**20:.1f} MiB of zstd, HUBCACHE_MAX_MEMBERS={limit}",
                   refused_in_s=round(seconds, 3), archive_bytes=len(body), files_created_then_removed=limit)


# -- classes 4, 5 and 7 end to end: incomplete tars, header bombs, endless trailers ----------------

def _raw_hostile() -> dict[str, tuple[bytes, type, str]]:
    """name -> (body, error type, words in the message)."""
    import hostile_tar_builders as b

    model = b.member("saved_model.pb", b"model bytes")
    weights = b.member("variables/variables.data-00000-of-00001", bytes(4096))
    return {
        # a plain .tar cut between two members: before, the first member was committed
        "plain_tar_cut_between_members": (model + weights, ArchiveError, "without the end-of-archive marker"),
        # a damaged header after the first member: before, the end of the archive
        "bad_checksum_in_second_header": (b.tar(model, b.header("x", 3, checksum_delta=1) + b.pad(b"abc")),
                                          ArchiveError, "is corrupt (a bad checksum"),
        # 32 KiB of zstd whose pax header declares 1 GiB: before, read whole into memory
        "pax_header_bomb": (b.zstd_then_zeros(b.header("././@PaxHeader", 1 << 30, b"x"), 1 << 30),
                            UnsafeArchiveError, "header bomb"),
        "malformed_sparse_map": (b.tar(model, b.pax(b.pax_records(**{"GNU.sparse.map": "1,x"})), b.member("s", b"x")),
                                 ArchiveError, "damaged"),
    }


@pytest.mark.parametrize("name", sorted(_raw_hostile()))
def test_incomplete_tars_and_header_bombs_refused(name, origin, sandbox, figures):
    """A tar without its end marker, a damaged header, a metadata bomb, a malformed sparse map:
    one-line errors, nothing committed, nothing written outside."""
    body, kind, words = _raw_hostile()[name]
    error, seconds, info = refuse(origin, sandbox, name, body)
    assert isinstance(error, kind) and words in error.message, f"{name}: {error!r}"
    figures.update(run=f"hostile archive '{name}' ({len(body)} bytes)", error=type(error).__name__,
                   message=error.message[:120], refused_in_s=round(seconds, 3))


class EndlessOrigin:
    """A loopback HTTP server whose one answer never ends: ``prefix``, then ``unit`` forever
    (close-delimited, no Content-Length), until the client hangs up. Counts what it sent."""

    def __init__(self, prefix: bytes, unit: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        owner = self
        self.sent = 0
        block = unit * max(1, (64 << 10) // len(unit))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    self.wfile.write(prefix)
                    owner.sent += len(prefix)
                    while owner.sent < (2 << 30):  # only a failing test ever gets this far
                        self.wfile.write(block)
                        owner.sent += len(block)
                except OSError:
                    pass  # the client hung up: what we want

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> EndlessOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"


def _endless_cases() -> dict[str, tuple[bytes, bytes]]:
    import hostile_tar_builders as b

    ok = b.tar(b.member("saved_model.pb", b"model bytes"))
    return {
        "gzip_zero_padding": (gzip.compress(ok), bytes(4096)),
        "empty_gzip_members": (gzip.compress(ok), b.EMPTY_GZIP_MEMBER),
        "zstd_skippable_frames": (b.zstd(ok), b.SKIPPABLE_FRAME),
        "plain_tar_zeros": (ok, bytes(4096)),
    }


@pytest.mark.parametrize("name", sorted(_endless_cases()))
def test_an_endless_trailer_is_refused(name, sandbox, figures):
    """A complete archive followed by compressed nothing, forever, from a real server: refused
    after a bounded read (before: read until the server stopped, holding the entry's lock)."""
    from hubcache.archive.formats import MAX_TRAILER

    root, cache = sandbox
    prefix, unit = _endless_cases()[name]
    before = snapshot(root)
    with EndlessOrigin(prefix, unit) as server:
        url = server.url(f"/endless/{name}.tar.gz")
        began = time.perf_counter()
        with pytest.raises(ArchiveError) as info:
            hubcache.resolve(url)
        seconds = time.perf_counter() - began
        sent = server.sent
    message = str(info.value)
    assert message.startswith(repr(url)) and "\n" not in message, message
    assert "after its end" in message or "decode to nothing" in message, message
    assert sent < 2 * MAX_TRAILER + (16 << 20), sent  # the limit, read-ahead and socket buffers
    after = snapshot(root)
    new = {p for p in after if p not in before}
    key = cache_key(url)
    allowed = {os.path.relpath(os.path.join(cache, key + s), root) for s in BOOKKEEPING}
    allowed.add(os.path.relpath(cache, root))
    assert new <= allowed, sorted(new - allowed)
    assert leftovers(cache) == []
    figures.update(run=f"endless trailer '{name}' after a complete archive, close-delimited",
                   error=type(info.value).__name__, message=info.value.message[:120],
                   refused_in_s=round(seconds, 3), server_sent_mib=round(sent / 2**20, 1))
