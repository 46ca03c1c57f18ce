"""Many objects of a store read at once, in ranges, and handed to one reader file by file in order.

A copy from a bucket tier (``core/tiers.py``) writes an entry's files one after another into the
target tier's writer, and checks each file's size and CRC-32 as it goes; over one connection
at a time that is one round trip per file and one flow's bandwidth. Here the files are cut into
ranges of at most ``chunk_size`` bytes (a small file is one range) and ``connections`` worker
threads fetch the ranges in order into the ring of ``download/ring.py``: several small files and
the ranges of a large one are in flight at once, each object's bytes are read once, the bytes
held are at most the ring (``connections x chunk_size``), and the reader still gets every file's
bytes in order, so the checks and the writer are as with one stream.

The sizes are the manifest's, i.e. untrusted claims: each file's last range asks for one byte
more than announced, so an object longer than its record is told (:class:`SizeMismatch`), and a
shorter one ends its last range early.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from .objectread import CHUNK_RETRIES, AheadRing, Transient, ahead_places
from .ring import Stopped

__all__ = ["ParallelFiles", "SizeMismatch"]

#: ``stream(start, end, sink)``: one ranged read of bytes ``[start, end)`` of one object, handed
#: to ``sink`` as they arrive (fewer at the object's end).
FileStream = Callable[[int, int, Callable[["bytes | memoryview"], None]], None]


class SizeMismatch(OSError):
    """An object's size is not its record's.

    Attributes:
        path: the file (as the caller named it).
        count: bytes found (at least this many when ``more``).
        more: the object is longer than ``count``.
        size: the record's size.
    """

    def __init__(self, path: str, count: int, more: bool, size: int):
        super().__init__(f"{path} has {'more than ' if more else ''}{count} bytes, but its manifest says {size}")
        self.path, self.count, self.more, self.size = path, count, more, size


class ParallelFiles(AheadRing):
    """The files ``[(path, size)]`` read by ``connections`` worker threads in ranges of at most
    ``chunk_size`` bytes; :meth:`file` hands out one file's bytes, in the files' order.

    Args:
        files: ``(path, size)`` pairs in the order they will be read.
        open_stream: ``open_stream(path)`` -> a :data:`FileStream` of that object (an
            :class:`~hubcache.download.objectread.OpeningStream`: each worker's next request is
            sent early, and the ring has two places per worker).
        chunk_size: most bytes per ranged read (and per place of the ring).
        connections: worker threads.
        ahead: whether ``open_stream`` gives :class:`~hubcache.download.objectread.OpeningStream`
            objects (the ring's places: two per worker).
    """

    def __init__(self, files: Sequence[tuple[str, int]], open_stream: Callable[[str], FileStream], *,
                 chunk_size: int, connections: int, ahead: bool = False):
        self._files = list(files)
        self._open_stream = open_stream
        # Ranges: (file index, start, end, last of its file), never across files.
        self._ranges: list[tuple[int, int, int, bool]] = []
        for index, (_, size) in enumerate(self._files):
            start = 0
            while True:
                end = min(size, start + chunk_size)
                self._ranges.append((index, start, end, end >= size))
                if end >= size:
                    break
                start = end
        self._next_file = 0
        self._closed = False
        self._ahead_init()
        self._ring_init(sum(size for _, size in self._files), chunk_size, ahead_places(ahead) * connections,
                        first=0, name="hubcache-copy", count=len(self._ranges), workers=connections)
        self._start_workers()

    def _range_of(self, k: int) -> tuple[FileStream, int, int]:
        index, start, end, last = self._ranges[k]
        # The last range asks for one byte more: an object longer than its record sends it.
        return self._open_stream(self._files[index][0]), start + self._slots[k].received, end + 1 if last else end

    def _fetch(self, k: int) -> int | None:
        index, start, end, last = self._ranges[k]
        path, size = self._files[index]
        slot = self._slots[k]
        failures = 0
        next_claim: list[int | None] = []

        def sink(data: bytes | memoryview) -> None:
            if start + slot.received + len(data) > end:  # only a last range asks past the record
                raise SizeMismatch(path, size, more=True, size=size)
            self._deliver(k, data)

        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                self._read_range(k, sink, next_claim)
            except Transient:
                failures += 1
                if not self._pause_before_retry(failures, CHUNK_RETRIES):
                    raise
                continue
            break
        if slot.received != end - start:  # the object ended early
            raise SizeMismatch(path, start + slot.received, more=False, size=size)
        return next_claim[0] if next_claim else None

    def file(self, index: int) -> Iterator[bytes]:
        """The bytes of file ``index`` (the files are read in order, each once)."""
        if index != self._next_file:
            raise ValueError(f"file {index} read out of order (next: {self._next_file})")
        self._next_file += 1
        left = self._files[index][1]
        while left:
            data = self._next_piece(left)
            if not data:  # pragma: no cover - every range delivers its bytes or raises
                raise OSError(f"{self._files[index][0]}: the read ended early")
            left -= len(data)
            yield data

    def close(self) -> None:
        """Stop the workers."""
        if not self._closed:
            self._closed = True
            self._shut_down()
