"""One measured operation in a fresh process; run by ``run.py``, prints one JSON line.

Usage: ``child.py cold LIB HANDLE [--wait]`` or ``child.py warm LIB HANDLE CALLS BATCHES``,
with LIB ``hubcache`` or ``tensorflow_hub`` and ``TFHUB_CACHE_DIR`` set by the caller. Timings
start after the import, so a cold resolve is the resolve alone (the import of TensorFlow that
tensorflow_hub needs is measured separately, by the fresh-process row).
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _status_bytes(field: str) -> int:
    """A ``VmHWM``/``VmRSS`` figure of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    mode, lib, handle = sys.argv[1:4]
    if lib == "hubcache":
        import hubcache as hub
    else:
        import tensorflow_hub as hub
    if mode == "cold":
        rss_before = _status_bytes("VmRSS")
        if "--wait" in sys.argv:
            print("ready", flush=True)
            sys.stdin.readline()
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        path = hub.resolve(handle)
        ended = time.monotonic()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # all threads
        print(json.dumps({"seconds": ended - started, "started": started, "ended": ended, "path": path, "cpu": cpu,
                          "peak_rss": _status_bytes("VmHWM"), "rss_before": rss_before}), flush=True)
    elif mode == "warm":
        calls, batches = int(sys.argv[4]), int(sys.argv[5])
        path = hub.resolve(handle)  # fills the cache (or reads the entry); the rest are the warm path
        per_call = []
        for _ in range(batches):
            started = time.perf_counter()
            for _ in range(calls):
                hub.resolve(handle)
            per_call.append((time.perf_counter() - started) / calls)
        print(json.dumps({"per_call": per_call, "path": path}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
