"""Open an fsspec object pinned to the version seen at open: one version for the whole read.

An fsspec file of an object store fetches the object in blocks, each block its own ranged request.
An object replaced between two blocks would hand downstream the start of one version and the rest
of another. A pinned object never does: a read that meets another version raises
:class:`SourceChangedError`, and the download starts again from byte 0 (``core/cache.py``).

How a version is pinned depends on what the service can enforce on every ranged request, and
fsspec has no common API for that (each service names a version its own way, and only some
filesystems send it), so :data:`_PINNERS` is a small table keyed by fsspec protocol:

* ``path#generation``: the filesystem reads one generation when its path names it (gcsfs, made
  version-aware). The service answers a request for a generation that is gone with a 404.
* the file pins itself: the filesystem's file sends the version it saw at open with every ranged
  request (s3fs: ``If-Match: <ETag>``, or the ``VersionId`` of a version-aware client) and the
  service answers another version with a 412 (s3fs raises ``FileExpired``).
* anything else: no server-side pin. The object's version key (fsspec's ``ukey``) is taken at
  open and compared again after each block and at the end of the read, before the download can be
  committed. Any change completed before the last block was fetched is caught; what is not caught
  is a filesystem whose ``ukey`` does not change with the bytes (an mtime-only key, two writes of
  the same size within the clock's resolution).

On the pinned kinds, an error while reading (the 404 or the 412) is told apart from an ordinary
failure by looking the object's version up once more: another version (or no object) is a change.

**In parallel.** An object of at least :data:`~hubcache.download.ring.MIN_CHUNKS` chunks, opened
with ``connections > 1``, is read by ``connections`` worker threads, each fetching one chunk of
``chunk_size`` bytes at a time with the same pinned ranged read the single stream makes (the
generation in the path, the file's own ``If-Match``/``VersionId``, or the file's ranged read with
the ``ukey`` checked by the reader), into the ring of ``download/ring.py``; the reader takes the
bytes in order, so the digest, decoder and extractor downstream still see one stream, and no copy
of the archive is written to disk. A version change met by any chunk raises the same
:class:`SourceChangedError`. Filesystems whose files have no ranged read (``_fetch_range``: the
local one) are read as one stream.
"""

from __future__ import annotations

import io
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from ..core.errors import SourceChangedError
from .ahead import PLACES_PER_CONNECTION, EarlyRequest, Latency, due
from .ring import MIN_CHUNKS, ChunkRing, Stopped, fitted_chunk

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Bytes an fsspec file fetches per ranged request.
BLOCK_SIZE = 1 << 22
#: Takes the bytes of a ranged read as they arrive.
Sink = Callable[["bytes | memoryview"], None]
#: ``stream(start, end, sink)``: one ranged read of bytes ``[start, end)``, handed to ``sink``.
Stream = Callable[[int, int, Sink], None]
#: The most bytes a parallel object read holds (its ring), whatever the settings ask: see
#: :meth:`_Reads.ranges`.
OBJECT_BUFFER = 32 << 20
#: Bytes per ranged read of a parallel read unless told (``HUBCACHE_CHUNK_SIZE``'s default; not
#: imported from ``core/config.py``, which this module sits below).
DEFAULT_CHUNK = 8 << 20
CHANGED_HINT = "try again once the object stops changing"


