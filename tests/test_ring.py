"""The ring every parallel download shares (``download/ring.py``): a chunk claimed early waits
for its place, and gives way to an older chunk a leaving worker handed back."""

from __future__ import annotations

import threading

import pytest

from hubcache.download.ring import ChunkRing, GaveWay, Stopped


class _Ring(ChunkRing):
    """A ring whose workers are never started: the test plays them by calling the claims."""

    def __init__(self, chunks: int, window: int, workers: int):
        self._ring_init(chunks * 4, 4, window, first=0, name="test-ring", workers=workers)


def _await_in_thread(ring, k):
    outcome = []

    def wait():
        try:
            ring._await_place(k)
            outcome.append("placed")
        except GaveWay:
            outcome.append("gave way")
        except Stopped:
            outcome.append("stopped")

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, outcome


def test_an_early_chunk_waits_for_its_place_and_takes_it_when_the_reader_moves_on():
    ring = _Ring(chunks=8, window=2, workers=1)
    assert ring._claim() == 0 and ring._claim() == 1  # the window: two places
    assert ring._claim_early() == 2  # past the window: claimed, but its place is chunk 0's
    thread, outcome = _await_in_thread(ring, 2)
    thread.join(0.2)
    assert thread.is_alive() and not outcome  # chunk 0 not read yet
    ring._advance(1)  # the reader is done with chunk 0
    thread.join(2.0)
    assert outcome == ["placed"]


def test_an_early_chunk_gives_way_to_an_older_chunk_handed_back():
    """Every worker could otherwise wait for a place while the reader waits for the chunk a
    leaving worker handed back, which nobody would fetch."""
    ring = _Ring(chunks=8, window=2, workers=2)
    assert ring._claim() == 0 and ring._claim() == 1
    assert ring._claim_early() == 2
    thread, outcome = _await_in_thread(ring, 2)
    thread.join(0.2)
    assert thread.is_alive()
    ring._hand_back(1)  # its worker leaves (refused by the origin)
    thread.join(2.0)
    assert outcome == ["gave way"]
    assert ring._claim() == 1 and ring._claim() == 2  # the oldest first, then the one given back


def test_a_halt_ends_the_wait_for_a_place():
    ring = _Ring(chunks=8, window=2, workers=1)
    ring._claim(), ring._claim()
    assert ring._claim_early() == 2
    thread, outcome = _await_in_thread(ring, 2)
    ring._halt()
    thread.join(2.0)
    assert outcome == ["stopped"]


def test_early_claims_stop_a_window_past_the_window():
    ring = _Ring(chunks=10, window=2, workers=2)
    assert [ring._claim() for _ in range(2)] == [0, 1]
    assert [ring._claim_early() for _ in range(3)] == [2, 3, None]  # head 0: up to chunk 3
    ring._advance(1)
    assert ring._claim_early() == 4


@pytest.mark.parametrize("workers, places", [(None, 3), (2, 3), (5, 3)])
def test_workers_are_at_most_the_places(workers, places):
    ring = _Ring(chunks=10, window=places, workers=workers)
    assert ring._places == places and len(ring._threads) == min(places, workers or places)


def _claim_in_thread(ring):
    got = []
    thread = threading.Thread(target=lambda: got.append(ring._claim()), daemon=True)
    thread.start()
    return thread, got


def test_with_every_chunk_claimed_an_idle_worker_stays_for_one_handed_back():
    """A worker with nothing left to claim does not leave while a chunk is still being fetched:
    that chunk may yet be handed back (its worker refused by the origin), and then needs a
    worker. Before, the idle workers left, the refused one handed its chunk back and left too,
    and the reader waited for ever (seen with a chunk whose early request was refused)."""
    ring = _Ring(chunks=3, window=3, workers=2)
    assert [ring._claim() for _ in range(3)] == [0, 1, 2]
    ring._done(0), ring._done(1)
    thread, got = _claim_in_thread(ring)
    thread.join(0.2)
    assert thread.is_alive() and not got, "left while chunk 2 could still come back"
    ring._hand_back(2)
    thread.join(2.0)
    assert got == [2]


def test_an_idle_worker_leaves_once_every_chunk_is_fetched():
    ring = _Ring(chunks=2, window=2, workers=2)
    assert [ring._claim() for _ in range(2)] == [0, 1]
    ring._done(0)
    thread, got = _claim_in_thread(ring)
    thread.join(0.2)
    assert thread.is_alive()
    ring._done(1)
    thread.join(2.0)
    assert got == [None]
