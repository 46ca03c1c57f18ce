"""Parallel ranged downloads (``download/parallel.py``) against a real loopback origin that honours
``Range``/``If-Range``, caps each connection's rate and counts concurrent requests and
connections: N connections are really used and the bytes are the object's; a changed object
restarts from byte 0; an origin that answers ranges wrongly (each way separately) restarts as
one stream; the fallbacks to one stream; per-chunk retries and resumes; the bytes held stay
within ``connections x chunk size`` whatever the reader does; the deadline; the settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

import hubcache
from hubcache import DownloadError
from hubcache.core.config import load_config
from hubcache.download import parallel
from hubcache.download.fetch import HttpSource, open_source
from hubcache.download.parallel import ParallelSource, RangeAnswerError, parallel_source
from hubcache.testing import archive_of, build_model_dir, tree_of

from test_fetch import nothing_committed

CHUNK = 64 << 10
N = 4
#: The chunks the ring holds at most (its places): two per connection.
WINDOW = parallel.PLACES_PER_CONNECTION * N


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two versions of a model (about 1.5 MiB of weights each: 24 chunks of 64 KiB) and their
    .tar.gz archives."""
    root = tmp_path_factory.mktemp("models")
    dirs = [build_model_dir(root / f"v{i}", weights_bytes=1536 << 10, shards=2, seed=i) for i in (1, 2)]
    return {"dirs": dirs, "trees": [tree_of(d) for d in dirs], "archives": [archive_of(d, "gz") for d in dirs]}


@pytest.fixture(autouse=True)
def network_bound(request, monkeypatch):
    """The test origin is on loopback, faster than any decoder: the probe would keep every
    download here one stream. These tests are about the parallel path itself, so there is no
    probe: the workers start with the first answer (the probe is tested on its own, at the end,
    by the tests marked ``real_probe``)."""
    if "real_probe" not in request.keywords:
        monkeypatch.setattr(parallel, "PROBE_BYTES", 0)


@pytest.fixture
def parallel_env(monkeypatch):
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", str(N))
    monkeypatch.setenv("HUBCACHE_CHUNK_SIZE", "64K")


def _ranges(origin, path):
    """The Range headers of the requests of ``path``, in arrival order (None: a plain GET)."""
    return [r.headers.get("Range") for r in origin.requests if r.path == path]


def _open(url, **kwargs):
    kwargs.setdefault("connections", N)
    kwargs.setdefault("chunk_size", CHUNK)
    return parallel_source(open_source(url), url, **kwargs)


def _read_all(source, size=1 << 20):
    parts = []
    while True:
        data = source.read(size)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _restarts(events):
    return [e for e in events if e.kind == "download_retry" and e.data.get("offset") == 0]


# -- N connections, the same bytes --------------------------------------------------------------


def test_n_connections_fetch_consecutive_ranges_and_the_entry_is_the_archive(origin, models, parallel_env, events):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.network("/m.tar.gz", 2 << 20, 0.005, step=16 << 10)  # 2 MiB/s per connection
    path = hubcache.resolve(url)
    assert tree_of(path) == models["trees"][0]
    requests = [r for r in origin.requests if r.path == "/m.tar.gz"]
    # The first answer is a plain GET; every other request is one chunk, each asked once, with
    # the first answer's ETag in If-Range, and together they are every byte after chunk 0.
    assert requests[0].headers.get("Range") is None and requests[0].status == 200
    spans = sorted(tuple(map(int, r.headers["Range"][6:].split("-"))) for r in requests[1:])
    chunks = -(-len(body) // CHUNK)
    assert spans == [(k * CHUNK, min(len(body), (k + 1) * CHUNK) - 1) for k in range(1, chunks)]
    assert {r.headers.get("If-Range") for r in requests[1:]} == {f'"{len(body)}-{hash(body) & 0xFFFFFFFF:x}"'}
    assert {r.status for r in requests[1:]} == {206}
    # N connections at once, really: the origin saw N requests in flight and N client ports.
    assert origin.peak_active >= N
    assert len({r.client for r in requests[1:]}) >= N - 1
    # Kept-alive connections carry several chunks each (not one connection per chunk).
    assert len({r.client for r in requests}) <= N + 1
    progress = [e.data["bytes"] for e in events if e.kind == "download_progress"]
    assert progress == sorted(progress) and progress[0] > 0
    finished = [e for e in events if e.kind == "download_finished"]
    assert [e.data["bytes"] for e in finished] == [len(body)]
    assert not [e for e in events if e.kind == "download_retry"]


def test_the_source_reads_the_same_bytes_in_any_read_size(origin, models):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    for size in (1, 1000, CHUNK - 1, CHUNK, 3 * CHUNK + 5, 8 << 20):
        source = _open(url)
        try:
            assert isinstance(source, ParallelSource)
            if size == 1:  # byte by byte across the first chunk's end, then large reads
                head = b"".join(source.read(1) for _ in range(CHUNK + 10))
                data = head + _read_all(source)
            else:
                data = _read_all(source, size)
        finally:
            source.close()
        assert data == body and source.position == len(body)


def test_last_modified_is_a_validator_too(origin, models, parallel_env):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.validators("/m.tar.gz", "last-modified")
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    requests = [r for r in origin.requests if r.path == "/m.tar.gz"]
    assert len(requests) > 2 and all(r.headers.get("If-Range", "").endswith("GMT") for r in requests[1:])


# -- falling back to one stream ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["no ranges", "no validator", "weak etag", "no length", "small", "one connection"])
def test_one_stream_when_the_origin_or_the_object_does_not_allow_ranges(origin, models, case):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body, ranges=case != "no ranges")
    if case == "no validator":
        origin.validators("/m.tar.gz", "none")
    elif case == "weak etag":
        origin.validators("/m.tar.gz", "weak")
    elif case == "no length":
        origin.fail("/m.tar.gz", ("unframed", 0))
    chunk = len(body) // 2 + 1 if case == "small" else CHUNK
    source = _open(url, chunk_size=chunk, connections=1 if case == "one connection" else N)
    try:
        assert isinstance(source, HttpSource) and not isinstance(source, ParallelSource)
        assert _read_all(source) == body
    finally:
        source.close()
    assert _ranges(origin, "/m.tar.gz") == [None]


