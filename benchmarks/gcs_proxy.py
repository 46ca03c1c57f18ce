"""A counting HTTP proxy in front of the GCS emulator: one port per emulated host.

``fleet.py`` points each host's ``STORAGE_EMULATOR_HOST`` at its own port of this proxy, so every
request to the bucket is counted per host: object reads (``alt=media``) with their bytes and the
time of the first one, per object, and uploaded bytes. It forwards each request to the emulator
unchanged (``Location`` headers of resumable uploads are rewritten to come back through the same
port) and streams answers back in 1 MiB pieces.

With ``--latency SECONDS`` and ``--rate BYTES_PER_SECOND`` it also shapes object reads as a far
bucket would: each media answer's head waits ``latency``, and its body is sent at ``rate`` per
connection; each such read is then recorded (object, ``Range``, arrival and end times) in
``media``.

Run as ``gcs_proxy.py UPSTREAM_URL HOSTS [--latency S] [--rate B]``: prints one JSON line
``{"ports": [...]}`` and serves until killed. ``GET /__bench__/stats`` (on any port) answers every counter as JSON;
``POST /__bench__/reset`` clears them. Times are ``time.monotonic()``, which on Linux is one
clock for every process of the machine, so they compare with the hosts' own.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length"}
PIECE = 1 << 20


class Counters:
    """Per host: requests, uploads, and per object read: GETs, bytes, first and last time."""

    def __init__(self, hosts: int):
        self.lock = threading.Lock()
        self.hosts = hosts
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.data = [{"requests": 0, "upload_bytes": 0, "reads": {}, "media": []} for _ in range(self.hosts)]

    def media(self, host: int, name: str, asked: str | None, arrived: float, finished: float) -> None:
        """One shaped object read: its ``Range`` header, when it arrived and when its answer ended."""
        with self.lock:
            self.data[host]["media"].append({"object": name, "range": asked, "arrived": arrived,
                                             "finished": finished})

    def request(self, host: int, upload: int) -> None:
        with self.lock:
            self.data[host]["requests"] += 1
            self.data[host]["upload_bytes"] += upload

    def read(self, host: int, name: str, started: float, nbytes: int, aborted: bool = False) -> None:
        """One object read: ``nbytes`` sent; ``aborted``: the host hung up before the end."""
        with self.lock:
            read = self.data[host]["reads"].setdefault(
                name, {"gets": 0, "bytes": 0, "aborted": 0, "first": started, "last": 0.0})
            read["gets"] += 1
            read["bytes"] += nbytes
            read["aborted"] += int(aborted)
            read["first"] = min(read["first"], started)
            read["last"] = max(read["last"], time.monotonic())

    def snapshot(self) -> list[dict]:
        with self.lock:
            return json.loads(json.dumps(self.data))


def _handler(upstream: str, host: int, counters: Counters, latency: float = 0.0,
             rate: float = 0.0) -> type[BaseHTTPRequestHandler]:
    up = urlsplit(upstream)
    shaped = latency > 0 or rate > 0

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        conn: http.client.HTTPConnection | None = None

        def log_message(self, *args: object) -> None:
            pass

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def control(self) -> bool:
            if not self.path.startswith("/__bench__/"):
                return False
            if self.path.startswith("/__bench__/reset"):
                counters.reset()
                payload = b"{}"
            else:
                payload = json.dumps(counters.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return True

        def forward(self) -> None:
            if self.control():
                return
            started = time.monotonic()
            data = self.body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            headers["Host"] = up.netloc
            if data or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(data))
            for attempt in (0, 1):  # a kept-alive upstream connection the emulator closed: once more
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
                try:
                    self.conn.request(self.command, self.path, body=data or None, headers=headers)
                    resp = self.conn.getresponse()
                    break
                except (ConnectionError, http.client.HTTPException, OSError):
                    self.conn.close()
                    self.conn = None
                    if attempt:
                        raise
            url = urlsplit(self.path)
            counters.request(host, len(data) if url.path.startswith("/upload/") else 0)
            media = self.command == "GET" and "media" in parse_qs(url.query).get("alt", [])
            if media and latency > 0:
                time.sleep(max(0.0, started + latency - time.monotonic()))
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for key, value in resp.getheaders():
                if key.lower() in HOP:
                    continue
                if key.lower() == "location":
                    value = value.replace(upstream.rstrip("/"), f"http://127.0.0.1:{self.server.server_address[1]}")
                self.send_header(key, value)
            if self.command == "HEAD":
                resp.read()
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                return
            sent, aborted = 0, False
            try:
                sent = self.relay(resp, length)
            except (BrokenPipeError, ConnectionResetError) as error:  # the host hung up mid-answer
                sent, aborted = getattr(error, "sent", 0), True
                self.close_connection = True
                if self.conn is not None:  # the rest of the upstream answer is not wanted
                    self.conn.close()
                    self.conn = None
            if media and 200 <= resp.status < 300:
                name = unquote(url.path.split("/o/", 1)[-1])
                counters.read(host, name, started, sent, aborted)
                if shaped:
                    counters.media(host, name, self.headers.get("Range"), started, time.monotonic())

        def relay(self, resp: http.client.HTTPResponse, length: str | None) -> int:
            """Send the answer's body; return its bytes (on a hang-up, the error carries ``sent``)."""
            sent = 0
            if length is None:  # chunked or close-delimited upstream: whole, then with a length
                payload = resp.read()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                sent = len(payload)
            else:
                self.send_header("Content-Length", length)
                self.end_headers()
                began = time.monotonic()
                try:
                    while piece := resp.read(PIECE if rate <= 0 else 64 << 10):
                        self.wfile.write(piece)
                        sent += len(piece)
                        if rate > 0:  # paced: this connection's bytes so far at ``rate``
                            time.sleep(max(0.0, began + sent / rate - time.monotonic()))
                except (BrokenPipeError, ConnectionResetError) as error:
                    error.sent = sent  # type: ignore[attr-defined]
                    raise
            return sent

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = forward

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream")
    parser.add_argument("hosts", type=int)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each object read's answer")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes/s of each object read's answer")
    args = parser.parse_args()
    counters = Counters(args.hosts)
    servers = []
    for host in range(args.hosts):
        server = _QuietServer(("127.0.0.1", 0), _handler(args.upstream, host, counters, args.latency, args.rate))
        server.daemon_threads = True
        server.request_queue_size = 64
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    print(json.dumps({"ports": [s.server_address[1] for s in servers]}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
