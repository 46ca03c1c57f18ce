"""When a worker sends its next request early (``download/ahead.py``'s ``due``): a round trip
before its current answer ends, and only where a round trip is a real share of a chunk's time."""

from __future__ import annotations

from hubcache.download.ahead import AHEAD, MIN_TIMED, Latency, due

MB = 1_000_000


def _latency(seconds: float) -> Latency:
    latency = Latency()
    latency.timed(10.0, 10.0 + seconds)
    return latency


def test_the_next_request_goes_out_when_the_bytes_left_take_about_a_round_trip():
    """32 MB/s and 30 ms, a 4 MiB chunk: due once the bytes left would take AHEAD x 30 ms."""
    latency, rate, chunk = _latency(0.030), 32 * MB, 4 << 20
    for got in range(MIN_TIMED, chunk, 64 << 10):
        left = chunk - got
        expected = left <= AHEAD * 0.030 * rate
        assert due(left, got, since=100.0, latency=latency, now=100.0 + got / rate) == expected, got


def test_not_before_the_rate_can_be_told_nor_without_a_latency_nor_at_the_end():
    assert not due(1 << 20, MIN_TIMED - 1, since=0.0, latency=_latency(0.5), now=1.0)
    assert not due(1 << 20, 4 << 20, since=0.0, latency=Latency(), now=1.0)
    assert not due(0, 4 << 20, since=0.0, latency=_latency(0.5), now=1.0)


def test_no_early_request_where_the_latency_is_a_small_share_of_the_chunk():
    """A bucket a few milliseconds away: 2 ms against a 2 MiB chunk at 20 MB/s (105 ms) is 2 %
    of its time; an early request would hide little and cost a connection, a thread and a
    request's work at once (measured: 16 hosts copying on 2 shared cores took 17.4 s with early
    requests, 15.5 s without). The same chunk 50 ms away is requested early."""
    chunk, rate = 2 << 20, 20 * MB
    for got in range(MIN_TIMED, chunk, 16 << 10):
        assert not due(chunk - got, got, since=0.0, latency=_latency(0.002), now=got / rate), got
    got = chunk - (64 << 10)
    assert due(chunk - got, got, since=0.0, latency=_latency(0.050), now=got / rate)
