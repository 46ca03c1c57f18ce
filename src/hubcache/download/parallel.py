"""Parallel ranged downloads over http(s): several connections, one ordered stream.

One TCP flow rarely gets a real link's bandwidth (CDNs and object stores cap each connection, a
long round trip caps the window), so an object that allows it is fetched over several
connections at once, in consecutive chunks, and handed to the reader in order: the digest,
decoder and extractor downstream still see one stream and still work while bytes arrive, and
no copy of the archive is ever written to disk.

When. The first answer (the plain GET that :class:`~hubcache.download.fetch.HttpSource` makes, as for
one stream) must be a 200 announcing ``Accept-Ranges: bytes``, with a Content-Length and a
validator (a strong ``ETag``, else ``Last-Modified``), for an object of at least
:data:`MIN_CHUNKS` chunks. Anything else is read as one stream, as before.

Only when the network is what limits. The reader first reads :data:`PROBE_BYTES` of chunk 0
from that first answer (never more than the chunk) as fast as it arrives (the pipeline's
buffers take the first megabytes without waiting for the decoder) and times its reads: that is
the rate of one flow. Slower than :data:`ONE_FLOW_ENOUGH`, the link is what limits and the
workers start; faster, one flow already outruns the decoder (a fast LAN, loopback), more
connections would only add work, and the first answer is read to its end as one stream
(measured, 949 MiB .tar.gz from loopback: 8 connections 4.8-6.5 s, one stream 4.0-4.9 s).

How. The reader reads chunk 0 from that first answer itself; the answer is then closed (its
connection dropped) and the rest comes from ``connections`` worker threads, each fetching one
chunk at a time with ``Range: bytes=START-END`` and ``If-Range`` (the first answer's
validator), into its place in a ring allocated once (:data:`~hubcache.download.ahead.PLACES_PER_CONNECTION` places per
connection, an anonymous mapping). A chunk's place is filled only while the chunk is less than
the reader's chunk plus the places: the bytes held, received but not yet read, are at most
``places x chunk_size`` however slowly the reader reads (the chunks shrink so that is never more
than :data:`HTTP_BUFFER`, 64 MiB: 8 connections use 4 MiB chunks), and reads copy them out of
the ring (a cold 1 GiB resolve peaked at 110-137 MiB of RSS at 8 and 16 connections, one
stream at 34-45).

A round trip ahead. Each request waits a round trip (and the origin's time to answer) for its
first byte. So that a connection does not spend that wait idle once per chunk, a worker asks
for its next chunk while its current answer still flows: when the bytes left would take
:data:`~hubcache.download.ahead.AHEAD` request latencies at the answer's rate (the latency: the
shortest time a chunk's request has taken to be answered; never where it is under a tenth of the
chunk's time, see ``download/ahead.py``), on a second connection of its own, and takes that
answer once the current one ends. The next answer starts flowing about when the current one stops, so
the download does not use more than ``connections`` flows' share of the link, though up to twice
as many sockets are open at moments. The second place per connection is what lets that early
answer be taken at once: its chunk's place was read a round of chunks before.

The same object, or a restart. Every chunk's answer must be a 206 with the first answer's
validator and a ``Content-Range`` of exactly the bytes asked for and the same total, and a
Content-Length (if any) of exactly that many bytes; a body without a Content-Length must end
where its range does. A different validator, a 416, or a 200 with another validator means the
object changed: :class:`~hubcache.core.errors.SourceChangedError`, and the download starts
again from byte 0 (``core/cache.py``), in parallel again. A wrong answer for the same version (a
range not the one asked for, another total, a 200 with the same validator: the origin ignored
the range) is a :class:`RangeAnswerError`, a ``SourceChangedError`` whose restart uses one
stream, since such an origin would answer the next range requests wrongly too.

Failures. Each chunk retries and resumes on its own, as one stream does (transient errors, a
connection cut mid-chunk: ``Range: bytes=POSITION-END`` with the same checks), with the
configured number of retries per chunk and the download's one deadline. An origin that limits
connections answers the extra ones 429 or 503: a worker refused twice in a row for one chunk
(or once with no retry left), while another worker is left, hands the chunk back (another goes
on from the bytes received) and stops, so the download continues over fewer connections instead of failing; the last
worker retries as one stream would. Retry events are handed to ``on_retry`` on the reading
thread (with the absolute offset). The first error that is not retried stops every worker and
is raised by the next read.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from ..core.config import DEFAULT_CHUNK_SIZE, DEFAULT_CONNECTIONS
from ..core.errors import SourceChangedError
from ..core.handles import origin_of
from .ahead import PLACES_PER_CONNECTION, EarlyRequest, Latency, due
from .fetch import (
    RETRY_STATUS,
    HttpSource,
    Source,
    _content_range,
    _discard_response,
    _length,
    readinto_by_read,
)
from .ring import MIN_CHUNKS, ChunkRing, Leave, Stopped, fitted_chunk

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_CONNECTIONS", "MIN_CHUNKS", "ParallelSource", "RangeAnswerError",
           "parallel_source"]

if TYPE_CHECKING:
    import urllib3
    from _typeshed import WriteableBuffer

    from .fetch import Deadline

#: The most bytes the ring of one download holds, whatever the settings ask: with more places
#: than ``HTTP_BUFFER / chunk_size`` chunks shrink to fit (measured, 949 MiB .tar.gz at 16
#: connections of 8 MiB: peak RSS 172 MiB; the ring is the difference), so a cold resolve stays
#: within 150 MiB at any connection count.
HTTP_BUFFER = 64 << 20
#: Bytes of chunk 0 the reader reads from the first answer before it decides whether to go
#: parallel (a probe at 32 MB/s takes 66 ms); 0: no probe, parallel from the start.
PROBE_BYTES = 2 << 20
#: A flow at least this fast (bytes per second) is read alone: it outruns the decoder
#: (measured here: a cold .tar.gz resolve takes its archive at about 270 MB/s; one loopback flow
#: gave 450-700 MB/s), so more connections could not make the download faster.
ONE_FLOW_ENOUGH = 250e6
#: Bytes a worker receives at a time before copying them into the ring: each worker's transient
#: buffers (urllib3's and http.client's) are a few times this.
RECEIVE = 256 << 10


class RangeAnswerError(SourceChangedError):
    """The origin answered a chunk's range request wrongly for the same version of the object (a
    range not the one asked for, another total, more bytes than the range, the whole object).

    The download starts again from byte 0, as for any :class:`SourceChangedError`, but as one
    stream: an origin that answers ranges wrongly would do it again.
    """


class _Retire(Leave):
    """The origin refused this connection's request twice in a row (429/503), or once with no
    retry left, while others work:
    the worker hands its chunk back and leaves, so the download goes on with one fewer."""


def parallel_source(first: Source, url: str, *, connections: int = DEFAULT_CONNECTIONS,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, timeout: float = 60.0, retries: int = 4,
                    on_retry: Callable[[int, str, int], None] | None = None,
                    deadline: Deadline | None = None) -> Source:
    """``first`` itself, or a :class:`ParallelSource` reading the same object from its first
    answer and ``connections`` ranged connections (see the module's docstring for when).

    Args:
        first: the opened source (``fetch.open_source``); only an :class:`HttpSource` whose first
            answer allows it becomes parallel.
        url: the URL, credentials included (chunk requests send them as ``first`` does).
        connections: how many connections at most (1: ``first`` as it is).
        chunk_size: bytes per range request.
        timeout, retries, deadline: as for ``fetch.open_source`` (retries: each chunk's own).
        on_retry: called with ``(attempt, error, offset)`` for each retry of a chunk, on the
            thread that reads the source.
    """
    if not isinstance(first, HttpSource):
        return first
    total = first.total
    validator = first._validator
    chunk_size = fitted_chunk(chunk_size, PLACES_PER_CONNECTION * connections, HTTP_BUFFER)
    if (connections <= 1 or not first.ranges or total is None or validator is None
            or total < MIN_CHUNKS * chunk_size):
        return first
    try:
        return ParallelSource(first, url, connections=connections, chunk_size=chunk_size, timeout=timeout,
                              retries=retries, on_retry=on_retry, deadline=deadline)
    except BaseException:
        first.close()
        raise


class ParallelSource(Source, ChunkRing):
    """An http(s) object read over several ranged connections, handed out in order.

    Build it with :func:`parallel_source`. ``read`` returns the bytes in order; closing stops the
    workers and drops their connections. The ring and its workers are ``download/ring.py``'s.

    Attributes:
        connections: the number of worker connections.
        chunk_size: bytes per range request.
        buffered: bytes received and not yet read.
        peak_buffered: the most bytes ever held at once (at most
            ``PLACES_PER_CONNECTION x connections x chunk_size``).
    """

    def __init__(self, first: HttpSource, url: str, *, connections: int, chunk_size: int, timeout: float,
                 retries: int, on_retry: Callable[[int, str, int], None] | None, deadline: Deadline | None):
        assert first.total is not None and first._validator is not None
        self.url, self.final_url, self.total = first.url, first.final_url, first.total
        self.connections = connections
        self.etag, self.modified, self.validator = first._etag, first._modified, first._validator
        self._first_answer = first
        self._url = url
        # Chunks ask the URL the first answer came from (no redirect to follow each time); if
        # that stops working (a signed redirect target expires), they go back to the original.
        self._origin_target = first._target
        self.direct: str | None = first._resolved if first._resolved != first._target else None
        self._timeout, self._retries, self._deadline = timeout, retries, deadline
        self._live: set[_Chunk] = set()
        self._openers: dict[int, EarlyRequest[_Chunk]] = {}  # chunk -> its request made early by its worker
        self._latency = Latency()  # the shortest time a chunk's request took to be answered
        # Chunk 0 is the first answer's, read by the reader itself; workers fetch 1 on, once the
        # probe has shown that the link limits (see :meth:`_probed`).
        self._ring_init(self.total, chunk_size, PLACES_PER_CONNECTION * connections, first=1,
                        name="hubcache-range", on_retry=on_retry, workers=connections)
        #: "probe" (reading the first PROBE_BYTES), "parallel" (workers started) or "single" (the
        #: first answer is read to its end, no worker ever started)
        self.mode = "probe"
        self._probe_end = min(PROBE_BYTES, self._span(0)[1] + 1)
        self._probe_waited = 0.0  # seconds the probe's reads took
        if self._probe_end <= 0:  # no probe: parallel from the start
            self.mode = "parallel"
            self._start_workers()

    # -- the workers ------------------------------------------------------------------------------

    def _fetch(self, k: int) -> int | None:
        opener = self._openers.pop(k, None)
        try:
            chunk = opener.take() if opener is not None else self._open(k)
        except _Retire:
            self._hand_back(k)
            raise
        early: int | None = None
        try:
            self._await_place(k)
            _, end = self._span(k)
            left = end - chunk._start + 1
            # The rate so far counts from the answer's head: bytes that waited in the socket
            # (an early answer, before its place was free) do not make the flow look faster.
            began, got, ahead = chunk.answered, 0, True
            while left:
                data = chunk.read(min(RECEIVE, left))
                if not 0 < len(data) <= left:  # HttpSource.read cannot do this: a guard of the ring
                    raise chunk._fail(f"a read of {min(RECEIVE, left)} bytes returned {len(data)}")
                self._deliver(k, data)
                left -= len(data)
                got += len(data)
                # A round trip before this chunk ends, the next one's request goes out: its
                # first byte arrives about when this one's last does (once per chunk).
                if ahead and due(left, got, began, self._latency):
                    ahead = False
                    early = self._claim_early()
                    if early is not None:
                        self._openers[early] = self._open_early(early)
            chunk.finish()
        except BaseException as error:
            if early is not None:
                self._drop_early(early, handed_back=isinstance(error, _Retire))
                early = None
            if isinstance(error, _Retire):
                self._hand_back(k)
            raise
        finally:
            with self._readable:
                self._live.discard(chunk)
            chunk.close()
        return early

    def _open(self, k: int) -> _Chunk:
        """Request chunk ``k`` (from the bytes already received of it) and wait for the answer's
        head; the time that took is the request latency the next requests are sent ahead by."""
        start, end = self._span(k)
        start += self._slots[k].received  # a chunk handed back goes on from the bytes received
        began = time.monotonic()
        chunk = _Chunk(self, start, end, timeout=self._timeout, retries=self._retries, deadline=self._deadline)
        chunk.answered = time.monotonic()
        if chunk._attempts == 1:  # a retried request's time is not a round trip
            self._latency.timed(began, chunk.answered)
        return chunk

    def _open_early(self, k: int) -> EarlyRequest[_Chunk]:
        """Request chunk ``k`` on a thread of its own, while this worker still receives its
        current chunk."""
        return EarlyRequest(lambda: self._open(k), self._close_early, name=f"hubcache-range-ahead-{k}")

    def _close_early(self, chunk: _Chunk) -> None:
        with self._readable:
            self._live.discard(chunk)
        chunk.close()

    def _drop_early(self, k: int, handed_back: bool) -> None:
        """Abandon the request made early for chunk ``k`` (its worker failed or leaves); the chunk
        is handed back for another worker if this worker leaves while the others go on."""
        opener = self._openers.pop(k, None)
        if opener is not None:
            opener.discard()
        if handed_back:
            self._hand_back(k)

    def _enter(self, chunk: _Chunk) -> None:
        """A chunk is about to make a request: it can be cut from now on."""
        with self._readable:
            if self._stopping:
                raise Stopped
            self._live.add(chunk)

    def _on_halt(self) -> None:
        """Live connections are shut down: a blocked read or request returns."""
        with self._readable:
            live = list(self._live)
        for chunk in live:
            chunk.abort()

    # -- the reader -------------------------------------------------------------------------------

    def readinto(self, buffer: WriteableBuffer) -> int:
        return readinto_by_read(self, buffer)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        if self.mode == "single":
            data = self._first_answer.read(size)
            self.position += len(data)
            return data
        if self._notices or self._error is not None:
            self._report()
        if self.mode == "probe":
            return self._probe(min(size, self._probe_end - self.position))
        if self._head == 0:  # chunk 0: straight from the first answer, on this thread
            _, end = self._span(0)
            if self.position <= end:
                head = self._first_answer.read(min(size, end + 1 - self.position))
                if not head:  # HttpSource raises on an early end; this is a guard, not a path
                    raise self._first_answer._fail(f"the first answer ended at byte {self.position}")
                self.position += len(head)
                return head
            self._first_answer.cut()  # the rest of it comes over the ranged connections
            self._advance(1)
        data = self._next_piece(size)
        self.position += len(data)
        return data

    def _probe(self, size: int) -> bytes:
        """Read from the first answer, timing the reads; at the probe's end, start the workers
        if the flow was slower than :data:`ONE_FLOW_ENOUGH`, else go on as one stream."""
        began = time.monotonic()
        head = self._first_answer.read(size)
        self._probe_waited += time.monotonic() - began
        if not head:  # HttpSource raises on an early end; this is a guard, not a path
            raise self._first_answer._fail(f"the first answer ended at byte {self.position}")
        self.position += len(head)
        if self.position >= self._probe_end:
            if self.position < ONE_FLOW_ENOUGH * self._probe_waited:
                self.mode = "parallel"
                self._start_workers()
            else:
                self.mode = "single"
        return head

    def close(self) -> None:
        if not self.closed:
            self._halt()
            self._first_answer.cut()
            self._shut_down()  # their connections are shut down: they leave at once
            for opener in list(self._openers.values()):
                opener.discard()
            self._openers.clear()
        super().close()


class _Chunk(HttpSource):
    """One chunk's ranged GET: resumed within its range and retried as one stream is, and
    accepted only if it is exactly the bytes asked for, of the same version of the object."""

    def __init__(self, owner: ParallelSource, start: int, end: int, *, timeout: float, retries: int,
                 deadline: Deadline | None):
        self._owner = owner
        self._start, self._end = start, end
        self._framed = True  # the latest answer has a Content-Length
        self._refusals = 0  # 429s and 503s in a row
        self.answered = 0.0  # when the answer's head arrived (set by ParallelSource._open)
        try:
            super().__init__(owner._url, timeout=timeout, retries=retries, deadline=deadline,
                             on_retry=lambda attempt, error, offset: owner._notice(
                                 attempt, f"{error} (bytes {start}-{end})", start + offset))
        except BaseException:
            with owner._readable:
                owner._live.discard(self)
            raise

    def _where(self) -> str:
        return (f"GET {self.url} bytes {self._start}-{self._end}, {self._attempts} "
                f"attempt{'s' if self._attempts != 1 else ''}")

    def _sleep(self, seconds: float) -> None:
        if self._owner._stop.wait(seconds):
            raise Stopped

    def _range_error(self, message: str, response: urllib3.BaseHTTPResponse | None = None) -> RangeAnswerError:
        if response is not None:
            _discard_response(response)
        return RangeAnswerError(f"the server's answer to a range request does not match it: {message} "
                                f"({self._where()})", url=self.url, attempts=self._attempts,
                                hint="the server answers range requests wrongly; set HUBCACHE_CONNECTIONS=1 "
                                     "to download it as one stream")

    def _request(self, offset: int) -> urllib3.BaseHTTPResponse:
        import urllib3

        owner = self._owner
        # The object's facts are the first answer's: every chunk and resume must match them.
        self._etag, self._modified, self._validator = owner.etag, owner.modified, owner.validator
        self.total = self._limit = self._end - self._start + 1
        owner._enter(self)
        first = self._start + offset
        while True:
            direct = owner.direct
            self._target = direct or owner._origin_target
            headers = dict(self._headers)
            if direct and origin_of(direct) != origin_of(owner._origin_target):
                headers.pop("Authorization", None)  # as a redirect to another host drops it
            headers["Range"] = f"bytes={first}-{self._end}"
            headers["If-Range"] = owner.validator
            self._check_deadline()
            self._attempts += 1
            try:
                response, url, hops = self._get(headers)
            except urllib3.exceptions.LocationValueError as error:
                raise self._fail(f"not a valid URL: {error}") from None
            except (urllib3.exceptions.HTTPError, OSError) as error:
                self._check_deadline()
                reason = getattr(error, "reason", None) or error
                self._wait_before_retry(f"cannot connect: {reason}", offset)
                continue
            status = response.status
            if status in RETRY_STATUS:
                _discard_response(response)
                refused = f"HTTP {status} {response.reason or ''}".rstrip()
                if status in (429, 503):
                    self._refusals += 1
                    if (self._refusals >= 2 or self._attempts > self._retries) and owner._may_retire():
                        owner._notice(self._attempts, f"{refused} (bytes {self._start}-{self._end}): "
                                      "going on with one connection fewer", first)
                        raise _Retire
                self._wait_before_retry(refused, offset, status)
                continue
            self._refusals = 0
            if direct and status in (401, 403, 404, 410):
                # The redirect target stopped answering (a signed URL expired): the original URL.
                _discard_response(response)
                owner.direct = None
                continue
            if status == 416:
                raise self._changed("the file changed on the server during the download (HTTP 416 to the "
                                    f"range {first}-{self._end})", response)
            if status not in (200, 206):
                _discard_response(response)
                raise self._fail(f"HTTP {status} {response.reason or ''}".rstrip(), status)
            self._go_live(response)
            self._check_chunk(response, first)
            return response

    def _check_chunk(self, response: urllib3.BaseHTTPResponse, first: int) -> None:
        """Accept the answer only if it is exactly bytes ``first``..end of the same version."""
        headers = response.headers
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        same = etag == self._etag if self._etag is not None else modified == self._modified
        if response.status == 200:
            if same:  # the origin ignored the range (If-Range matched: the same version)
                raise self._range_error(f"HTTP 200 (the whole file) to the range {first}-{self._end}", response)
            raise self._changed(f"the file changed on the server during the download (the range "
                                f"{first}-{self._end} was answered with the whole file, "
                                f"{'ETag ' + str(etag) if self._etag else 'Last-Modified ' + str(modified)})",
                                response)
        if not same:
            if self._etag is not None:
                raise self._changed(f"the file changed on the server during the download (ETag {self._etag} "
                                    f"became {etag or 'none'})", response)
            raise self._changed(f"the file changed on the server during the download (Last-Modified "
                                f"{self._modified} became {modified or 'none'})", response)
        announced = headers.get("Content-Range")
        expected = (first, self._end, self._owner.total)
        if _content_range(announced) != expected:
            raise self._range_error(f"its Content-Range is {announced!r}, not 'bytes {first}-{self._end}/"
                                    f"{self._owner.total}'", response)
        length = _length(response)
        self._framed = length is not None
        if length is not None and length != self._end - first + 1:
            raise self._range_error(f"its Content-Length {length} does not match the range {first}-{self._end}",
                                    response)
        if length is None and headers.get("Content-Length"):
            raise self._range_error(f"its Content-Length is {headers.get('Content-Length')!r}", response)

    def finish(self) -> None:
        """After the range's last byte: a body without a Content-Length must end there."""
        import urllib3

        if self._framed:
            return
        try:
            extra = self._response.read(1)
        except (urllib3.exceptions.HTTPError, OSError):
            return  # every byte of the range arrived; how the connection ends does not matter
        if extra:
            raise self._range_error(f"the server sent more bytes than the range {self._start}-{self._end}")

    def abort(self) -> None:
        """Shut the connection down from another thread: a blocked read or request returns."""
        from .fetch import _shutdown

        with self._guard:
            response, pending = self._live, self._pending
        if response is not None:
            _shutdown(getattr(response, "connection", None))
        _shutdown(pending)
