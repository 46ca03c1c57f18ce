"""Consecutive chunks of one object fetched by worker threads, handed to one reader in order.

The machinery every parallel download shares (http(s) ranges in ``download/parallel.py``, object
store ranges in ``download/objectread.py``): worker threads claim chunk numbers in order and
copy what they receive into their chunk's place in one ring allocated once (``places x
chunk_size``, an anonymous mapping); the reading thread copies the bytes out in order. Chunk
``k``'s place is filled only while ``k`` is less than the reader's chunk plus ``window`` (the
places): the bytes held, received but not yet read, are bounded however slowly the reader reads.
A worker may claim its next chunk early, while it still receives its current one
(:meth:`ChunkRing._claim_early`, so its request can go out a round trip ahead); that chunk's
bytes still wait for its place (:meth:`ChunkRing._await_place`).

Why a ring and not the bytes objects the workers receive: held until read, those would live in
each worker thread's malloc arena, and freed space in one arena is not reused by another (a
cold 1 GiB resolve peaked ~50 MiB above the buffer's bound that way).

What a chunk is and how it is fetched is the subclass's: it implements :meth:`ChunkRing._fetch`,
which receives bytes with :meth:`ChunkRing._deliver` (or writes ``_view`` itself and calls
:meth:`ChunkRing._put`). The first error a worker raises stops every worker and is raised by
the reader's next read; a worker leaves quietly by raising :class:`Leave`.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
from typing import Callable

__all__ = ["MIN_CHUNKS", "PIECE", "ChunkRing", "GaveWay", "Leave", "Stopped"]

#: Most bytes one read hands out (the pipeline's chunk).
PIECE = 1 << 20
#: An object shorter than this many chunks is read as one stream (with the default 8 MiB chunks,
#: a second connection would save at most half a second at 32 MB/s a connection).
MIN_CHUNKS = 2
#: The smallest chunk a ring's byte budget shrinks chunks to (smaller ones would spend more of
#: each connection's time on request latency than on bytes).
MIN_FITTED_CHUNK = 1 << 20


def fitted_chunk(chunk_size: int, connections: int, budget: int) -> int:
    """The chunk of a ring of ``connections`` places that holds at most ``budget`` bytes:
    ``chunk_size``, or less if ``connections`` of it would not fit (never below
    :data:`MIN_FITTED_CHUNK`, nor above ``chunk_size``): more connections share the budget
    instead of growing the process."""
    return min(chunk_size, max(MIN_FITTED_CHUNK, budget // max(1, connections)))


class Leave(Exception):
    """A worker leaves quietly (its reason is the subclass's)."""


class Stopped(Leave):
    """The download was closed or failed elsewhere: a worker leaves quietly."""


class GaveWay(Exception):
    """A worker handed the chunk it claimed early back, for an older one (see
    :meth:`ChunkRing._await_place`): it claims again."""


class _Slot:
    """A chunk being received into its place in the ring: where that is, how many bytes arrived,
    how many the reader took, and whether all of it arrived."""

    __slots__ = ("base", "received", "taken", "done")

    def __init__(self, base: int) -> None:
        self.base = base
        self.received = 0
        self.taken = 0
        self.done = False


class ChunkRing:
    """Chunks ``first``.. of an object of ``total`` bytes fetched by worker threads into a ring,
    read in order (a mixin: the subclass is the stream, and implements :meth:`_fetch`).

    Call :meth:`_ring_init` from the subclass's ``__init__``, then :meth:`_start_workers` once the
    subclass's own state is set; read with :meth:`_next_piece`; stop with :meth:`_shut_down`.

    Attributes:
        chunk_size: bytes per chunk.
        buffered: bytes received and not yet read.
        peak_buffered: the most bytes ever held at once (at most ``places x chunk_size``).
    """

    chunk_size: int
    buffered: int
    peak_buffered: int

    def _ring_init(self, total: int, chunk_size: int, window: int, *, first: int, name: str,
                   on_retry: Callable[[int, str, int], None] | None = None, count: int | None = None,
                   workers: int | None = None) -> None:
        """Set the ring up (no thread started yet).

        Args:
            total: the object's byte count.
            chunk_size: bytes per chunk.
            window: chunks held at most, the reader's own included (the ring's places).
            first: the first chunk the workers fetch (the reader may read earlier ones itself,
                then call :meth:`_advance`).
            name: the worker threads' name prefix.
            on_retry: called on the reading thread with each :meth:`_notice`.
            count: the chunks, if not ``total / chunk_size`` (a subclass whose chunks are its own
                ranges of at most ``chunk_size`` bytes; it overrides :meth:`_span` or ignores it).
            workers: the worker threads, at most ``window`` (default: ``window``). Fewer workers
                than places leave the reader slack: a worker whose next chunk is ``workers``
                past its current one finds that chunk's place already read.
        """
        self._total = total
        self.chunk_size = chunk_size
        self._window = window
        self._count = -(-total // chunk_size) if count is None else count
        lock = threading.Lock()
        self._readable = threading.Condition(lock)  # the reader waits for its chunk
        self._claimable = threading.Condition(lock)  # workers wait for the window to move
        self._slots: dict[int, _Slot] = {}  # chunk -> what arrived of it, only for claimed chunks
        # Chunk k's place is (k - first) mod places: the window never holds two chunks of one place.
        places = max(1, min(window, self._count - first))
        workers = max(1, min(places, workers or window))
        self._first = first
        self._places = places
        self._ring = mmap.mmap(-1, places * chunk_size)  # pages are touched as used
        self._view = memoryview(self._ring)
        self._claimed = first  # the next chunk to claim
        self._undone = 0  # chunks claimed and not yet fetched whole (handed back ones included)
        self._returned: list[int] = []  # chunks handed back by leaving workers, to take first
        self._workers = workers  # workers still working
        self._head = 0  # the chunk the reader is in
        self._notices: list[tuple[int, str, int]] = []  # retries, for on_retry on the reading thread
        self._on_retry = on_retry
        self._error: BaseException | None = None
        self._stopping = False
        self._stop = threading.Event()
        self.buffered = 0
        self.peak_buffered = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]

    def _start_workers(self) -> None:
        for thread in self._threads:
            thread.start()

    # -- geometry -------------------------------------------------------------------------------

    def _span(self, k: int) -> tuple[int, int]:
        """The first and last byte of chunk ``k``."""
        start = k * self.chunk_size
        return start, min(self._total, start + self.chunk_size) - 1

    # -- the workers ------------------------------------------------------------------------------

    def _fetch(self, k: int) -> int | None:
        """Fetch chunk ``k`` (from ``_slots[k].received`` on) and :meth:`_deliver` its bytes.

        Returns the chunk this worker goes on with, if it claimed one with :meth:`_claim_early`
        (its request already on its way), else ``None`` (the worker claims its next one).
        """
        raise NotImplementedError

    def _pause_before_retry(self, failures: int, retries: int) -> bool:
        """Whether a chunk is tried again after its ``failures``-th transient failure: not past
        ``retries``; else yes, after a backoff pause (0.5 s, 1 s, ... at most 8 s).

        Raises:
            Stopped: the ring stopped during the pause.
        """
        if failures > retries:
            return False
        if self._stop.wait(min(8.0, 0.25 * 2 ** failures)):
            raise Stopped
        return True

    def _on_halt(self) -> None:
        """Called once every worker was told to stop: cut what a worker may be blocked on."""

    def _work(self) -> None:
        try:
            k = self._claim()
            while k is not None:
                try:
                    early = self._fetch(k)
                except GaveWay:
                    k = self._claim()
                    continue
                self._done(k)
                k = early if early is not None else self._claim()
        except Leave:
            return
        except BaseException as error:  # raised by the reader's next read
            with self._readable:
                if self._error is None and not self._stopping:
                    self._error = error
            self._halt()

    def _claim(self) -> int | None:
        with self._claimable:
            # With every chunk claimed, a worker stays until every one is fetched: one refused
            # mid-way may still be handed back, and must find a worker to take it.
            while not self._stopping and not self._returned and (
                    self._undone > 0 if self._claimed >= self._count
                    else self._claimed >= self._head + self._window):
                self._claimable.wait()
            return self._next_claim(self._count)

    def _claim_early(self) -> int | None:
        """Claim a worker's next chunk while it still receives its current one, so the request
        for it can go out a round trip before the current one ends; ``None`` if there is none to
        claim (yet). It may be up to ``window`` chunks past what :meth:`_claim` allows: its
        place is not filled before :meth:`_await_place` says it is free, so the bytes held stay
        bounded as before."""
        with self._claimable:
            return self._next_claim(min(self._count, self._head + 2 * self._window))

    def _next_claim(self, below: int) -> int | None:
        """(The lock held.) A chunk handed back, the oldest first (the reader may be waiting for
        it), else the next unclaimed chunk if it is below ``below``; ``None`` when stopping."""
        if self._stopping:
            return None
        if self._returned:
            self._returned.sort()
            return self._returned.pop(0)
        if self._claimed >= below:
            return None
        k = self._claimed
        self._claimed += 1
        self._undone += 1
        self._slots[k] = _Slot((k - self._first) % self._places * self.chunk_size)
        return k

    def _await_place(self, k: int) -> None:
        """Wait until chunk ``k``'s place may be filled (``k`` is less than the reader's chunk
        plus ``window``); at once for a chunk :meth:`_claim` gave.

        Raises:
            Stopped: the ring stopped.
            GaveWay: ``k`` was handed back instead, because an older chunk was handed back
                meanwhile (by a leaving worker): that one must go first, or every worker could
                wait for a place while the reader waits for the chunk nobody fetches.
        """
        with self._claimable:
            while not self._stopping and k >= self._head + self._window:
                if self._returned and min(self._returned) < k:
                    self._returned.append(k)
                    self._claimable.notify_all()
                    raise GaveWay
                self._claimable.wait()
            if self._stopping:
                raise Stopped

    def _deliver(self, k: int, data: bytes | memoryview) -> None:
        """Copy the next bytes of chunk ``k`` into its place (only this worker writes it, only
        past what arrived) and make them readable."""
        slot = self._slots[k]
        at = slot.base + slot.received
        self._view[at:at + len(data)] = data
        self._put(k, slot, len(data))

    def _put(self, k: int, slot: _Slot, count: int) -> None:
        with self._readable:
            if self._stopping:
                raise Stopped
            slot.received += count
            self.buffered += count
            self.peak_buffered = max(self.peak_buffered, self.buffered)
            if k == self._head:
                self._readable.notify()

    def _done(self, k: int) -> None:
        with self._readable:
            self._slots[k].done = True
            self._undone -= 1
            if k == self._head:
                self._readable.notify()
            if not self._undone:
                self._claimable.notify_all()  # workers staying for a chunk handed back may go

    def _may_retire(self) -> bool:
        """Whether a refused worker may leave (another one is left): it counts as gone if so."""
        with self._readable:
            if self._workers <= 1 or self._stopping:
                return False
            self._workers -= 1
            return True

    def _hand_back(self, k: int) -> None:
        with self._readable:
            self._returned.append(k)
            self._claimable.notify_all()  # a claim, or an _await_place that must give way

    def _notice(self, attempt: int, error: str, offset: int) -> None:
        with self._readable:
            self._notices.append((attempt, error, offset))
            self._readable.notify()

    def _halt(self) -> None:
        """Stop every worker: no new requests, waits end, :meth:`_on_halt` cuts the rest."""
        with self._readable:
            self._stopping = True
            self._readable.notify_all()
            self._claimable.notify_all()
        self._stop.set()
        self._on_halt()

    # -- the reader -------------------------------------------------------------------------------

    def _advance(self, k: int) -> None:
        """The reader read the chunks before ``k`` itself: the window moves on."""
        with self._readable:
            self._head = k
            self._claimable.notify_all()

    def _next_piece(self, size: int) -> bytes:
        """The next at most ``size`` bytes (``b""`` at the end), waiting for them to arrive;
        raises a worker's error."""
        span = self._wait_for(size)
        if span is None:
            return b""
        slot, count = span
        # Outside the lock: the worker writes only past what arrived, and the place is not
        # reused before the reader is done with this chunk.
        data = bytes(self._view[slot.base + slot.taken:slot.base + slot.taken + count])
        self._taken(slot, count)
        return data

    def _next_into(self, buffer: bytearray | memoryview) -> int:
        """:meth:`_next_piece` straight into ``buffer`` (one copy fewer)."""
        span = self._wait_for(len(buffer))
        if span is None:
            return 0
        slot, count = span
        buffer[:count] = self._view[slot.base + slot.taken:slot.base + slot.taken + count]
        self._taken(slot, count)
        return count

    def _wait_for(self, size: int) -> tuple[_Slot, int] | None:
        """``(slot, count)`` of the next bytes to read once they arrived, ``None`` at the end."""
        if self._notices or self._error is not None:
            self._report()
        while True:
            with self._readable:
                span = None
                while not self._notices and self._error is None:
                    span = self._take(size)
                    if span is not None:
                        break
                    self._readable.wait(0.5)
            if span is None:
                self._report()
                continue
            slot, count = span
            return None if slot is None else (slot, count)

    def _taken(self, slot: _Slot, count: int) -> None:
        with self._readable:
            slot.taken += count
            self.buffered -= count

    def _report(self) -> None:
        """Hand the workers' notices to ``on_retry``, then raise their error if one failed."""
        with self._readable:
            notices, self._notices = self._notices, []
            error = self._error
        for notice in notices:
            if self._on_retry is not None:
                self._on_retry(*notice)
        if error is not None:
            raise error

    def _take(self, size: int) -> tuple[_Slot | None, int] | None:
        """(The lock held.) ``(slot, count)``: the next ``count`` bytes of the reader's chunk are
        in ``slot``; ``(None, 0)`` at the end; ``None`` if they have not arrived yet."""
        while self._head < self._count:
            slot = self._slots.get(self._head)
            if slot is None:
                return None
            if slot.received > slot.taken:
                return slot, min(size, PIECE, slot.received - slot.taken)
            if not slot.done:
                return None
            del self._slots[self._head]
            self._head += 1
            self._claimable.notify_all()
        return None, 0

    def _shut_down(self, wait: float = 5.0) -> None:
        """Stop the workers, wait up to ``wait`` seconds for them to leave, and let the ring's
        memory go now (not at collection) if they did."""
        self._halt()
        until = time.monotonic() + wait
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, until - time.monotonic()))
        if not any(thread.is_alive() for thread in self._threads):
            with contextlib.suppress(BufferError):
                self._view.release()
                self._ring.close()
