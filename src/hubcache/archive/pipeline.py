"""Overlap the stages of a download on several cores: digest and decompression in worker threads.

A cold resolve is a chain of CPU-heavy stages: receive, SHA-256, decompress, parse tar, CRC-32,
write. Most release the GIL (``hashlib``, ``zlib``, ISA-L, ``zstandard``, file writes), so
running the digest and the decoder in their own threads lets them proceed while the calling
thread unpacks and writes. The calling thread still reads the source itself, so retries,
progress events and every error surface where they did before, with the same exceptions.
Queues are bounded (a few chunks each): memory does not grow with the archive.
"""

from __future__ import annotations

import contextlib
import tarfile
import threading
from collections import deque
from typing import Callable, Iterator, cast

from ..core.crc import crc32_function as crc32_function  # noqa: F401 - re-exported: the extractor's CRC-32
from ..core.errors import UnsafeArchiveError
from .formats import CHUNK, DEPTH, PrefixedReader, Readable, open_decoder


class _Stop(Exception):
    """The consumer closed the pipeline: the worker leaves."""


class ThreadedDecoder:
    """A decoder running in a worker thread, fed with raw chunks by the thread that reads from it.

    ``read()`` first tops up the worker's input from ``raw`` (on the calling thread: network,
    digest, progress and retry events stay there), then returns decoded output as the worker
    produces it. Errors of the decoder are re-raised by ``read()`` as they were raised; errors of
    ``raw`` are raised by ``read()`` directly. :meth:`close` stops the worker (always call it).

    Args:
        head: bytes already read from ``raw`` (they come first).
        raw: the compressed stream.
        make_decoder: builds the decoder over a reader of the raw bytes (``formats.open_decoder``).
    """

    def __init__(self, head: bytes, raw: Readable, make_decoder: Callable[[Readable], Readable]):
        self._raw = raw
        self._cond = threading.Condition()
        self._inbox: deque[bytes] = deque([head] if head else [])
        self._outbox: deque[bytes | BaseException] = deque()
        self._raw_done = False
        self._closed = False
        self._finished = False
        self._pending = b""
        self._decoder = make_decoder(_Inbox(self))
        self._thread = threading.Thread(target=self._work, name="hubcache-decode", daemon=True)
        self._thread.start()

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                data = self._decoder.read(CHUNK)
                self._emit(data)
                if not data:
                    return
        except _Stop:
            return
        except BaseException as error:  # handed to the reader, which raises it
            with contextlib.suppress(_Stop):
                self._emit(error)

    def _emit(self, item: bytes | BaseException) -> None:
        with self._cond:
            while len(self._outbox) >= DEPTH and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Stop
            self._outbox.append(item)
            self._cond.notify_all()

    def _take_raw(self, size: int) -> bytes:
        with self._cond:
            while not self._inbox and not self._raw_done and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Stop
            if not self._inbox:
                return b""
            data = self._inbox.popleft()
            if 0 <= size < len(data):
                data, rest = data[:size], data[size:]
                self._inbox.appendleft(rest)
            self._cond.notify_all()
            return data

    # -- the reader ---------------------------------------------------------------------------

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = CHUNK
        while not self._pending:
            if self._finished:
                return b""
            item = self._next()
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            if not item:
                self._finished = True
                return b""
            self._pending = item
        if size >= len(self._pending):
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _next(self) -> bytes | BaseException:
        while True:
            with self._cond:
                feed = not self._raw_done and len(self._inbox) < DEPTH
                if not feed:
                    if self._outbox:
                        item = self._outbox.popleft()
                        self._cond.notify_all()
                        return item
                    self._cond.wait()
                    continue
            data = self._raw.read(CHUNK)  # outside the lock: the worker decodes meanwhile
            with self._cond:
                if data:
                    self._inbox.append(data)
                else:
                    self._raw_done = True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()


class _Inbox:
    """What the decoder reads: the raw chunks handed over by the reading thread."""

    def __init__(self, owner: ThreadedDecoder):
        self._owner = owner

    def read(self, size: int = -1) -> bytes:
        return self._owner._take_raw(size)


@contextlib.contextmanager
def decoding(fmt: str, head: bytes, raw: Readable) -> Iterator[Readable]:
    """A reader of the decoded bytes of ``head`` + ``raw``: a :class:`ThreadedDecoder` for the
    compressed formats (stopped when the block exits), the bytes themselves for plain tar."""
    if fmt == "tar":
        yield PrefixedReader(head, raw)
        return
    decoder = ThreadedDecoder(head, raw, lambda inbox: open_decoder(fmt, inbox))
    try:
        yield decoder
    finally:
        decoder.close()