class PinnedObject(io.RawIOBase):
    """A readable stream of one version of an fsspec object.

    Attributes:
        size: the version's byte count, or ``None`` if the filesystem does not say.
        version: the version read (a generation, an ETag, a version id, or a ``ukey``).
        position: bytes read so far.

    Raises:
        SourceChangedError: (from reading) the object is no longer the version opened.
    """

    def __init__(self, url: str, fileobj: Any, version: str | None, current: Callable[[], str | None],
                 check_each_block: bool, block_size: int = BLOCK_SIZE):
        self.url = url
        self._f = fileobj
        self.size: int | None = getattr(fileobj, "size", None)
        self.version = version
        self._current = current
        self._check_each_block = check_each_block
        self._block_size = block_size
        self._checked_block = 0
        self._checked_end = False
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        try:
            if hasattr(self._f, "readinto"):
                n: int = self._f.readinto(buffer)
            else:
                view = cast("bytearray | memoryview", buffer)  # what io hands readinto
                data = self._f.read(len(view))
                n = len(data)
                view[:n] = data
        except OSError as error:
            # The pinned version is gone (a 404, a 412) or the read just failed: ask once more.
            self._raise_if_changed(f"reading from byte {self.position} failed ({_short(error)})",
                                   unknown_is_change=False)
            raise
        self.position += n
        if self._check_each_block:
            if n == 0 and not self._checked_end:
                self._checked_end = True
                self._raise_if_changed(f"at the end of the read ({self.position} bytes)")
            elif self.position // self._block_size > self._checked_block:
                self._checked_block = self.position // self._block_size
                self._raise_if_changed(f"after {self.position} bytes")
        return n

    def _raise_if_changed(self, when: str, unknown_is_change: bool = True) -> None:
        _raise_if_changed(self.url, self.version, self._current, when, unknown_is_change)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _raise_if_changed(url: str, version: str | None, current: Callable[[], str | None], when: str,
                      unknown_is_change: bool = True) -> None:
    """Raise :class:`SourceChangedError` if the object at ``url`` is no longer ``version``.

    Args:
        unknown_is_change: what a failing lookup means: raise its error (True), or return (False,
            for a caller that re-raises an error of its own).
    """
    try:
        now = current()
    except FileNotFoundError:
        raise SourceChangedError(f"{url} was deleted during the download ({when})",
                                 url=url, hint=CHANGED_HINT) from None
    except Exception:
        if unknown_is_change:
            raise
        return
    if now != version:
        raise SourceChangedError(
            f"{url} changed during the download: version {version} became {now} ({when})",
            url=url, hint=CHANGED_HINT)


def open_pinned(fs: Any, path: str, url: str, block_size: int = BLOCK_SIZE, *, connections: int = 1,
                chunk_size: int = DEFAULT_CHUNK) -> PinnedObject:
    """Open ``path`` on the fsspec filesystem ``fs``, pinned to the version it has now.

    Args:
        fs: an fsspec filesystem.
        path: the object's path on ``fs``.
        url: the URL as it may be shown (no credentials), for errors.
        block_size: bytes per ranged request of one stream.
        connections: ranged reads at once for an object of at least ``MIN_CHUNKS`` chunks
            (1: one stream).
        chunk_size: bytes per ranged read of a parallel read.

    Raises:
        FileNotFoundError: there is no such object.
        SourceChangedError: the object changed between looking its version up and opening it.
    """
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    pinner = next((_PINNERS[p] for p in protocols if p in _PINNERS), _checked)
    fs.invalidate_cache(path)  # a listing cached earlier may name an older version
    return pinner(fs, path, url, _Reads(block_size, connections, chunk_size))


class _Reads:
    """How to read an object: one stream of ``block_size`` blocks, or ``connections`` ranged reads
    of ``chunk_size`` at once if it is large enough."""

    def __init__(self, block_size: int, connections: int, chunk_size: int):
        self.block_size = block_size
        self.connections = connections
        self.chunk_size = chunk_size

    def parallel(self, size: int | None) -> bool:
        """Whether an object of ``size`` bytes is read in parallel (at least two chunks, as the
        setting sizes them: the ring may then use smaller ones)."""
        return self.connections > 1 and size is not None and size >= MIN_CHUNKS * self.chunk_size

    def ranges(self, stream: Stream, size: int,
               on_close: Callable[[], None] | None = None) -> ParallelRanges:
        # The ring holds at most OBJECT_BUFFER: with a cloud client's imports (gcsfs: 88 MiB of
        # RSS) a resolve must still fit in 150 MiB; chunks shrink to fit, connections stay.
        chunk = object_chunk(self.chunk_size, self.connections, isinstance(stream, OpeningStream))
        return ParallelRanges(stream, size, chunk_size=chunk, connections=self.connections, on_close=on_close)