def test_an_object_of_two_chunks_is_parallel(origin, models):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    source = _open(url, chunk_size=len(body) // 2)
    try:
        assert isinstance(source, ParallelSource) and _read_all(source) == body
    finally:
        source.close()


def test_file_sources_are_left_alone(tmp_path, models):
    path = tmp_path / "m.tar.gz"
    path.write_bytes(models["archives"][0])
    source = parallel_source(open_source(str(path)), str(path), connections=N, chunk_size=CHUNK)
    try:
        assert not isinstance(source, ParallelSource) and _read_all(source) == models["archives"][0]
    finally:
        source.close()


# -- the object changed: restart from byte 0 ----------------------------------------------------


@pytest.mark.parametrize("if_range", [True, False], ids=["200 to If-Range", "206 of the new version"])
def test_a_change_between_chunks_restarts_from_byte_0_in_parallel(origin, models, parallel_env, events, if_range):
    old, new = models["archives"]
    url = origin.add("/m.tar.gz", old)
    origin.validators("/m.tar.gz", "etag", if_range=if_range)
    # The object is replaced when chunk 5 is asked for: with If-Range honoured the answer is a
    # 200 of the new version; without, a 206 of the new version with its new ETag.
    origin.fail_range("/m.tar.gz", 5 * CHUNK, ("change", new))
    path = hubcache.resolve(url)
    assert tree_of(path) == models["trees"][1]
    restarts = _restarts(events)
    assert len(restarts) == 1 and "changed" in restarts[0].data["error"]
    # The restart is parallel again: chunk requests carrying the new version's ETag.
    new_etag = f'"{len(new)}-{hash(new) & 0xFFFFFFFF:x}"'
    assert sum(1 for r in origin.requests if r.headers.get("If-Range") == new_etag and r.status == 206) >= N


def test_a_416_to_a_chunk_is_a_change(origin, models, parallel_env, events):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.fail_range("/m.tar.gz", 3 * CHUNK, ("status", 416))
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    restarts = _restarts(events)
    assert len(restarts) == 1 and "HTTP 416" in restarts[0].data["error"]


# -- wrong answers to a range: restart as one stream -----------------------------------------------

#: fault on chunk 3's request -> what the restart's reason must name
WRONG_ANSWERS = {
    "Content-Range claims more bytes": (("long_range", 100), "Content-Range is 'bytes 196608-262243/"),
    "Content-Range claims fewer bytes": (("short_range", 100), "Content-Range is 'bytes 196608-262043/"),
    "Content-Range starts elsewhere": (("bad_range", 1, 0), "Content-Range is 'bytes 196609-"),
    "the total changes": (("bad_range", 0, 1), "Content-Range is 'bytes 196608-262143/"),
    "body longer than its range": (("body_delta", 100), "Content-Length 65636 does not match"),
    "body shorter than its range": (("body_delta", -100), "Content-Length 65436 does not match"),
    "unframed body runs past its range": (("unframed", 100), "more bytes than the range 196608-262143"),
    "the whole object to a range": (("ignore_range",), "HTTP 200 (the whole file) to the range 196608-262143"),
}


@pytest.mark.parametrize("name", list(WRONG_ANSWERS))
def test_a_wrong_answer_to_a_range_restarts_as_one_stream(origin, models, parallel_env, events, name):
    fault, reason = WRONG_ANSWERS[name]
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.fail_range("/m.tar.gz", 3 * CHUNK, fault)
    path = hubcache.resolve(url)
    assert tree_of(path) == models["trees"][0]
    restarts = _restarts(events)
    assert len(restarts) == 1, [e.data for e in events if e.kind == "download_retry"]
    assert reason in restarts[0].data["error"]
    # The restart is one stream: a second plain GET that got the whole object. (Not simply the
    # last request logged: the origin logs a request when its answer ends, so a chunk that was
    # in flight when the restart began may be logged after it on a loaded machine.)
    plain = [r for r in origin.requests if r.path == "/m.tar.gz" and r.headers.get("Range") is None]
    assert len(plain) == 2
    assert plain[-1].status == 200 and plain[-1].sent == len(body)


@pytest.mark.parametrize("name", list(WRONG_ANSWERS))
def test_a_wrong_answer_is_a_range_answer_error_at_the_source(origin, models, name):
    fault, reason = WRONG_ANSWERS[name]
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.fail_range("/m.tar.gz", 3 * CHUNK, fault)
    source = _open(url)
    try:
        with pytest.raises(RangeAnswerError, match="does not match it") as info:
            _read_all(source)
    finally:
        source.close()
    assert reason in str(info.value) and "HUBCACHE_CONNECTIONS=1" in info.value.hint


def test_a_huge_announced_length_allocates_nothing_for_it(origin, models, parallel_env, events):
    """The first answer announces 1 PiB (then sends the real body and closes): the plan is made
    for 2**34 chunks, but nothing is allocated per chunk; the chunk answers' true total is a
    wrong answer, and the restart as one stream gets the real object."""
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.fail("/m.tar.gz", ("length", 1 << 50))
    tracemalloc.start()
    try:
        path = hubcache.resolve(url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tree_of(path) == models["trees"][0]
    assert peak < 32 << 20, f"{peak} bytes allocated at the peak"
    restarts = _restarts(events)
    assert len(restarts) == 1 and f"/{len(body)}'" in restarts[0].data["error"]


# -- failures of one chunk: retried and resumed on its own -----------------------------------------


@pytest.mark.parametrize("fault", [("cut", 1000), ("reset", 1000), ("stall", 1000, 3.0)])
def test_a_connection_dropped_mid_chunk_resumes_that_chunk_only(origin, models, parallel_env, monkeypatch, events,
                                                                fault):
    if fault[0] == "stall":
        monkeypatch.setenv("HUBCACHE_TIMEOUT", "0.5")
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    start = 7 * CHUNK
    origin.fail_range("/m.tar.gz", start, fault)
    main = threading.get_ident()
    seen_on: list[int] = []

    class Thread:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            if event.kind == "download_retry":
                seen_on.append(threading.get_ident())

    from hubcache.plugins.registry import get_registry

    get_registry().pm.register(Thread(), name="test-retry-thread")
    try:
        path = hubcache.resolve(url)
    finally:
        get_registry().pm.unregister(name="test-retry-thread")
    assert tree_of(path) == models["trees"][0]
    retries = [e.data for e in events if e.kind == "download_retry"]
    # Resumed from the chunk's bytes received (a reset may discard the 1000 sent: then from its start).
    assert len(retries) == 1 and retries[0]["offset"] in (start, start + 1000)
    if fault[0] == "cut":
        assert retries[0]["offset"] == start + 1000
    assert f"(bytes {start}-{start + CHUNK - 1})" in retries[0]["error"]
    assert seen_on == [main]  # retry events reach plugins on the resolving thread
    ranges = _ranges(origin, "/m.tar.gz")
    resumed = f"bytes={retries[0]['offset']}-{start + CHUNK - 1}"
    assert ranges.count(f"bytes={start}-{start + CHUNK - 1}") == 1 + (resumed == f"bytes={start}-{start + CHUNK - 1}")
    assert ranges.count(resumed) >= 1
    assert None in ranges and ranges.count(None) == 1  # no restart


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_to_a_chunk_is_retried(origin, models, parallel_env, events, status):
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.fail_range("/m.tar.gz", 2 * CHUNK, ("status", status))
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    retries = [e.data for e in events if e.kind == "download_retry"]
    assert [(r["attempt"], r["offset"]) for r in retries] == [(1, 2 * CHUNK)]
    assert f"HTTP {status}" in retries[0]["error"]
    assert _ranges(origin, "/m.tar.gz").count(f"bytes={2 * CHUNK}-{3 * CHUNK - 1}") == 2


def test_a_chunk_refused_twice_is_handed_to_another_connection(origin, models, parallel_env, events):
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.fail_range("/m.tar.gz", 2 * CHUNK, ("status", 503), ("status", 429))
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    retries = [e.data["error"] for e in events if e.kind == "download_retry"]
    assert len(retries) == 2 and retries[0].startswith("HTTP 503")
    assert retries[1].startswith("HTTP 429") and retries[1].endswith("going on with one connection fewer")
    assert _ranges(origin, "/m.tar.gz").count(f"bytes={2 * CHUNK}-{3 * CHUNK - 1}") == 3


def test_with_no_retries_a_refused_chunk_is_handed_over_not_failed(origin, models, parallel_env, monkeypatch,
                                                                   events):
    monkeypatch.setenv("HUBCACHE_RETRIES", "0")
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.fail_range("/m.tar.gz", 2 * CHUNK, ("status", 503))
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    assert [e.data["error"].endswith("one connection fewer") for e in events if e.kind == "download_retry"] == [True]


def test_a_chunk_handed_back_mid_way_goes_on_from_the_bytes_received(origin, models, parallel_env, events):
    start, end = 5 * CHUNK, 6 * CHUNK - 1
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.fail_range("/m.tar.gz", start, ("cut", 1000))
    origin.fail_range("/m.tar.gz", start + 1000, ("status", 503), ("status", 503))
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    ranges = _ranges(origin, "/m.tar.gz")
    assert ranges.count(f"bytes={start}-{end}") == 1 and ranges.count(f"bytes={start + 1000}-{end}") == 3
    assert "one connection fewer" in [e.data for e in events if e.kind == "download_retry"][-1]["error"]


def test_an_origin_limiting_connections_is_read_over_fewer(origin, models, parallel_env, events):
    """An origin that answers 503 beyond 2 requests at once: the extra workers leave, the
    download completes over the connections the origin accepts (instead of failing)."""
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    origin.network("/m.tar.gz", 4 << 20, step=16 << 10)
    origin.routes["/m.tar.gz"].max_active = 2
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    assert 503 in {r.status for r in origin.requests}  # the limit was hit
    fewer = [e for e in events if e.kind == "download_retry" and "one connection fewer" in e.data["error"]]
    assert len(fewer) <= N - 1
    assert not _restarts(events)
    assert sum(r.sent for r in origin.requests if r.status in (200, 206)) >= len(body)


def test_the_last_connection_out_of_retries_fails_the_download_and_commits_nothing(origin, models, parallel_env,
                                                                                  monkeypatch, events):
    monkeypatch.setenv("HUBCACHE_RETRIES", "2")
    url = origin.add("/m.tar.gz", models["archives"][0])
    # Every worker is refused chunk 4 twice and leaves, but the last, which retries it twice.
    origin.fail_range("/m.tar.gz", 4 * CHUNK, *[("status", 503)] * 20)
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(url)
    assert info.value.status == 503 and info.value.attempts == 3
    assert f"bytes {4 * CHUNK}-{5 * CHUNK - 1}, 3 attempts" in str(info.value)
    assert nothing_committed()
    fewer = [e for e in events if e.kind == "download_retry" and "one connection fewer" in e.data["error"]]
    assert len(fewer) == N - 1
    assert _ranges(origin, "/m.tar.gz").count(f"bytes={4 * CHUNK}-{5 * CHUNK - 1}") == 2 * (N - 1) + 3


def test_the_deadline_stops_every_connection(origin, models, parallel_env, monkeypatch):
    monkeypatch.setenv("HUBCACHE_DOWNLOAD_DEADLINE", "1")
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.network("/m.tar.gz", 64 << 10, step=4 << 10)  # 64 KiB/s a connection: ~6 s with 4
    began = time.monotonic()
    with pytest.raises(DownloadError, match="HUBCACHE_DOWNLOAD_DEADLINE"):
        hubcache.resolve(url)
    assert time.monotonic() - began < 3.0
    _no_workers_left()


# -- memory: the bytes held stay within connections x chunk size -------------------------------


def _settled(origin, path, quiet=0.3, limit=5.0):
    """Wait until ``path`` got no new request for ``quiet`` seconds (the workers are idle)."""
    end, last, since = time.monotonic() + limit, -1, time.monotonic()
    while time.monotonic() < end:
        count = len(_ranges(origin, path))
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.02)


def test_a_reader_that_stops_reading_stops_the_fetching(origin, models):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    source = _open(url)
    try:
        assert source.read(100) == body[:100]
        _settled(origin, "/m.tar.gz")
        # Stopped in chunk 0: only chunks 1..WINDOW-1 may be asked for, and they are all held.
        ends = [int(r[6:].split("-")[1]) for r in _ranges(origin, "/m.tar.gz") if r]
        assert len(ends) == WINDOW - 1 and max(ends) == WINDOW * CHUNK - 1
        assert source.buffered == (WINDOW - 1) * CHUNK
        rest = source.read(CHUNK)  # the rest of chunk 0, then one piece of chunk 1
        while source.position < CHUNK + 1:
            rest += source.read(CHUNK)
        _settled(origin, "/m.tar.gz")
        ends = [int(r[6:].split("-")[1]) for r in _ranges(origin, "/m.tar.gz") if r]
        assert max(ends) == (WINDOW + 1) * CHUNK - 1  # the window moved by one chunk, no further
        assert source.buffered <= WINDOW * CHUNK
        # Past chunk 0 the first answer's connection is closed (it would go on sending the object).
        first = origin.requests[0].client
        end = time.monotonic() + 2.0
        while first in origin.open_clients and time.monotonic() < end:
            time.sleep(0.01)
        assert first not in origin.open_clients
        data = body[:100] + rest + _read_all(source, 4096)
    finally:
        source.close()
    assert data == body
    assert source.peak_buffered <= WINDOW * CHUNK


def test_a_slow_reader_holds_at_most_the_window(origin, models):
    body = models["archives"][0]
    url = origin.add("/m.tar.gz", body)
    source = _open(url)
    parts = []
    try:
        while True:
            data = source.read(16 << 10)
            if not data:
                break
            parts.append(data)
            assert source.buffered <= WINDOW * CHUNK
            time.sleep(0.0005)
    finally:
        source.close()
    assert b"".join(parts) == body and 0 < source.peak_buffered <= WINDOW * CHUNK


def _no_workers_left(limit=5.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if not [t for t in threading.enumerate() if t.name.startswith("hubcache-range-")]:
            return
        time.sleep(0.02)
    raise AssertionError("worker threads still running")


def test_closing_mid_download_stops_the_workers(origin, models):
    url = origin.add("/m.tar.gz", models["archives"][0])
    origin.network("/m.tar.gz", 256 << 10, step=8 << 10)
    source = _open(url)
    source.read(1000)
    time.sleep(0.1)
    began = time.monotonic()
    source.close()
    assert time.monotonic() - began < 2.0
    _no_workers_left()
    count = len(origin.requests)
    time.sleep(0.3)
    assert len(origin.requests) == count


# -- where chunks are asked: credentials, redirects ------------------------------------------------


def test_credentials_go_with_every_chunk(origin, models, parallel_env):
    url = origin.add("/private/m.tar.gz", models["archives"][0])
    origin.require_auth("/private/m.tar.gz", "me", "s3cret")
    handle = url.replace("http://", "http://me:s3cret@")
    assert tree_of(hubcache.resolve(handle)) == models["trees"][0]
    requests = [r for r in origin.requests if r.path == "/private/m.tar.gz"]
    assert len(requests) > N and {r.status for r in requests} == {200, 206}


def test_chunks_ask_the_redirect_target_and_go_back_when_it_expires(origin, models):
    body = models["archives"][0]
    origin.add("/signed-1", body)
    origin.add("/signed-2", body)
    url = origin.redirect("/download/m", "/signed-1?sig=abc")
    first = open_source(url)
    # The signed target expires once the first answer is in; the handle now redirects elsewhere.
    origin.routes["/signed-1"].status = 403
    origin.redirect("/download/m", "/signed-2?sig=def")
    source = parallel_source(first, url, connections=N, chunk_size=CHUNK)
    try:
        assert isinstance(source, ParallelSource) and _read_all(source) == body
    finally:
        source.close()
    to_first = [r for r in origin.requests if r.path == "/signed-1"]
    assert to_first[0].query == "sig=abc" and to_first[0].status == 200
    assert all(r.status == 403 for r in to_first[1:])
    # After the 403s, chunks go through the handle's redirect again, to the new target.
    assert {r.status for r in origin.requests if r.path == "/signed-2"} == {206}
    assert all(r.query == "sig=def" for r in origin.requests if r.path == "/signed-2")


def test_chunks_skip_the_redirect_while_the_target_answers(origin, models, parallel_env):
    url = origin.add("/storage/m.tar.gz", models["archives"][0])
    handle = origin.redirect("/m", "/storage/m.tar.gz")
    assert tree_of(hubcache.resolve(handle)) == models["trees"][0]
    assert origin.count("/m") == 1 and origin.count("/storage/m.tar.gz") > N
    assert url


# -- settings ---------------------------------------------------------------------------------


def test_the_settings_and_their_defaults(monkeypatch):
    config = load_config()
    assert config["connections"] == 8 and config["chunk_size"] == 8 << 20
    assert config.settings["connections"].source == "default"
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", "16")
    monkeypatch.setenv("HUBCACHE_CHUNK_SIZE", "4M")
    config = load_config()
    assert config["connections"] == 16 and config["chunk_size"] == 4 << 20
    assert config.settings["chunk_size"].origin == "HUBCACHE_CHUNK_SIZE"


@pytest.mark.parametrize("name, value", [("HUBCACHE_CONNECTIONS", "0"), ("HUBCACHE_CONNECTIONS", "65"),
                                         ("HUBCACHE_CONNECTIONS", "many"), ("HUBCACHE_CHUNK_SIZE", "1K"),
                                         ("HUBCACHE_CHUNK_SIZE", "1G"), ("HUBCACHE_CHUNK_SIZE", "big")])
def test_bad_settings_are_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(hubcache.ConfigError, match=name):
        load_config()


def test_hubcache_config_shows_them(monkeypatch):
    env = dict(os.environ, HUBCACHE_CONNECTIONS="3")
    cli = os.path.join(os.path.dirname(sys.executable), "hubcache")
    out = subprocess.run([cli, "config", "--json"], capture_output=True, text=True, timeout=60, env=env, check=True)
    settings = json.loads(out.stdout)["settings"]
    assert settings["connections"] == {"value": 3, "source": "env", "origin": "HUBCACHE_CONNECTIONS"}
    assert settings["chunk_size"]["value"] == 8 << 20 and settings["chunk_size"]["source"] == "default"
    text = subprocess.run([cli, "config"], capture_output=True, text=True, timeout=60, env=env, check=True).stdout
    assert "connections" in text and "chunk_size" in text


def test_one_connection_is_todays_single_stream(origin, models, monkeypatch):
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", "1")
    monkeypatch.setenv("HUBCACHE_CHUNK_SIZE", "64K")
    url = origin.add("/m.tar.gz", models["archives"][0])
    assert tree_of(hubcache.resolve(url)) == models["trees"][0]
    assert _ranges(origin, "/m.tar.gz") == [None]


def test_more_connections_share_the_ring_budget_instead_of_growing_it(origin):
    """16 connections of 8 MiB, two places each, would hold 256 MiB (measured at 949 MiB with
    one place each: a peak RSS of 172 MiB); the chunks shrink so the ring stays within
    HTTP_BUFFER (64 MiB), and the bytes are the same."""
    body = os.urandom(24 << 20)
    url = origin.add("/big.bin", body)
    source = _open(url, connections=16, chunk_size=8 << 20)
    try:
        assert isinstance(source, ParallelSource)
        assert source.chunk_size == 2 << 20 and source.connections == 16
        data = _read_all(source)
    finally:
        source.close()
    assert data == body
    assert 0 < source.peak_buffered <= parallel.HTTP_BUFFER
    # A chunk size that already fits is kept.
    assert parallel.fitted_chunk(8 << 20, 8, parallel.HTTP_BUFFER) == 8 << 20
    assert parallel.fitted_chunk(8 << 20, 64, parallel.HTTP_BUFFER) == 1 << 20  # never below 1 MiB


# -- the probe: parallel only where the link limits ------------------------------------------------

#: The probe's threshold in these tests: far above the capped origin's 2 MB/s, far below what
#: loopback gives even on a loaded machine (the default, 250 MB/s, is measured in benchmarks/).
ENOUGH = 20e6


@pytest.mark.real_probe
def test_a_capped_link_goes_parallel_after_the_probe(origin, monkeypatch):
    """An origin that sends each answer at 2 MB/s: one flow is slower than the threshold, so
    after the probe's bytes the workers start and the rest comes over ranged connections."""
    monkeypatch.setattr(parallel, "ONE_FLOW_ENOUGH", ENOUGH)
    body = os.urandom(12 * CHUNK)
    url = origin.add("/capped.bin", body)
    origin.network("/capped.bin", 2e6, step=16 << 10)
    source = _open(url, chunk_size=4 * CHUNK)  # the probe: the first 256 KiB (chunk 0 here)
    try:
        data = _read_all(source, 64 << 10)
    finally:
        source.close()
    assert data == body and source.mode == "parallel"
    assert sum(1 for r in _ranges(origin, "/capped.bin") if r) == 2  # chunks 1 and 2


@pytest.mark.real_probe
def test_a_flow_faster_than_the_threshold_stays_one_stream(origin, monkeypatch):
    """An origin at loopback speed: one flow beats the threshold, so no worker starts, the
    first answer is read to its end, and the origin sees one plain GET (more connections would
    only add work)."""
    monkeypatch.setattr(parallel, "ONE_FLOW_ENOUGH", ENOUGH)
    body = os.urandom(48 * CHUNK)
    url = origin.add("/fast.bin", body)
    source = _open(url, chunk_size=16 * CHUNK)  # the probe: 1 MiB of chunk 0
    try:
        data = _read_all(source, 64 << 10)
    finally:
        source.close()
    assert data == body and source.mode == "single"
    assert _ranges(origin, "/fast.bin") == [None]


# -- the next request goes out a round trip early ---------------------------------------------------


def _network_download(origin, monkeypatch, *, connections, chunk, chunks, rate, latency):
    """Read an object of ``chunks`` chunks from an origin that answers each request after
    ``latency`` seconds and sends each answer at ``rate`` bytes per second; returns the seconds
    the read took and the origin's range requests."""
    body = os.urandom(chunks * chunk)
    url = origin.add("/far.bin", body)
    origin.network("/far.bin", rate, latency)
    began = time.monotonic()
    source = _open(url, connections=connections, chunk_size=chunk)
    try:
        assert isinstance(source, ParallelSource)
        data = _read_all(source)
    finally:
        source.close()
    seconds = time.monotonic() - began
    assert data == body
    return seconds, [r for r in origin.requests if r.path == "/far.bin" and r.headers.get("Range")]


def test_a_worker_requests_its_next_chunk_before_its_current_one_ends(origin, monkeypatch):
    """Each chunk's request waits a round trip for its first byte; a worker that asked only once
    its chunk ended spent that wait idle per chunk (at 8 connections of 32 MB/s and 30 ms, 10 %
    of the download; at 16, 19 %). The next request goes out while the current answer still
    flows: the origin sees most chunk requests arrive while every connection's answer is still
    being sent."""
    n, latency = 2, 0.15
    _, ranged = _network_download(origin, monkeypatch, connections=n, chunk=2 << 20, chunks=10,
                                  rate=8e6, latency=latency)

    def flowing(request):  # the other chunk answers being sent when ``request`` arrived
        return sum(1 for r in ranged if r is not request and r.arrived < request.arrived < r.finished)

    later = ranged[n:]  # the first round's requests all go out at once
    early = [r for r in later if flowing(r) >= n]
    assert len(early) >= len(later) - 2, [(round(r.arrived, 3), flowing(r)) for r in later]


def test_requests_made_early_do_not_make_more_flows_than_connections(origin, monkeypatch):
    """The early request is timed to answer when the current one ends, not at once: otherwise
    two answers per connection would flow together and the download would take more than its
    connections' share of the link. It can take no less than the bytes at ``n x rate``."""
    n, rate, chunk, chunks = 2, 8e6, 2 << 20, 10
    seconds, ranged = _network_download(origin, monkeypatch, connections=n, chunk=chunk, chunks=chunks,
                                        rate=rate, latency=0.1)
    assert seconds >= 0.9 * chunks * chunk / (n * rate)
    assert len(ranged) == chunks - 1  # chunk 0 is the first answer's


@pytest.mark.timeout(60)  # the failure this guards against is a hang: every worker gone, the chunk unfetched
def test_a_chunk_requested_early_and_refused_is_handed_to_another_connection(origin):
    """The early request of a chunk is refused twice (429 then 503) while its worker still
    receives its current chunk: the worker hands that chunk back once its current one is done and
    leaves, another connection fetches it, and the bytes are the object's (the early request's
    errors are raised on its worker's thread, as its own request's are)."""
    n, chunk, chunks = 3, 2 << 20, 10
    body = os.urandom(chunks * chunk)
    url = origin.add("/far.bin", body)
    origin.network("/far.bin", 8e6, 0.1)
    refused = 7 * chunk  # past the first round: requested early
    origin.fail_range("/far.bin", refused, ("status", 429), ("status", 503))
    notices = []
    source = _open(url, connections=n, chunk_size=chunk,
                   on_retry=lambda attempt, error, offset: notices.append((error, offset)))
    try:
        data = _read_all(source)
    finally:
        source.close()
    assert data == body
    asked = f"bytes={refused}-{refused + chunk - 1}"
    requests = [r for r in origin.requests if r.headers.get("Range") == asked]
    assert [r.status for r in requests] == [429, 503, 206]
    # Its first request went out while the other connections' answers still flowed: early.
    assert sum(1 for r in origin.requests
               if r.headers.get("Range") and r.arrived < requests[0].arrived < r.finished) >= n - 1
    assert any(error.endswith("going on with one connection fewer") and offset == refused
               for error, offset in notices), notices