#: Largest single header or metadata read (a pax header, a GNU long name or link): tarfile reads
#: each in one piece, so without this a 32 KiB archive could declare a 4 GiB pax header.
MAX_METADATA_READ = 1 << 20
#: Reads tarfile may make between two members (headers, extended headers, sparse map blocks):
#: a member needs a handful; chained extended headers would otherwise recurse without end.
MAX_READS_PER_MEMBER = 32
#: Decoded bytes that are not member data (headers, metadata, padding, skipped data) allowed:
#: a base, and more per member. Legitimate archives need about 1.5 KiB per member.
METADATA_BASE = 4 << 20
METADATA_PER_MEMBER = 16 << 10
#: Metadata records (newlines) tarfile may parse: parsing costs per record, about 1.4 µs each,
#: so a pax header of tiny records is a CPU bomb long before it is a memory one.
RECORDS_BASE = 1 << 16
RECORDS_PER_MEMBER = 64


class ForwardReader:
    """A forward-only stream that tarfile's ``r:`` mode can read (``tell``, forward ``seek``), and
    whose member data :meth:`chunks` hands out as the decoded chunks themselves.

    tarfile's own stream mode (``r|``) joins and slices its buffer on every read and copies
    again through ``extractfile``'s buffered reader: two to four copies of every byte, a large
    share of a cold resolve's CPU once decompression runs in its own thread.

    Everything tarfile reads itself (:meth:`read`, :meth:`seek`: headers, extended headers,
    padding, skipped data) is metadata, and bounded: at most :data:`MAX_METADATA_READ` bytes at
    once, :data:`MAX_READS_PER_MEMBER` reads between two members (call :meth:`member_done`
    after each), and in all :data:`METADATA_BASE` plus :data:`METADATA_PER_MEMBER` a member
    (bytes) and :data:`RECORDS_BASE` plus :data:`RECORDS_PER_MEMBER` a member (records). Member
    data goes through :meth:`chunks` and is counted by the caller against the size limit.

    Attributes:
        last_read: what the latest :meth:`read` returned: when tarfile stops, the header block
            it stopped at (512 zero bytes for the end-of-archive marker).
        metadata: decoded bytes read or skipped that were not member data.
    """

    def __init__(self, raw: Readable):
        self._raw = raw
        self._buf = b""
        self._off = 0
        self._pos = 0
        self.last_read = b""
        self.metadata = 0
        self._records = 0
        self._reads = 0
        self._members = 0

    def tell(self) -> int:
        return self._pos

    def _fill(self) -> bool:
        if self._off < len(self._buf):
            return True
        self._buf, self._off = self._raw.read(CHUNK), 0
        return bool(self._buf)

    def member_done(self) -> None:
        """A member was handed out: the next one may read its own headers."""
        self._reads = 0
        self._members += 1

    def _spend(self, size: int, what: str) -> None:
        self.metadata += size
        allowed = METADATA_BASE + METADATA_PER_MEMBER * self._members
        if self.metadata > allowed:
            raise UnsafeArchiveError(
                f"the archive holds more than {allowed} bytes of headers and metadata for "
                f"{self._members} members ({what}; a header bomb?)", member="")

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_METADATA_READ:
            raise UnsafeArchiveError(f"the archive has a header or metadata member of {size} bytes "
                                     f"(more than {MAX_METADATA_READ}; a header bomb?)", member="")
        self._reads += 1
        if self._reads > MAX_READS_PER_MEMBER:
            raise UnsafeArchiveError(f"the archive has more than {MAX_READS_PER_MEMBER} header blocks before "
                                     "one member (chained extended headers?)", member="")
        self._spend(size, "headers")
        parts, want = [], size
        while want and self._fill():
            take = min(want, len(self._buf) - self._off)
            parts.append(self._buf[self._off:self._off + take])
            self._off += take
            self._pos += take
            want -= take
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._records += data.count(b"\n")
        if self._records > RECORDS_BASE + RECORDS_PER_MEMBER * self._members:
            raise UnsafeArchiveError(f"the archive's extended headers hold more than "
                                     f"{RECORDS_BASE + RECORDS_PER_MEMBER * self._members} records for "
                                     f"{self._members} members (a header bomb?)", member="")
        self.last_read = data
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self._pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        skip = pos - self._pos
        self._spend(skip, "skipped data")
        while skip and self._fill():
            take = min(skip, len(self._buf) - self._off)
            self._off += take
            self._pos += take
            skip -= take
        return self._pos

    def chunks(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes as a series of chunks (a chunk is copied only when it is split).

        Raises:
            tarfile.ReadError: the stream ends first (as tarfile's own reader does).
        """
        while size:
            if not self._fill():
                raise tarfile.ReadError("unexpected end of data")
            take = min(size, len(self._buf) - self._off)
            if self._off == 0 and take == len(self._buf):
                data = self._buf
            else:
                data = self._buf[self._off:self._off + take]
            self._off += take
            self._pos += take
            size -= take
            yield data


def member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """The bytes of a regular (not sparse) member, from :meth:`ForwardReader.chunks`."""
    stream = cast(ForwardReader, tar.fileobj)  # the reader the tar was opened on (extract.py)
    stream.seek(member.offset_data)
    return stream.chunks(member.size)