def _fresh(fs: Any, path: str) -> dict[str, Any]:
    fs.invalidate_cache(path)
    info: dict[str, Any] = fs.info(path)  # fsspec is untyped: its info is a dict
    return info


def _path_generation(fs: Any, path: str, url: str, reads: _Reads) -> PinnedObject:
    """Read ``path#<generation>`` through a version-aware client: every ranged GET names the
    generation seen here (gcsfs sends it as the request's ``generation`` parameter, from its floor
    2024.12 on). The blocks are fetched with ``cat_file``, not through the filesystem's file,
    whose open would look the pinned version up again (three more metadata requests with gcsfs)."""
    bucket, key, _ = fs.split_path(path)
    info = fs.info(path)
    generation = info.get("generation")
    if not generation or "#" in key or "?" in key:  # no generation, or a key it cannot be added to
        return _checked(fs, path, url, reads)
    version = str(generation)
    versioned = fs if getattr(fs, "version_aware", False) else _version_aware_view(fs)
    pinned = f"{bucket}/{key}#{version}"

    def current() -> str | None:
        found = _fresh(fs, path).get("generation")
        return str(found) if found else None

    from fsspec.asyn import sync  # here: importing hubcache imports no fsspec

    def fetch(start: int, end: int) -> bytes:
        # The coroutine of the view itself: fsspec binds an instance's sync methods to it.
        data: bytes = sync(versioned.loop, versioned._cat_file, pinned, start=start, end=end)
        return data

    size = int(info["size"])
    # Streamed through the client's session where it has the parts of it this uses; else each
    # range read whole (more memory per range, the same pin).
    stream = _GcsStream(versioned, pinned, url) if _can_stream(versioned) else _fetched(fetch)
    blocks: _Blocks | ParallelRanges = (reads.ranges(stream, size) if reads.parallel(size)
                                        else _Blocks(fetch, size, reads.block_size))
    return PinnedObject(url, blocks, version, current, check_each_block=False, block_size=reads.block_size)


def _version_aware_view(fs: Any) -> Any:
    """``fs`` reading ``path#generation`` as that generation: the same client (its session and
    credentials), one attribute apart; only its coroutines (``_cat_file``) are to be used, its
    sync methods are still bound to ``fs``. A new instance made with ``version_aware=True`` would look
    its credentials up again: measured here, 3 s (gcsfs 2026.10) and 18 s (gcsfs 2024.12, its
    metadata-server probe) more on the first read of a process."""
    view = object.__new__(type(fs))
    view.__dict__.update(fs.__dict__)
    view.version_aware = True
    return view


class _Blocks:
    """An object read from start to end in ranged reads of ``block_size`` bytes.

    Args:
        fetch: reads bytes ``[start, end)`` of the object (one ranged request).
        size: the byte count the reads stop at.
    """

    def __init__(self, fetch: Callable[[int, int], bytes], size: int, block_size: int):
        self._fetch = fetch
        self.size = size
        self._block_size = block_size
        self._offset = 0  # where the next block starts
        self._block = memoryview(b"")

    def readinto(self, buffer: bytearray | memoryview) -> int:
        if not self._block and self._offset < self.size:
            end = min(self.size, self._offset + self._block_size)
            data = self._fetch(self._offset, end)
            if len(data) != end - self._offset:  # a pinned version cannot be shorter
                raise OSError(f"asked for bytes {self._offset}-{end - 1}, got {len(data)} bytes")
            self._offset = end
            self._block = memoryview(data)
        n = min(len(buffer), len(self._block))
        buffer[:n] = self._block[:n]
        self._block = self._block[n:]
        return n

    def close(self) -> None:
        self._block = memoryview(b"")


