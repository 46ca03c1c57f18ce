"""A child process for the reliability scenarios: resolves handles through ``hubcache.resolve``,
one thread per handle, and prints one JSON line with what each call returned and how long it took.

Usage: ``python _child.py '<json config>'`` with keys

- ``handles``: handles to resolve, each in its own thread (all released at once);
- ``barrier``: a directory: write ``ready-<id>`` there and wait for ``go`` before resolving, so
  many processes start their resolves within a millisecond of each other;
- ``id``: this child's name;
- ``stop_at``: a commit step at which the process stops itself with SIGSTOP, so the parent can
  look at the disk and SIGKILL it exactly there (see :data:`STOP_POINTS`);
- ``hold``: after printing, stay alive until stdin closes (the parent inspects its locks);
- ``setuid``: become this user before resolving (see :func:`become`).

The stop points wrap library functions *in this process only* (the library has no test hooks):
they mark the instant between two system calls of the commit protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

#: name -> where the process stops (before/after which call of the commit protocol).
STOP_POINTS = {
    "lock-held": "lock taken, before leftovers are cleaned up and the download starts",
    "download-done": "every member extracted and the archive hashed, before the commit",
    "descriptor-part": "descriptor (no manifest yet) written to its .part file, before os.replace",
    "descriptor-written": "descriptor (no manifest yet) in place, temp dir not yet renamed",
    "renamed": "temp dir renamed to the entry, descriptor not yet holding the manifest",
    "manifest-part": "descriptor with the manifest written to its .part file (fsynced), before os.replace",
    "manifest-written": "descriptor with the manifest in place (committed), before the lock is released",
}


def _stop() -> None:
    # Directed at this thread: a process-directed SIGSTOP sent from a worker thread lets that
    # thread run on (here: through the rest of the commit) until the group stop catches it.
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def install_stop(point: str) -> None:
    from hubcache.stores import localstore

    if point not in STOP_POINTS:
        raise SystemExit(f"unknown stop point {point!r}")
    if point == "lock-held":
        original_cleanup = localstore.LocalStore.cleanup

        def cleanup(self, key):
            _stop()
            return original_cleanup(self, key)

        localstore.LocalStore.cleanup = cleanup
    elif point == "download-done":
        original_commit = localstore.LocalWriter.commit

        def commit(self, manifest):
            _stop()
            return original_commit(self, manifest)

        localstore.LocalWriter.commit = commit
    elif point == "renamed":
        original_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            original_rename(src, dst, *args, **kwargs)
            if str(src).endswith(".tmp"):
                _stop()

        os.rename = rename
    else:
        # The descriptor is replaced twice: without the manifest before the rename, then with it
        # (the commit). "descriptor-*" stop at the first, "manifest-*" at the second.
        which = 1 if point.startswith("descriptor") else 2
        before = point.endswith("-part")
        original_replace = os.replace
        seen = [0]

        def replace(src, dst, *args, **kwargs):
            hit = str(dst).endswith(".descriptor.txt")
            if hit:
                seen[0] += 1
                hit = seen[0] == which
            if hit and before:
                _stop()
            original_replace(src, dst, *args, **kwargs)
            if hit and not before:
                _stop()

        os.replace = replace


def become(uid: int) -> None:
    """Drop root for another user *after* start-up: the interpreter lives under /root (0700), so a
    process started as that user could not even run. What the resolves need is imported first."""
    import importlib

    for name in ("filelock", "urllib3", "zstandard", "hubcache.core.cache", "hubcache.stores.localstore",
                 "hubcache.download.fetch", "hubcache.archive.extract", "hubcache.archive.pipeline",
                 "hubcache.archive.formats", "hubcache.stores.usage", "hubcache.stores.safefs",
                 "hubcache.stores.treewalk", "hubcache.core.paths", "hubcache.core.redact",
                 "hubcache.core.tiers", "hubcache.backends.tmp", "hubcache.backends.home", "platformdirs",
                 "hubcache.download.network", "hubcache.download.parallel", "urllib.request",
                 "tarfile", "zlib", "bz2", "lzma", "hashlib", "encodings.idna"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import filelock

    from hubcache.archive.formats import inflate_module
    from hubcache.archive.pipeline import crc32_function
    from hubcache.plugins.registry import get_registry

    filelock.FileLock  # resolve the package's lazy attributes while files can still be read
    inflate_module(), crc32_function()  # ISA-L, loaded on first use
    # The plugins' entry points are read from the environment's metadata, which the checkout's
    # directory may not let another user read (a fresh clone under a 0700 temp dir).
    get_registry()
    import ctypes

    libc = ctypes.CDLL(None)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc.prctl(4, 1)  # PR_SET_DUMPABLE: keep /proc/self/io readable after setuid


def _bytes_read() -> int:
    """Bytes this process has read through read() and friends (``rchar`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main() -> None:
    config = json.loads(sys.argv[1])
    import hubcache
    from hubcache.core.events import Event
    from hubcache.plugins.registry import get_registry

    waits = []

    class Waits:
        @hubcache.hookimpl
        def hubcache_event(self, event: Event) -> None:
            if event.kind == "waiting":
                waits.append(event.handle)

    get_registry().register(Waits(), "child-waits")
    if config.get("setuid") is not None:
        become(int(config["setuid"]))
    if config.get("stop_at"):
        install_stop(config["stop_at"])
    handles = list(config["handles"])
    results: list[dict] = [{} for _ in handles]
    start = threading.Event()

    def work(i: int, handle: str) -> None:
        start.wait()
        began = time.perf_counter()
        try:
            path = hubcache.resolve(handle)
            results[i] = {"handle": handle, "path": path}
        except hubcache.HubcacheError as error:
            results[i] = {"handle": handle, "error": str(error), "kind": type(error).__name__}
        results[i]["seconds"] = time.perf_counter() - began
        results[i]["finished"] = time.time()

    threads = [threading.Thread(target=work, args=(i, h), daemon=True) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    barrier = config.get("barrier")
    if barrier:
        with open(os.path.join(barrier, f"ready-{config.get('id', os.getpid())}"), "w"):
            pass
        go = os.path.join(barrier, "go")
        while not os.path.exists(go):
            time.sleep(0.0005)
    released = time.time()
    read_before = _bytes_read()
    start.set()
    for t in threads:
        t.join()
    print(json.dumps({"pid": os.getpid(), "released": released, "results": results, "waits": len(waits),
                      "bytes_read": _bytes_read() - read_before}), flush=True)
    if config.get("hold"):  # stay alive (locks, open files) until the parent closes stdin
        sys.stdin.read()


if __name__ == "__main__":
    main()
