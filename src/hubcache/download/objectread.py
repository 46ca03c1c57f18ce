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
from typing import TYPE_CHECKING, Any, Callable, cast

from ..core.errors import SourceChangedError
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
        return ParallelRanges(stream, size, chunk_size=object_chunk(self.chunk_size, self.connections), connections=self.connections, on_close=on_close)


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
    stream = _gcs_stream(versioned, pinned, url) if _can_stream(versioned) else _fetched(fetch)
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


class ParallelRanges(ChunkRing):
    """An object read in consecutive chunks by ``connections`` worker threads, each chunk one
    ranged read, handed out in order (the ring of ``download/ring.py``: at most ``connections x
    chunk_size`` bytes held).

    Args:
        stream: ``stream(start, end, sink)`` reads bytes ``[start, end)`` of the pinned version
            (one ranged request, called from the worker threads at once) and hands them to
            ``sink`` as they arrive; raises :class:`Transient` for a failure worth a retry.
        size: the version's byte count.
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
        self._ring_init(size, chunk_size, connections, first=0, name="hubcache-object")
        self._start_workers()

    def _fetch(self, k: int) -> None:
        start, last = self._span(k)
        slot = self._slots[k]
        failures = 0
        while start + slot.received <= last:
            at = start + slot.received

            def sink(data: bytes | memoryview) -> None:
                if start + slot.received + len(data) > last + 1:  # a pinned version cannot be longer
                    raise OSError(f"asked for bytes {at}-{last}, got more")
                self._deliver(k, data)

            if self._stop.is_set():
                raise Stopped
            try:
                self._stream(at, last + 1, sink)
                if start + slot.received <= last:
                    raise Transient(f"asked for bytes {at}-{last}, the answer ended at byte "
                                     f"{start + slot.received}")
            except Transient:
                failures += 1
                if not self._pause_before_retry(failures, CHUNK_RETRIES):
                    raise

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
    """Whether a gcsfs client has what :func:`_gcs_stream` uses (gcsfs 2024.12 to 2026.10 do)."""
    return all(hasattr(fs, name) for name in ("_set_session", "_get_headers", "_get_params", "url", "loop"))


def _gcs_stream(fs: Any, pinned: str, shown: str, past_end: bool = False) -> Stream:
    """A ``stream`` of ``bucket/key#generation`` through gcsfs's session (its credentials and
    endpoint), the body handed on as it arrives: ``_cat_file`` would hold each whole range, and
    its join, in memory at once (measured: 8 ranges of 8 MiB took a resolve's peak RSS from 106 to
    242 MiB). The media URL names the generation, so the service answers another with a 404.

    ``past_end``: a range that starts past the object's end (a 416) is an answer of no bytes (a
    copy checking an untrusted size), not an error."""
    import asyncio

    from fsspec.asyn import sync  # here: importing hubcache imports no fsspec

    url = fs.url(pinned)

    async def read(start: int, end: int, sink: Sink) -> None:
        import aiohttp

        await fs._set_session()
        headers = fs._get_headers({"Range": f"bytes={start}-{end - 1}"})
        try:
            async with fs.session.get(url=url, params=fs._get_params({}), headers=headers,
                                      timeout=getattr(fs, "requests_timeout", None)) as r:
                if r.status in (404, 410):
                    raise FileNotFoundError(f"{shown} (generation {pinned.rsplit('#', 1)[1]})")
                if r.status in (401, 403):
                    raise PermissionError(f"HTTP {r.status} reading {shown}")
                if r.status == 429 or r.status >= 500:
                    raise Transient(f"HTTP {r.status} reading {shown}")
                if r.status == 416 and past_end:
                    return
                if r.status != 206 and not (r.status == 200 and start == 0):  # 200: the whole object
                    raise OSError(f"HTTP {r.status} to the range {start}-{end - 1} of {shown}")
                while data := await r.content.read(RECEIVE):
                    sink(data)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise Transient(f"reading {shown}: {type(error).__name__}: {error}") from None

    def stream(start: int, end: int, sink: Sink) -> None:
        sync(fs.loop, read, start, end, sink)

    return stream


def object_stream(fs: Any, path: str, shown: str) -> Stream:
    """A :data:`Stream` of the object ``path`` on ``fs``, not pinned to a version (for readers that
    check what they read, as a copy between tiers checks sizes and CRC-32s), whose ranges may
    run past the object's end (fewer bytes then, none for a range starting past it)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if {"gs", "gcs"} & set(protocols) and _can_stream(fs):
        return _gcs_stream(fs, path, shown, past_end=True)

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


def object_chunk(chunk_size: int, connections: int) -> int:
    """The chunk of a parallel read of objects: ``chunk_size``, smaller if ``connections`` of it
    would exceed :data:`OBJECT_BUFFER` (see :func:`~hubcache.download.ring.fitted_chunk`)."""
    return fitted_chunk(chunk_size, connections, OBJECT_BUFFER)


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