class Transient(OSError):
    """A ranged read failed in a way worth trying again (a cut connection, a 429, a 5xx)."""


#: A ranged read's body arrives in pieces of at most this many bytes (copied into the ring).
RECEIVE = 256 << 10
#: Tries of one chunk's ranged read after a transient failure (each resumes where it stopped).
CHUNK_RETRIES = 4


class Answer:
    """A ranged read whose answer's head is in (:meth:`OpeningStream.open`): :meth:`pump` reads
    its body to the end; until then the body waits in the connection.

    Attributes:
        answered: when its head arrived (``time.monotonic()``).
    """

    answered: float

    def pump(self, sink: Sink) -> None:
        """Hand the body to ``sink`` as it arrives, to its end (:class:`Transient` on a cut)."""
        raise NotImplementedError

    def discard(self) -> None:
        """Drop the answer without reading (more of) it; harmless after :meth:`pump`."""
        raise NotImplementedError


class OpeningStream:
    """A :data:`Stream` that can also send its request and return once the answer's head is in
    (:meth:`open`), so a parallel read can send a worker's next request while its current answer
    still flows (``download/ahead.py``)."""

    def __call__(self, start: int, end: int, sink: Sink) -> None:
        answer = self.open(start, end)
        try:
            answer.pump(sink)
        finally:
            answer.discard()

    def open(self, start: int, end: int) -> Answer:
        """Request bytes ``[start, end)``; return once the answer's head is in."""
        raise NotImplementedError


class AheadRing(ChunkRing):
    """A ring whose chunks are ranged reads of object streams (a mixin of :class:`ChunkRing`).

    Where the stream is an :class:`OpeningStream`, each worker sends its next chunk's request a
    round trip before its current answer ends (``download/ahead.py``) and reads that answer once
    the current one is done; the ring then has two places per worker, so the early answer's
    place is free by then. Call :meth:`_ahead_init` from ``__init__``; the subclass says what
    each chunk reads (:meth:`_range_of`) and fetches with :meth:`_read_range`.
    """

    def _ahead_init(self) -> None:
        self._early: dict[int, EarlyRequest[Answer]] = {}  # chunk -> its request made early
        self._early_lock = threading.Lock()
        self._latency = Latency()

    def _range_of(self, k: int) -> tuple[Stream, int, int]:
        """Chunk ``k``'s stream and the range ``[start, end)`` still to read of it."""
        raise NotImplementedError

    def _read_range(self, k: int, sink: Sink, next_claim: list[int | None]) -> None:
        """One read of what is left of chunk ``k`` into ``sink``.

        ``next_claim`` holds the chunk this worker claimed early (``[k2]``, or ``[None]`` if
        there was none to claim), once it tried: once per chunk, over its retries too.

        Raises:
            Transient: a failure worth another try (of the rest of the chunk).
        """
        stream, start, end = self._range_of(k)
        with self._early_lock:
            early = self._early.pop(k, None)
        if not isinstance(stream, OpeningStream):
            stream(start, end, sink)
            return
        answer = early.take() if early is not None else self._open_timed(stream, start, end)
        try:
            self._await_place(k)
            got = 0

            def counted(data: bytes | memoryview) -> None:
                nonlocal got
                sink(data)
                got += len(data)
                if not next_claim and due(end - start - got, got, answer.answered, self._latency):
                    claimed = self._claim_early()
                    next_claim.append(claimed)
                    if claimed is not None:
                        self._open_early(claimed)

            answer.pump(counted)
        finally:
            answer.discard()

    def _open_timed(self, stream: OpeningStream, start: int, end: int) -> Answer:
        began = time.monotonic()
        answer = stream.open(start, end)
        self._latency.timed(began, answer.answered)
        return answer

    def _open_early(self, k: int) -> None:
        stream, start, end = self._range_of(k)
        if isinstance(stream, OpeningStream):
            request: EarlyRequest[Answer] = EarlyRequest(lambda: self._open_timed(stream, start, end),
                                                         lambda answer: answer.discard(),
                                                         name=f"hubcache-object-ahead-{k}")
            with self._early_lock:
                halted = self._stopping  # after _on_halt dropped the others: drop this one too
                if not halted:
                    self._early[k] = request
            if halted:
                request.discard()

    def _on_halt(self) -> None:
        with self._early_lock:
            early, self._early = list(self._early.values()), {}
        for request in early:
            request.discard()


