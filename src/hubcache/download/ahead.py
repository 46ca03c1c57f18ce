"""The next request, sent a round trip before the current answer ends.

Every ranged request waits a round trip (and the server's time to answer) for its first byte. A
worker that asks for its next chunk only once its current one has ended leaves its connection
idle for that wait, once per chunk: at 32 MB/s and 30 ms, 16 connections of 4 MiB chunks spent
19 % of their time so. The parallel readers (http(s) in ``download/parallel.py``, object stores
in ``download/objectread.py`` and ``download/objectfiles.py``) therefore send a worker's next
request while its current answer still flows, timed by :func:`due` so that the next answer
starts flowing about when the current one stops, and take the answer, already in, once it has.

An early request runs on a short-lived thread of its own (:class:`EarlyRequest`): it waits for
the answer's head only; its body stays in the connection (flow control holds it) until its
worker reads it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Generic, TypeVar

__all__ = ["AHEAD", "PLACES_PER_CONNECTION", "EarlyRequest", "Latency", "due"]

#: A worker requests its next chunk when the bytes left of its current one would take this many
#: request latencies at its rate (the latency: the shortest time a chunk's request took to be
#: answered).
AHEAD = 1.25
#: Bytes of an answer received before its rate is trusted.
MIN_TIMED = 512 << 10
#: A ring's places per connection where requests go out early. One each made a worker whose next
#: chunk was requested early wait for the reader to read its current one (that next chunk's
#: place) before taking a byte: 47 ms of each 262 ms chunk at 8 connections of 32 MB/s (http).
#: With two, the next chunk's place was read a round of chunks before; the chunks are half as
#: long in the same memory.
PLACES_PER_CONNECTION = 2
#: No early request when the latency is less than this share of the chunk's time at its rate:
#: it would hide little, and costs a connection, a thread and a request's work at once. Measured,
#: 16 hosts copying from an emulator a few milliseconds away on 2 shared cores: 17.4 s with early
#: requests for every chunk, 15.5 s with this rule; from a bucket 50 ms away (16 MB/s a
#: connection, 2 MiB chunks: a share of 38 %) the copy took 2.13 s either way.
MIN_SHARE = 0.1

T = TypeVar("T")


class Latency:
    """The shortest time a request of one download took to be answered (its head); ``inf``
    until one was timed. Retried requests are not timed: their time is not a round trip."""

    def __init__(self) -> None:
        self.seconds = math.inf

    def timed(self, began: float, answered: float) -> None:
        self.seconds = min(self.seconds, answered - began)


def due(left: int, got: int, since: float, latency: Latency, now: float | None = None) -> bool:
    """Whether the next request should go out now: ``got`` bytes of the current answer arrived
    since its head came at ``since``, ``left`` are still to come, and at that rate they would take
    no more than :data:`AHEAD` latencies. The rate counts from the answer's head, so bytes that
    waited in the socket (an early answer whose place was not free) do not make the flow look
    faster. Never where the latency is under :data:`MIN_SHARE` of the chunk's time."""
    if not left or got < MIN_TIMED or latency.seconds == math.inf:
        return False
    now = time.monotonic() if now is None else now
    rate = got / max(1e-6, now - since)
    if latency.seconds * rate < MIN_SHARE * (got + left):
        return False
    return left <= AHEAD * latency.seconds * rate


class EarlyRequest(Generic[T]):
    """A request made on a thread of its own while its worker still receives its current answer;
    :meth:`take` hands the answered request over on the worker's thread.

    Args:
        make: sends the request and returns it once answered (its head in), or raises.
        close: drops an answered request nobody will read.
        name: the thread's name.
    """

    def __init__(self, make: Callable[[], T], close: Callable[[T], None], name: str):
        self._make, self._close = make, close
        self._answer: T | None = None
        self._error: BaseException | None = None
        self._discarded = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            answer = self._make()
        except BaseException as error:  # raised by take(), on the worker's thread
            self._error = error
            return
        with self._lock:
            self._answer = answer
            discarded = self._discarded
        if discarded:
            self._close(answer)

    def take(self) -> T:
        """The answered request; raises what making it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    def discard(self) -> None:
        """Drop the request now if it was answered, else as soon as it is (without waiting)."""
        with self._lock:
            self._discarded = True
            answer = self._answer
        if answer is not None:
            self._close(answer)
