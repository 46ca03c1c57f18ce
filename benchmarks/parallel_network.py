#!/usr/bin/env python3
"""Cold resolves over a "network" origin: each connection capped, each answer late.

A throwaway measurement for issue 15's parallel ranged downloads (not the harness's network
profile): a loopback origin, in a process of its own, streams the archive with ``sendfile`` at
``--rate`` bytes per second per connection (each answer is one connection's: HTTP/1.1 answers one
request at a time), after ``--latency`` seconds, honouring ``Range: bytes=A-B`` and ``If-Range``.
Each run is a fresh process (``benchmarks/child.py``) resolving the archive (``--format``,
default ``.tar.gz``) into a fresh ``TFHUB_CACHE_DIR`` with ``HUBCACHE_CONNECTIONS`` set; the time
is the resolve alone, and the process's peak RSS and CPU time are kept. Medians of ``--repeat``
runs are printed, per connection count. The archives are ``run.py``'s (float32 random-normal
weights), built once.

Run it from the repository root::

    .venv/bin/python benchmarks/parallel_network.py                      # 256 MiB, 32 MB/s, 30 ms
    .venv/bin/python benchmarks/parallel_network.py --rate 0 --size 1G   # loopback, no cap
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import SUFFIX, build_archives, parse_size, tree_bytes  # noqa: E402

CHILD = os.path.join(HERE, "child.py")
STEP = 256 << 10


def serve(path: str, rate: float, latency: float) -> None:
    """Serve ``path`` (at any URL path); print the port, then serve until killed."""
    size = os.path.getsize(path)
    etag = f'"{size}-{int(os.path.getmtime(path))}"'
    peak = {"now": 0, "max": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if latency:
                time.sleep(latency)
            start, stop, status = 0, size, 200
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes=") and self.headers.get("If-Range", etag) == etag:
                first, _, last = wanted[6:].partition("-")
                start, status = int(first), 206
                if last.strip():
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
            with lock:
                peak["now"] += 1
                peak["max"] = max(peak["max"], peak["now"])
            began, offset = time.monotonic(), start
            try:
                with open(path, "rb") as f:
                    while offset < stop:
                        sent = os.sendfile(self.connection.fileno(), f.fileno(), offset,
                                           min(STEP, stop - offset) if rate else stop - offset)
                        if sent == 0:
                            break
                        offset += sent
                        if rate:  # paced against the clock
                            time.sleep(max(0.0, began + (offset - start) / rate - time.monotonic()))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with lock:
                    peak["now"] -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 64
    print(server.server_address[1], flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"), help="weights (default 256M)")
    parser.add_argument("--rate", type=float, default=32e6, help="bytes/s per connection (0: no cap)")
    parser.add_argument("--latency", type=float, default=0.030, help="seconds before each answer")
    parser.add_argument("--connections", default="1,8,16", help="connection counts to measure")
    parser.add_argument("--chunk-size", default="", help="HUBCACHE_CHUNK_SIZE (default: hubcache's)")
    parser.add_argument("--format", default="gz", choices=("gz", "zst", "tar"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hubcache-bench"))
    args = parser.parse_args()

    archives, model_bytes = build_archives(args.workdir, args.size, seed=0)
    archive = archives[args.format]
    server = subprocess.Popen([sys.executable, __file__, "--serve", archive, str(args.rate), str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}/m{SUFFIX[args.format]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TFHUB_", "HUBCACHE_"))}
        env.update(HUBCACHE_NO_PROGRESS="1")
        if args.chunk_size:
            env["HUBCACHE_CHUNK_SIZE"] = args.chunk_size
        runs = os.path.join(args.workdir, "parallel-runs")
        rate = f"{args.rate / 1e6:g} MB/s per connection" if args.rate else "no rate cap"
        print(f"{os.path.basename(archive)}: {os.path.getsize(archive) / (1 << 20):.1f} MiB, {rate}, "
              f"{args.latency * 1000:g} ms before each answer, {args.repeat} runs each")
        for n in [int(c) for c in args.connections.split(",")]:
            seconds, rss, cpu = [], [], []
            for _ in range(args.repeat):
                cache = os.path.join(runs, uuid.uuid4().hex[:12])
                os.makedirs(cache)
                proc = subprocess.run([sys.executable, CHILD, "cold", "hubcache", url], capture_output=True, text=True,
                                      env=dict(env, TFHUB_CACHE_DIR=cache, HUBCACHE_CONNECTIONS=str(n)))
                if proc.returncode:
                    raise SystemExit(f"connections={n}: the resolve failed: {proc.stderr.strip()[-2000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if tree_bytes(result["path"]) != model_bytes:
                    raise SystemExit(f"connections={n}: the entry does not have the model's {model_bytes} bytes")
                seconds.append(result["seconds"])
                rss.append(result["peak_rss"] / (1 << 20))
                cpu.append(result["cpu"])
                shutil.rmtree(cache)
                os.sync()
            print(f"  connections={n:<3} median {statistics.median(seconds):6.2f} s   "
                  f"(runs {', '.join(f'{s:.2f}' for s in seconds)})   peak RSS median {statistics.median(rss):.0f} MiB "
                  f"(max {max(rss):.0f})   CPU median {statistics.median(cpu):.2f} s", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