def ahead_places(stream_opens: bool) -> int:
    """The ring's places per worker: :data:`~hubcache.download.ahead.PLACES_PER_CONNECTION` where
    requests go out early (see :class:`AheadRing`), else one."""
    return PLACES_PER_CONNECTION if stream_opens else 1


class ParallelRanges(AheadRing):
    """An object read in consecutive chunks by ``connections`` worker threads, each chunk one
    ranged read, handed out in order (the ring of ``download/ring.py``: at most ``places x
    chunk_size`` bytes held, two places per connection where requests go out early).

    Args:
        stream: ``stream(start, end, sink)`` reads bytes ``[start, end)`` of the pinned version
            (one ranged request, called from the worker threads at once) and hands them to
            ``sink`` as they arrive; raises :class:`Transient` for a failure worth a retry. An
            :class:`OpeningStream` has each worker's next request sent early.
        size: the version's byte count.
        chunk_size: bytes per chunk.
        connections: the worker threads.
        on_close: called once the workers stopped (closes the file the reads belong to).

    Attributes:
        size: the byte count.
        connections: the worker threads.
    """

    def __init__(self, stream: Stream, size: int, *,
                 chunk_size: int, connections: int, on_close: Callable[[], None] | None = None):
        self._stream = stream
        self.size = size
        self.connections = connections
        self._on_close = on_close
        self._closed = False
        self._ahead_init()
        places = ahead_places(isinstance(stream, OpeningStream)) * connections
        self._ring_init(size, chunk_size, places, first=0, name="hubcache-object", workers=connections)
        self._start_workers()

    def _range_of(self, k: int) -> tuple[Stream, int, int]:
        start, last = self._span(k)
        return self._stream, start + self._slots[k].received, last + 1

    def _fetch(self, k: int) -> int | None:
        start, last = self._span(k)
        slot = self._slots[k]
        failures = 0
        next_claim: list[int | None] = []
        while start + slot.received <= last:
            at = start + slot.received

            def sink(data: bytes | memoryview) -> None:
                if start + slot.received + len(data) > last + 1:  # a pinned version cannot be longer
                    raise OSError(f"asked for bytes {at}-{last}, got more")
                self._deliver(k, data)

            if self._stop.is_set():
                raise Stopped
            try:
                self._read_range(k, sink, next_claim)
                if start + slot.received <= last:
                    raise Transient(f"asked for bytes {at}-{last}, the answer ended at byte "
                                     f"{start + slot.received}")
            except Transient:
                failures += 1
                if not self._pause_before_retry(failures, CHUNK_RETRIES):
                    raise
        return next_claim[0] if next_claim else None

    def readinto(self, buffer: bytearray | memoryview) -> int:
        return self._next_into(memoryview(buffer).cast("B"))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shut_down()
            if self._on_close is not None:
                self._on_close()


def _fetched(fetch: Callable[[int, int], bytes]) -> Stream:
    """A ``stream`` of a filesystem that reads a range whole (``fetch(start, end) -> bytes``)."""

    def stream(start: int, end: int, sink: Sink) -> None:
        data = fetch(start, end)
        if len(data) != end - start:  # a pinned version cannot be shorter, nor longer
            raise OSError(f"asked for bytes {start}-{end - 1}, got {len(data)} bytes")
        view = memoryview(data)
        for at in range(0, len(view), RECEIVE):
            sink(view[at:at + RECEIVE])

    return stream


