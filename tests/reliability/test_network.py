"""Transient network faults: resets mid-body, 503s and stalls are retried with backoff; a body
cut short resumes with a Range request and the decompressor just continues; the final error names
the URL and the attempts."""

from __future__ import annotations

import io
import os
import random
import time

import pytest

import hubcache
from hubcache import DownloadError
from hubcache.testing import FORMATS, SUFFIX, OriginServer, archive_of, tree_of
from local_layout import committed_names

from .helpers import EventLog, leftovers

SCENARIO = "5. Transient network faults"


@pytest.fixture
def big_model(tmp_path):
    from hubcache.testing import build_model_dir

    return build_model_dir(tmp_path / "model", weights_bytes=2 << 20, shards=2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resets_mid_body_resume_with_range(fmt, big_model, cache_root, figures):
    """Two resets at random points of one download: two ranged resumes, every byte sent once."""
    archive = archive_of(big_model, fmt)
    rng = random.Random(fmt)
    cuts = sorted(rng.sample(range(1000, len(archive) - 1000), 2))
    path = f"/net/model{SUFFIX[fmt]}"
    with OriginServer() as origin:
        url = origin.add(path, archive)
        # each fault applies to one request, and "cut" counts from that response's first byte
        origin.fail(path, *[("cut", b - a) for a, b in zip([0] + cuts, cuts)])
        with EventLog() as log:
            resolved = hubcache.resolve(url)
        ranges = [r.headers.get("Range") for r in origin.requests]
        served = sum(r.sent for r in origin.requests)
    assert tree_of(resolved) == tree_of(big_model)
    assert ranges == [None] + [f"bytes={c}-" for c in cuts]
    assert served == len(archive), "a resumed download must not send bytes twice"
    assert [e.data["offset"] for e in log.kinds("download_retry")] == cuts
    figures.update(run=f"2 connection resets mid-body of a {len(archive) >> 10} KiB .{fmt} archive",
                   requests=len(ranges), bytes_served=served, archive_bytes=len(archive), restarts_from_zero=0)


def test_reset_without_range_support_restarts_and_skips(big_model, cache_root, figures):
    """A server that ignores Range: the retry downloads from zero and skips what was decoded."""
    archive = archive_of(big_model, "gz")
    with OriginServer() as origin:
        url = origin.add("/net/norange.tar.gz", archive, ranges=False)
        origin.fail("/net/norange.tar.gz", ("cut", len(archive) // 2))
        resolved = hubcache.resolve(url)
        sent = [r.sent for r in origin.requests]
        ranges = [r.headers.get("Range") for r in origin.requests]
    assert tree_of(resolved) == tree_of(big_model)
    assert len(sent) == 2 and sent[1] == len(archive)
    assert ranges[1] == f"bytes={len(archive) // 2}-", "it asks for a range; the server sends it all"
    figures.update(run="a reset at 1/2 on a server without Range support", requests=2,
                   bytes_served=sum(sent), archive_bytes=len(archive))


def test_tcp_reset_resumes_from_what_was_consumed(big_model, cache_root, figures):
    """A TCP RST (not a clean close) mid-body: the resume asks for the bytes after the last one
    the decoder consumed; bytes the client had buffered in an unfinished read are asked again."""
    archive = archive_of(big_model, "gz")
    with OriginServer() as origin:
        url = origin.add("/net/rst.tar.gz", archive)
        origin.fail("/net/rst.tar.gz", ("reset", len(archive) // 2))
        resolved = hubcache.resolve(url)
        ranges = [r.headers.get("Range") for r in origin.requests]
        served = sum(r.sent for r in origin.requests)
    assert tree_of(resolved) == tree_of(big_model)
    assert len(ranges) == 2 and ranges[0] is None
    offset = int(ranges[1][len("bytes="):-1])
    assert 0 < offset <= len(archive) // 2, "the resume must not restart from zero"
    figures.update(run=f"a TCP RST at 1/2 of a {len(archive) >> 10} KiB .tar.gz", requests=2,
                   resumed_at=offset, reset_at=len(archive) // 2, bytes_sent_twice=served - len(archive))


class _Stamped(list):
    """The origin's request list, stamping when each request arrived."""

    times: list[float]

    def append(self, record) -> None:
        self.times.append(time.monotonic())
        super().append(record)


def test_503s_are_retried_with_backoff(model, cache_root, figures):
    """Two 503s, then the body: three requests, spaced by a doubling backoff (0.25 s, 0.5 s)."""
    with OriginServer() as origin:
        url = origin.add("/net/busy.tar.gz", archive_of(model))
        origin.fail("/net/busy.tar.gz", ("status", 503), ("status", 503))
        origin.requests = _Stamped()
        origin.requests.times = times = []
        resolved = hubcache.resolve(url)
        statuses = [r.status for r in origin.requests]
    assert tree_of(resolved) == tree_of(model)
    assert statuses == [503, 503, 200]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.2 <= gaps[0] < 0.6 and 0.45 <= gaps[1] < 1.0 and gaps[1] > gaps[0]
    figures.update(run="503, 503, then 200", requests=3,
                   backoff_s=", ".join(f"{g:.3f}" for g in gaps))


def test_stalled_server_times_out_and_resumes(model, cache_root, monkeypatch, figures):
    """The server stops sending for 30 s: after HUBCACHE_TIMEOUT (0.5 s) the download resumes
    with a Range request instead of hanging."""
    monkeypatch.setenv("HUBCACHE_TIMEOUT", "0.5")
    archive = archive_of(model, "zst")
    with OriginServer() as origin:
        url = origin.add("/net/stall.tar.zst", archive)
        origin.fail("/net/stall.tar.zst", ("stall", len(archive) // 2, 30.0))
        began = time.perf_counter()
        resolved = hubcache.resolve(url)
        seconds = time.perf_counter() - began
        ranges = [r.headers.get("Range") for r in origin.requests]
        served = sum(r.sent for r in origin.requests)
    assert tree_of(resolved) == tree_of(model)
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    offset = int(ranges[1][len("bytes="):-1])
    assert 0 < offset <= len(archive) // 2
    assert seconds < 5.0
    figures.update(run="the server stalls 30 s mid-body; HUBCACHE_TIMEOUT=0.5", requests=2,
                   resolve_s=round(seconds, 3), stall_s=30, resumed_at=offset,
                   bytes_sent_twice=served - len(archive))


def test_persistent_failure_names_url_and_attempts(model, cache_root, monkeypatch, figures):
    """Every attempt fails: after HUBCACHE_RETRIES=2 retries (3 attempts) a DownloadError names
    the URL and the attempts; nothing is committed or left behind."""
    monkeypatch.setenv("HUBCACHE_RETRIES", "2")
    with OriginServer() as origin:
        url = origin.add("/net/down.tar.gz", archive_of(model))
        origin.fail("/net/down.tar.gz", ("status", 503), ("cut", 100), ("status", 502), ("status", 503))
        began = time.perf_counter()
        with pytest.raises(DownloadError) as info:
            hubcache.resolve(url)
        seconds = time.perf_counter() - began
        requests = origin.count()
    error = info.value
    assert requests == 3 and error.attempts == 3
    assert url in str(error) and "3 attempts" in str(error) and "\n" not in str(error)
    assert error.status == 502
    assert leftovers(cache_root) == [] and not committed_names(cache_root)
    figures.update(run="503, reset, 502 with HUBCACHE_RETRIES=2", attempts=error.attempts,
                   fail_after_s=round(seconds, 3), message=str(error)[:160])


# -- the overall download deadline -----------------------------------------------------------------


def test_a_trickling_origin_hits_the_overall_deadline(model, cache_root, monkeypatch, figures):
    """The origin sends 64 bytes every 20 ms, forever as far as the client can tell: no read ever
    waits HUBCACHE_TIMEOUT (2 s), so only HUBCACHE_DOWNLOAD_DEADLINE (1.5 s here) ends it, with an
    error that names the setting; nothing is committed and nothing is retried."""
    monkeypatch.setenv("HUBCACHE_TIMEOUT", "2")
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "1.5")
    archive = archive_of(model, "gz")
    with OriginServer() as origin:
        url = origin.add("/net/trickle.tar.gz", archive)
        origin.throttle("/net/trickle.tar.gz", 3200, step=64)
        began = time.perf_counter()
        with pytest.raises(DownloadError) as info:
            hubcache.resolve(url)
        seconds = time.perf_counter() - began
        requests = origin.count()
        sent = origin.requests[0].sent
    message = str(info.value)
    assert "HUBCACHE_DOWNLOAD_DEADLINE" in message and url in message and "\n" not in message
    assert 1.5 <= seconds < 3.0, "the deadline, not the trickle's end, stops the download"
    assert requests == 1 and 0 < sent < len(archive)
    assert leftovers(cache_root) == [] and not committed_names(cache_root)
    figures.update(run=f"64 B every 20 ms of a {len(archive) >> 10} KiB archive; HUBCACHE_TIMEOUT=2, "
                       "HUBCACHE_DOWNLOAD_DEADLINE=1.5", requests=requests, fail_after_s=round(seconds, 3),
                   bytes_received=sent, message=message[:200])


def test_the_deadline_covers_retries(model, cache_root, monkeypatch, figures):
    """Every attempt stalls until HUBCACHE_TIMEOUT and is retried: the retries and their backoff
    stop at the deadline too, not after HUBCACHE_RETRIES times the timeout."""
    monkeypatch.setenv("HUBCACHE_TIMEOUT", "0.4")
    monkeypatch.setenv("HUBCACHE_RETRIES", "50")
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "2")
    archive = archive_of(model, "gz")
    with OriginServer() as origin:
        url = origin.add("/net/stalls.tar.gz", archive)
        origin.fail("/net/stalls.tar.gz", *[("stall", 1000 * (i + 1), 30.0) for i in range(50)])
        began = time.perf_counter()
        with pytest.raises(DownloadError, match="HUBCACHE_DOWNLOAD_DEADLINE"):
            hubcache.resolve(url)
        seconds = time.perf_counter() - began
        requests = origin.count()
    assert 2.0 <= seconds < 3.5 and 1 < requests < 10
    figures.update(run="every attempt stalls; HUBCACHE_TIMEOUT=0.4, HUBCACHE_RETRIES=50, deadline 2 s",
                   requests=requests, fail_after_s=round(seconds, 3))


class _TrickleFile(io.RawIOBase):
    """A file of an fsspec filesystem that hands out a few bytes at a time, slowly."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        time.sleep(0.02)
        chunk = self._data[self._pos:self._pos + 64]
        buffer[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def test_the_deadline_applies_to_fsspec_sources(model, cache_root, monkeypatch, figures):
    """An fsspec filesystem that trickles (as a slow FUSE or network filesystem can) stops at the
    deadline too. The filesystem is a real fsspec implementation registered for this test: no
    slow network filesystem can be had on this machine."""
    import fsspec
    from fsspec.spec import AbstractFileSystem

    archive = archive_of(model, "gz")

    class TrickleFS(AbstractFileSystem):
        protocol = "hubcache-trickle"

        def _open(self, path, mode="rb", **kwargs):
            return _TrickleFile(archive)

    fsspec.register_implementation("hubcache-trickle", TrickleFS, clobber=True)
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "1")
    url = "hubcache-trickle://models/m.tar.gz"
    began = time.perf_counter()
    with pytest.raises(DownloadError, match="HUBCACHE_DOWNLOAD_DEADLINE") as info:
        hubcache.resolve(url)
    seconds = time.perf_counter() - began
    assert 1.0 <= seconds < 2.5 and url in str(info.value)
    assert leftovers(cache_root) == [] and not committed_names(cache_root)
    figures.update(run="an fsspec source sending 64 B every 20 ms; HUBCACHE_DOWNLOAD_DEADLINE=1",
                   fail_after_s=round(seconds, 3))


def test_the_deadline_cuts_a_server_that_trickles_its_headers(model, cache_root, monkeypatch, figures):
    """The origin never finishes its response headers, sending one byte every 20 ms: the read
    timeout never fires, and the deadline cuts the wait for headers as it cuts a body."""
    monkeypatch.setenv("HUBCACHE_TIMEOUT", "2")
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "1")
    with OriginServer() as origin:
        url = origin.add("/net/headers.tar.gz", archive_of(model))
        origin.fail("/net/headers.tar.gz", ("slow_headers", 0.02))
        began = time.perf_counter()
        with pytest.raises(DownloadError, match="HUBCACHE_DOWNLOAD_DEADLINE"):
            hubcache.resolve(url)
        seconds = time.perf_counter() - began
        requests = origin.count()
    assert 1.0 <= seconds < 2.5 and requests == 1
    figures.update(run="headers never end (1 B every 20 ms); HUBCACHE_TIMEOUT=2, HUBCACHE_DOWNLOAD_DEADLINE=1",
                   requests=requests, fail_after_s=round(seconds, 3))
