"""The 30-second demo: resolve model handles through the `tmp` and `home` backends.

It builds a small SavedModel-shaped model, serves it as `.tar.gz`, `.tar.zst` and as a
tfhub.dev-style handle from a local HTTP server it starts itself (127.0.0.1, nothing leaves the
machine), and resolves each handle twice: cold (download + check + unpack) and warm (cached).
Caches go to a private temp directory, so the demo leaves nothing behind.

Run:  make demo      (or: .venv/bin/python examples/demo.py)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

# Point both backends at a throw-away place *before* hubcache reads any setting.
WORKDIR = tempfile.mkdtemp(prefix="hubcache-demo-")
os.environ["TMPDIR"] = os.path.join(WORKDIR, "tmp")
os.environ["XDG_CACHE_HOME"] = os.path.join(WORKDIR, "home")
os.makedirs(os.environ["TMPDIR"])
tempfile.tempdir = None

import hubcache  # noqa: E402
from hubcache.core.resolver import clear_memo  # noqa: E402
from hubcache.testing import OriginServer, archive_of, build_model_dir  # noqa: E402


def timed(handle: str) -> tuple[str, float]:
    start = time.perf_counter()
    path = hubcache.resolve(handle)
    return path, time.perf_counter() - start


def main() -> None:
    model = build_model_dir(os.path.join(WORKDIR, "model"), weights_bytes=32 << 20, shards=2)
    with OriginServer() as origin:
        handles = {
            "archive .tar.gz": origin.add("/models/tiny/1.tar.gz", archive_of(model, "gz")),
            "archive .tar.zst": origin.add("/models/tiny/1.tar.zst", archive_of(model, "zst")),
            "tfhub.dev-style": origin.add_tfhub_model("/google/tiny/1", archive_of(model, "gz")),
        }
        print(f"hubcache {hubcache.__version__} demo: a 32 MiB model served at {origin.url('/')}\n")
        for backend in ("tmp", "home"):
            os.environ["HUBCACHE_BACKEND"] = backend
            clear_memo()
            print(f"backend {backend!r}:")
            for kind, handle in handles.items():
                before = origin.count()
                path, cold = timed(handle)
                downloads = origin.count() - before
                _, first_warm = timed(handle)
                calls = 10_000
                start = time.perf_counter()
                for _ in range(calls):
                    hubcache.resolve(handle)
                warm = (time.perf_counter() - start) / calls
                print(f"  {kind:17} {handle}")
                print(f"  {'':17} -> {path}")
                print(f"  {'':17}    cold {cold * 1000:7.1f} ms ({downloads} request(s)); warm: first "
                      f"{first_warm * 1e6:.0f} µs, then {warm * 1e6:.1f} µs a call over {calls} calls (0 requests)")
            print()
        print(f"origin saw {origin.count()} requests in all; every warm resolve was served from the cache.")
    shutil.rmtree(WORKDIR, ignore_errors=True)


if __name__ == "__main__":
    main()