def _can_stream(fs: Any) -> bool:
    """Whether a gcsfs client has what :class:`_GcsStream` uses (gcsfs 2024.12 to 2026.10 do)."""
    return all(hasattr(fs, name) for name in ("_set_session", "_get_headers", "_get_params", "url", "loop"))


class _GcsStream(OpeningStream):
    """A ``stream`` of ``bucket/key#generation`` through gcsfs's session (its credentials and
    endpoint), the body handed on as it arrives: ``_cat_file`` would hold each whole range, and
    its join, in memory at once (measured: 8 ranges of 8 MiB took a resolve's peak RSS from 106 to
    242 MiB). The media URL names the generation, so the service answers another with a 404.

    ``past_end``: a range that starts past the object's end (a 416) is an answer of no bytes (a
    copy checking an untrusted size), not an error."""

    def __init__(self, fs: Any, pinned: str, shown: str, past_end: bool = False):
        self._fs, self._pinned, self._shown, self._past_end = fs, pinned, shown, past_end
        self._url = fs.url(pinned)

    def open(self, start: int, end: int) -> Answer:
        from fsspec.asyn import sync  # here: importing hubcache imports no fsspec

        response = sync(self._fs.loop, self._request, start, end)
        return _GcsAnswer(self._fs.loop, response, self._shown)

    async def _request(self, start: int, end: int) -> Any:
        import asyncio

        import aiohttp

        fs, shown = self._fs, self._shown
        await fs._set_session()
        headers = fs._get_headers({"Range": f"bytes={start}-{end - 1}"})
        try:
            response = await fs.session.get(url=self._url, params=fs._get_params({}), headers=headers,
                                            timeout=getattr(fs, "requests_timeout", None))
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise Transient(f"reading {shown}: {type(error).__name__}: {error}") from None
        status = response.status
        if status == 200 and start == 0 or status == 206:  # 200: the whole object
            return response
        response.release()
        if status in (404, 410):
            raise FileNotFoundError(f"{shown} (generation {self._pinned.rsplit('#', 1)[1]})")
        if status in (401, 403):
            raise PermissionError(f"HTTP {status} reading {shown}")
        if status == 429 or status >= 500:
            raise Transient(f"HTTP {status} reading {shown}")
        if status == 416 and self._past_end:
            return None
        raise OSError(f"HTTP {status} to the range {start}-{end - 1} of {shown}")


