"""The threaded cold path (``hubcache.archive.pipeline``): same bytes, same errors, no stray threads.

Decompression and the archive digest run in worker threads and tar member data bypasses
tarfile's copying reader; these tests pin down that none of it shows: output and digests equal
the plain single-threaded result (with ISA-L and with the stdlib fallback), decoder errors and
source errors reach the caller as the same exceptions, events stay on the calling thread,
workers are gone when ``extract`` returns or raises, and sparse members are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile
import threading
import zlib

import pytest

from hubcache import ArchiveError, DownloadError, UnsafeArchiveError
from hubcache.core import crc
from hubcache.archive import formats
from hubcache.archive.digest import Meter
from hubcache.archive.extract import Limits, extract
from hubcache.archive.formats import open_decoder
from hubcache.stores.localstore import LocalStore
from hubcache.archive.pipeline import ForwardReader, ThreadedDecoder
from hubcache.testing import compress, tar_directory

KEY = "0" * 40


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("hubcache-decode", "hubcache-digest")]


@pytest.fixture
def model_tar(tmp_path) -> bytes:
    root = tmp_path / "m"
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"\x08\x01" + random.Random(1).randbytes(3000))
    # Several decoder chunks, and member data that starts mid-chunk (after 512-byte headers).
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(random.Random(2).randbytes(3_500_123))
    (root / "variables" / "variables.index").write_bytes(b"")
    return tar_directory(root)


class Chopped(io.RawIOBase):
    """Hands out at most ``step`` bytes per read, then raises ``error`` at ``fail_at`` bytes."""

    def __init__(self, data: bytes, step: int = 70_000, fail_at: int | None = None,
                 error: BaseException | None = None):
        self._data, self._pos, self._step, self._fail_at, self._error = data, 0, step, fail_at, error
        self.threads: set[int] = set()
        self.returned: list[bytes] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.threads.add(threading.get_ident())
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise self._error
        n = min(self._step, len(self._data) - self._pos, size if size >= 0 else self._step)
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        self.returned.append(out)
        return out


def unpack(archive: bytes, tmp_path, raw=None):
    store = LocalStore(str(tmp_path / "cache"))
    writer = store.writer(KEY, "handle")
    progress_threads: set[int] = set()
    meter = Meter(raw or Chopped(archive), ("sha256",), lambda n: progress_threads.add(threading.get_ident()))
    try:
        contents = extract(meter, writer, Limits())
    finally:
        leftovers = workers()
    meter.drain()
    return contents, meter, writer.tmp, progress_threads, leftovers


@pytest.mark.parametrize("fmt", ["tar", "gz", "zst", "bz2", "xz"])
def test_every_format_unpacks_to_the_same_files_and_digest(fmt, model_tar, tmp_path):
    archive = compress(model_tar, fmt)
    contents, meter, tmp, progress_threads, leftovers = unpack(archive, tmp_path)
    assert meter.hashes["sha256"].hexdigest() == hashlib.sha256(archive).hexdigest()
    assert meter.bytes == len(archive)
    expected = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(model_tar)) if m.isreg()}
    assert set(contents.files) == set(expected)
    with tarfile.open(fileobj=io.BytesIO(model_tar)) as tar:
        for name, record in contents.files.items():
            data = tar.extractfile(expected[name]).read()
            with open(os.path.join(tmp, name), "rb") as f:
                assert f.read() == data
            assert record.size == len(data) and record.crc32 == f"{zlib.crc32(data):08x}"
    # Progress (and so every event) is reported on the calling thread, as the progress bars need.
    assert progress_threads == {threading.get_ident()}
    assert leftovers == []


def test_the_stdlib_fallback_gives_identical_results(model_tar, tmp_path, monkeypatch):
    archive = compress(model_tar, "gz")
    fast, *_ = unpack(archive, tmp_path / "fast")
    monkeypatch.setattr(formats, "_inflate", zlib)  # as if isal were not installed
    monkeypatch.setattr(crc, "_crc32", zlib.crc32)  # the one CRC-32 selector (core/crc.py)
    slow, *_ = unpack(archive, tmp_path / "slow")
    assert fast.files == slow.files and fast.dirs == slow.dirs


@pytest.mark.parametrize("fmt", ["gz", "zst"])
def test_a_decoder_error_in_the_worker_reaches_the_caller(fmt, model_tar, tmp_path):
    bad = bytearray(compress(model_tar, fmt))
    bad[len(bad) // 2: len(bad) // 2 + 64] = bytes(64)
    with pytest.raises(ArchiveError, match=f"corrupt {'gzip' if fmt == 'gz' else 'zstd'} data"):
        unpack(bytes(bad), tmp_path)
    assert workers() == []


def test_a_source_error_is_raised_as_it_was_and_the_workers_stop(model_tar, tmp_path):
    archive = compress(model_tar, "zst")
    error = DownloadError("connection reset (GET http://127.0.0.1/x, 5 attempts)", url="http://127.0.0.1/x")
    raw = Chopped(archive, fail_at=len(archive) // 2, error=error)
    with pytest.raises(DownloadError) as caught:
        unpack(archive, tmp_path, raw=raw)
    assert caught.value is error
    assert raw.threads == {threading.get_ident()}  # the source is only ever read by the caller
    assert workers() == []


@pytest.mark.parametrize("fmt", ["tar", "gz"])
def test_a_member_cut_short_is_a_damaged_archive(fmt, model_tar, tmp_path):
    archive = compress(model_tar[:len(model_tar) // 2], fmt)
    with pytest.raises(ArchiveError, match="unexpected end of data|truncated"):
        unpack(archive, tmp_path)
    assert workers() == []


def test_closing_the_decoder_early_stops_its_worker():
    payload = random.Random(3).randbytes(5_000_000)
    decoder = ThreadedDecoder(b"", Chopped(compress(payload, "gz")), lambda r: open_decoder("gz", r))
    assert decoder.read(1000) == payload[:1000]
    decoder.close()
    assert workers() == []


def test_forward_reader_hands_out_whole_chunks_and_refuses_to_go_back():
    first, second = random.Random(4).randbytes(1 << 20), random.Random(5).randbytes(1 << 20)
    raw = Chopped(first + second, step=1 << 20)
    reader = ForwardReader(raw)
    assert reader.read(512) == first[:512]
    pieces = list(reader.chunks((1 << 20) - 512 + (1 << 20)))
    assert b"".join(pieces) == first[512:] + second
    assert pieces[1] is raw.returned[1]  # a chunk wholly inside the member is not copied
    with pytest.raises(tarfile.StreamError):
        reader.seek(0)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(reader.chunks(1))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse archive")
def test_sparse_members_are_refused(tmp_path):
    """Sparse members are refused (see test_hostile_tar.py: a crafted map makes tarfile's
    expansion quadratic), with a message saying how to make the archive."""
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "variables.data"
    with open(sparse, "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek(6 << 20)
        f.write(b"tail")
    (src / "saved_model.pb").write_bytes(b"model")
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(archive), "-C", str(src), "."], check=True)
    data = archive.read_bytes()
    assert any(m.issparse() for m in tarfile.open(fileobj=io.BytesIO(data)))
    with pytest.raises(UnsafeArchiveError, match="sparse file.*without --sparse"):
        unpack(compress(data, "gz"), tmp_path)
    assert workers() == []
