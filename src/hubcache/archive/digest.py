"""The digest stage: the archive's bytes pass through a :class:`Meter`, which hashes them (SHA-256,
and a pin's algorithm) and reports progress; while extraction runs, the hashing moves to a
:class:`HashWorker` thread, on another core (:func:`background_digest`).

Built by ``core/cache.py`` around the download's source, read by ``archive/extract.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from typing import Callable, Iterable, Iterator, Protocol

from .formats import DEPTH, MAX_TRAILER, Readable, read_to_end


class Meter:
    """Passes bytes through, hashing them and reporting progress at most every 0.1 s."""

    def __init__(self, raw: Readable, algorithms: tuple[str, ...] = ("sha256",),
                 on_progress: Callable[[int], None] | None = None):
        self._raw = raw
        self.hashes = {name: hashlib.new(name) for name in algorithms}
        self.bytes = 0
        self._on_progress = on_progress
        self._next_report = 0.0
        #: a :class:`HashWorker` that digests on another core while ``extract`` runs
        self.hasher: HashWorker | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self.bytes += len(data)
            if self.hasher is not None:
                self.hasher.put(data)
            else:
                for h in self.hashes.values():
                    h.update(data)
            if self._on_progress is not None:
                now = time.monotonic()
                if now >= self._next_report:
                    self._next_report = now + 0.1
                    self._on_progress(self.bytes)
        return data

    def drain(self, limit: int | None = None) -> None:
        """Read to the end (trailing padding), so the digests cover every byte.

        Raises:
            UnsafeArchiveError: more than ``limit`` bytes are left (default: :data:`MAX_TRAILER`):
                an endless trailer ends in an error, not an endless read holding the lock.
        """
        read_to_end(self, MAX_TRAILER if limit is None else limit)


class _Hash(Protocol):
    """What :class:`HashWorker` uses of a ``hashlib`` object."""

    def update(self, data: bytes, /) -> None: ...


class HashWorker:
    """Feeds chunks to hash objects in a thread; :meth:`finish` waits until all are hashed."""

    def __init__(self, hashes: Iterable[_Hash]) -> None:
        self._hashes = list(hashes)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2 * DEPTH)
        self._thread = threading.Thread(target=self._work, name="hubcache-digest", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        self._queue.put(data)

    def _work(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            for h in self._hashes:
                h.update(data)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def background_digest(meter: Readable) -> Iterator[None]:
    """While the block runs, a :class:`Meter` hashes in a :class:`HashWorker` (a no-op for any
    other reader: the extractor also reads archives no meter watches).

    The digests are complete when the block exits, normally or not.
    """
    if not isinstance(meter, Meter) or not meter.hashes:
        yield
        return
    worker = HashWorker(meter.hashes.values())
    meter.hasher = worker
    try:
        yield
    finally:
        meter.hasher = None
        worker.finish()