class _GcsAnswer(Answer):
    """A gcsfs (aiohttp) answer whose body is read on the client's event loop."""

    def __init__(self, loop: Any, response: Any, shown: str):
        self._loop, self._response, self._shown = loop, response, shown
        self.answered = time.monotonic()

    def pump(self, sink: Sink) -> None:
        from fsspec.asyn import sync

        if self._response is not None:
            sync(self._loop, self._read, sink)

    async def _read(self, sink: Sink) -> None:
        import asyncio

        import aiohttp

        response, self._response = self._response, None
        try:
            while data := await response.content.read(RECEIVE):
                sink(data)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise Transient(f"reading {self._shown}: {type(error).__name__}: {error}") from None
        finally:
            response.release()  # read to its end, its connection goes back to the pool; else closed

    def discard(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            # On the loop's own thread (aiohttp is not thread-safe); an unread body: the
            # connection is dropped.
            self._loop.call_soon_threadsafe(response.close)


def object_stream(fs: Any, path: str, shown: str) -> Stream:
    """A :data:`Stream` of the object ``path`` on ``fs``, not pinned to a version (for readers that
    check what they read, as a copy between tiers checks sizes and CRC-32s), whose ranges may
    run past the object's end (fewer bytes then, none for a range starting past it)."""
    if opens_early(fs):
        return _GcsStream(fs, path, shown, past_end=True)

    def stream(start: int, end: int, sink: Sink) -> None:
        try:
            data = fs.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception:
            fs.invalidate_cache(path)
            if int(fs.info(path).get("size") or 0) > start:
                raise
            return  # a range past the end (S3 and GCS answer it with a 416)
        view = memoryview(data)
        for at in range(0, len(view), RECEIVE):
            sink(view[at:at + RECEIVE])

    return stream


def object_chunk(chunk_size: int, connections: int, ahead: bool = False) -> int:
    """The chunk of a parallel read of objects: ``chunk_size``, smaller if the ring's places
    (``connections``, twice as many with requests sent ``ahead``) of it would exceed
    :data:`OBJECT_BUFFER` (see :func:`~hubcache.download.ring.fitted_chunk`)."""
    return fitted_chunk(chunk_size, ahead_places(ahead) * connections, OBJECT_BUFFER)


def opens_early(fs: Any) -> bool:
    """Whether :func:`object_stream` of ``fs`` is an :class:`OpeningStream` (its reads in
    parallel send each worker's next request early)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"gs", "gcs"} & set(protocols)) and _can_stream(fs)


def _file_pins_itself(fs: Any, path: str, url: str, reads: _Reads) -> PinnedObject:
    """The filesystem's file sends the version of the info it takes at open with each ranged
    request (s3fs: ``If-Match`` with the ETag, or the ``VersionId``); fall back to checking when
    that info has neither. In parallel, the workers call that file's own ranged read, which sends
    the same pin."""
    f = fs.open(path, "rb", block_size=reads.block_size)
    details = getattr(f, "details", None) or {}
    version = details.get("VersionId") or details.get("ETag")
    if not version:
        f.close()
        return _checked(fs, path, url, reads)
    key = "VersionId" if details.get("VersionId") else "ETag"

    def current() -> str | None:
        return _fresh(fs, path).get(key)

    return PinnedObject(url, _maybe_parallel(f, reads), version, current, check_each_block=False,
                        block_size=reads.block_size)


def _maybe_parallel(f: Any, reads: _Reads) -> Any:
    """``f`` itself, or its ranged reads (``_fetch_range``: every buffered fsspec file has it, each
    call one ranged request of the version the file opened) in parallel."""
    size = getattr(f, "size", None)
    fetch = getattr(f, "_fetch_range", None)
    if fetch is None or not isinstance(size, int) or not reads.parallel(size):
        return f
    return reads.ranges(_fetched(fetch), size, on_close=f.close)


def _checked(fs: Any, path: str, url: str, reads: _Reads) -> PinnedObject:
    """No server-side pin: compare the object's ``ukey`` at open, after each block and at the end."""

    def current() -> str | None:
        fs.invalidate_cache(path)
        return str(fs.ukey(path))

    try:
        version = current()
    except FileNotFoundError:
        raise
    except Exception:  # a filesystem that can name no version (no info/ls): nothing to compare
        f = fs.open(path, "rb", block_size=reads.block_size)
        return PinnedObject(url, f, None, current, check_each_block=False, block_size=reads.block_size)
    f = fs.open(path, "rb", block_size=reads.block_size)
    # In parallel, chunks are fetched ahead of the reader's checks; the check at the end still
    # follows the last fetch.
    return PinnedObject(url, _maybe_parallel(f, reads), version, current, check_each_block=True,
                        block_size=reads.block_size)


#: How each object store's reads are pinned, by fsspec protocol. A table because fsspec has no
#: common API for a version-pinned ranged read: each service names a version its own way, and
#: only some filesystems send it. Protocols not here get :func:`_checked`.
_PINNERS: dict[str, Callable[[Any, str, str, _Reads], PinnedObject]] = {
    "gs": _path_generation, "gcs": _path_generation,
    "s3": _file_pins_itself, "s3a": _file_pins_itself,
}


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "…"
