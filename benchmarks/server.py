"""A loopback HTTP server that streams files from disk with ``sendfile`` and counts requests.

``hubcache.testing.OriginServer`` keeps bodies in memory and writes them from Python, which
costs CPU on the same two cores the measured clients use. For the limit runs the origin must be
as cheap as possible, so this one hands each file to the kernel (zero copy from the page cache).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FileServer:
    """Serve ``{url path: file path}`` on 127.0.0.1 (free port), with ``Range`` support.

    Use as a context manager. :meth:`count` says how many GETs a path received.
    """

    def __init__(self, files: dict[str, str]):
        self.files = dict(files)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def __enter__(self) -> FileServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        server.request_queue_size = 64  # 16+ clients connect at once
        self._server = server
        threading.Thread(target=server.serve_forever, name="bench-origin", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(origin: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = urlsplit(self.path).path  # tensorflow_hub appends ?tf-hub-format=compressed
            with origin._lock:
                origin._counts[path] += 1
            file = origin.files.get(path)
            if file is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = os.path.getsize(file)
            etag = f'"{size}-{int(os.path.getmtime(file))}"'
            start, stop, status = 0, size, 200  # the bytes sent: start..stop-1
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and self.headers.get("If-Range", etag) == etag:
                first, _, last = wanted[6:].partition("-")
                start, status = int(first), 206
                if last.strip():  # bytes=A-B: parallel downloaders ask for chunks
                    stop = min(size, int(last) + 1)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            self.wfile.flush()
            try:
                with open(file, "rb") as f:
                    offset = start
                    while offset < stop:
                        sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, stop - offset)
                        if sent == 0:
                            break
                        offset += sent
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler
