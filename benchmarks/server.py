"""The benchmarks' HTTP origin: files streamed from disk with ``sendfile``, optionally shaped.

``hubcache.testing.OriginServer`` keeps bodies in memory and writes them from Python, which
costs CPU on the same two cores the measured clients use. For the limit runs the origin must be
as cheap as possible, so this one hands each file to the kernel (zero copy from the page cache).

Two profiles:

- **loopback** (``rate=0, latency=0``): each answer is one ``sendfile`` of the whole range, as
  fast as the machine moves bytes;
- **network** (``rate > 0`` and/or ``latency > 0``): what a CDN or an object store looks like
  from one client: every TCP connection is capped by a token bucket of ``rate`` bytes per second
  (bursts of at most :data:`BURST` bytes), and every answer starts ``latency`` seconds after its
  request arrived. A client that wants more bandwidth must open more connections.

It speaks what download tools expect: ``GET`` and ``HEAD``, ``Range: bytes=A-B`` / ``A-`` /
``-N``, ``If-Range`` (a validator that does not match gets the whole file, a 200), a strong
``ETag``, ``Last-Modified``, ``Accept-Ranges: bytes``, ``Content-Length``, 416 for a range past
the end. The query string is ignored, so tensorflow_hub's ``?tf-hub-format=compressed`` form of
a handle names the same file. It counts requests and body bytes sent, per path, and the most
answers in flight at once.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: The token bucket's capacity, and the largest ``sendfile`` of a shaped answer: 4 ms at 32 MB/s.
BURST = 128 << 10


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` at once; :meth:`take` sleeps until allowed."""

    def __init__(self, rate: float, burst: int = BURST):
        self.rate = float(rate)
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: int) -> None:
        """Wait until ``n`` (at most ``burst``) bytes may be sent, and spend them."""
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep((n - self.tokens) / self.rate)

    def give_back(self, n: int) -> None:
        """Return tokens taken for bytes that were not sent after all."""
        self.tokens = min(self.burst, self.tokens + n)


class FileServer:
    """Serve ``{url path: file path}`` on 127.0.0.1 (a free port); see the module doc.

    Args:
        files: URL path -> file on disk.
        rate: bytes per second per connection (0: no cap).
        latency: seconds between a request's arrival and the start of its answer.

    Use as a context manager. :meth:`count` says how many GETs a path received; :meth:`stats`
    gives every counter.
    """

    def __init__(self, files: dict[str, str], rate: float = 0.0, latency: float = 0.0):
        self.files = dict(files)
        self.rate = float(rate)
        self.latency = float(latency)
        self._counts: Counter[str] = Counter()
        self._downloads: Counter[str] = Counter()  # GETs without a Range: how a download starts
        self._bytes: Counter[str] = Counter()
        self._heads = 0
        self._connections = 0
        self._active = 0
        self._peak = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def count(self, path: str) -> int:
        """GET requests for ``path`` since the last :meth:`reset_counts`."""
        with self._lock:
            return self._counts[path]

    def downloads(self, path: str) -> int:
        """Downloads of ``path`` since the last :meth:`reset_counts`: GETs without ``Range``. A
        download starts with one (hubcache's parallel one then sends ranged GETs for the rest,
        and a resumed one a ranged GET), so ``count`` is not the number of downloads."""
        with self._lock:
            return self._downloads[path]

    def bytes_sent(self, path: str) -> int:
        """Body bytes sent for ``path`` since the last :meth:`reset_counts`."""
        with self._lock:
            return self._bytes[path]

    def stats(self) -> dict[str, int]:
        """``gets``, ``heads``, ``bytes`` (body bytes sent), ``connections`` (accepted) and
        ``peak_answers`` (the most answers being sent at once)."""
        with self._lock:
            return {"gets": sum(self._counts.values()), "heads": self._heads, "bytes": sum(self._bytes.values()),
                    "connections": self._connections, "peak_answers": self._peak}

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no answer is being sent (at most ``timeout`` seconds): an answer's bytes are
        counted when its last write returns, which may be after its client has read them all."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._active == 0:
                    return True
            time.sleep(0.01)
        return False

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._downloads.clear()
            self._bytes.clear()
            self._heads = self._connections = self._peak = 0

    def __enter__(self) -> FileServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        server.request_queue_size = 128  # 16 processes x 16 connections may connect at once
        self._server = server
        threading.Thread(target=server.serve_forever, name="bench-origin", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a single ``bytes=`` range of a ``size``-byte file; ``None`` for a
    header that is not one (the whole file is sent); ``(size, size)`` when it is unsatisfiable."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    try:
        if not sep:
            return None
        if not first:  # bytes=-N: the last N bytes
            n = int(last)
            return (max(0, size - n), size) if n > 0 else (size, size)
        start = int(first)
        stop = min(size, int(last) + 1) if last.strip() else size
    except ValueError:
        return None
    if start >= size or stop <= start:
        return size, size
    return start, stop


def _handler(origin: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # One bucket per TCP connection: its requests (keep-alive) share the cap.
            self.bucket = TokenBucket(origin.rate) if origin.rate > 0 else None
            with origin._lock:
                origin._connections += 1

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def answer(self, body: bool) -> None:
            path = urlsplit(self.path).path  # tensorflow_hub appends ?tf-hub-format=compressed
            with origin._lock:
                if body:
                    origin._counts[path] += 1
                    if "Range" not in self.headers:
                        origin._downloads[path] += 1
                else:
                    origin._heads += 1
            if origin.latency > 0:
                time.sleep(origin.latency)
            file = origin.files.get(path)
            if file is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            stat = os.stat(file)
            size = stat.st_size
            etag = f'"{size}-{int(stat.st_mtime)}"'
            modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
            start, stop, status = 0, size, 200  # the bytes sent: start..stop-1
            wanted = parse_range(self.headers.get("Range", ""), size)
            if_range = self.headers.get("If-Range")
            if wanted is not None and (if_range is None or if_range in (etag, modified)):
                start, stop = wanted
                status = 416 if start == stop == size else 206
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
            if status == 416:
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            self.wfile.flush()
            if body:
                self.send_body(path, file, start, stop)

        def send_body(self, path: str, file: str, start: int, stop: int) -> None:
            with origin._lock:
                origin._active += 1
                origin._peak = max(origin._peak, origin._active)
            offset = start
            try:
                with open(file, "rb") as f:
                    while offset < stop:
                        step = stop - offset
                        if self.bucket is not None:
                            step = min(step, BURST)
                            self.bucket.take(step)
                        sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, step)
                        if self.bucket is not None and sent < step:
                            self.bucket.give_back(step - sent)
                        if sent == 0:
                            break
                        offset += sent
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped reading (e.g. a first answer it closed)
            finally:
                with origin._lock:
                    origin._active -= 1
                    origin._bytes[path] += offset - start

    return Handler
