"""One host of ``fleet.py``: resolve one handle when told to, print one JSON line.

Usage: ``fleet_host.py HANDLE`` with the host's environment set by the caller (its own local
tier through ``XDG_CACHE_HOME``, ``HUBCACHE_BACKEND=home,gcs``, the bucket in ``TFHUB_CACHE_DIR``,
its own proxy port in ``STORAGE_EMULATOR_HOST``). It imports hubcache and gcsfs, records every
hubcache event with its ``time.monotonic()`` (one clock for every process of a Linux machine),
prints ``ready``, waits for a line on stdin, resolves, and prints the path, the start and end
times, the events and its peak RSS.
"""

from __future__ import annotations

import json
import sys
import time

import gcsfs  # noqa: F401 - imported before the race, as a host that has started up has

import hubcache
from hubcache.plugins.registry import get_registry

events: list[dict] = []


class Recorder:
    @hubcache.hookimpl
    def hubcache_event(self, event) -> None:  # noqa: ANN001 - hubcache.Event
        if event.kind == "download_progress":
            return
        data = {k: v for k, v in event.data.items() if isinstance(v, (int, float, str, type(None)))}
        events.append({"t": time.monotonic(), "kind": event.kind, "backend": event.backend, **data})


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)


def main() -> None:
    handle = sys.argv[1]
    get_registry().register(Recorder(), "bench-recorder")
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    path = hubcache.resolve(handle)
    ended = time.monotonic()
    print(json.dumps({"path": path, "started": started, "ended": ended, "events": events,
                      "peak_rss": _peak_rss()}), flush=True)


if __name__ == "__main__":
    main()
