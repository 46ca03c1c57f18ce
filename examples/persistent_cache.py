"""Persistent cache: with the ``home`` backend a model is downloaded once, then every later run —
a new process tomorrow, another script — loads it from disk without touching the network.

The script builds a tiny TF2 SavedModel, serves it from a local HTTP server it starts itself
(127.0.0.1, a free port), and loads it three times, counting the requests the server sees:

1. in this process, with ``HUBCACHE_BACKEND=home``: the cache is empty, the model is downloaded;
2. in a fresh Python process with the same setting: nothing in memory, everything on disk —
   no request at all;
3. with the ``hubcache resolve`` command and tensorflow_hub's own setting,
   ``TFHUB_CACHE_DIR=<the home cache dir>``: the same entries, again no request. (The layout is
   tensorflow_hub's, so tensorflow_hub pointed at that directory finds them too.)

The home cache lives in the user cache dir (``~/.cache/tfhub_modules`` on Linux, from
``XDG_CACHE_HOME``); the script points ``XDG_CACHE_HOME`` at a private temp directory and deletes
it at the end, so it leaves nothing behind.

Run:  .venv/bin/python examples/persistent_cache.py      (needs hubcache[tensorflow])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from _model import build_tf2_model, expected_tf2, quiet_tensorflow, serve

quiet_tensorflow()

X = [[1.0, 2.0], [3.0, -1.0]]


def load_and_call(handle: str) -> tuple[bool, str]:
    """One "run": resolve and load ``handle`` with the current settings, call it, report."""
    import numpy as np

    import hubcache as hub

    path = hub.resolve(handle)
    model = hub.load(handle)
    x = np.array(X, dtype=np.float32)
    ok = bool(np.allclose(model(x)["y"].numpy(), expected_tf2(x)))
    print(f"    resolved to: {path}")
    print(f"    model(x):    {'OK' if ok else 'MISMATCH'}, equals x @ W + b")
    return ok, path


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="hubcache-persistent-")
    try:
        return run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: str) -> int:
    from hubcache.testing import OriginServer

    os.environ["XDG_CACHE_HOME"] = os.path.join(workdir, "home-cache")
    os.environ["HUBCACHE_BACKEND"] = "home"
    os.environ.pop("TFHUB_CACHE_DIR", None)
    cache_dir = os.path.join(os.environ["XDG_CACHE_HOME"], "tfhub_modules")
    model_dir = build_tf2_model(os.path.join(workdir, "model"))
    with OriginServer() as origin:
        handle = serve(origin, model_dir, "tiny", formats=()).handle
        print(f"handle:    {handle}")
        print(f"cache dir: {cache_dir}  (HUBCACHE_BACKEND=home)\n")

        print("run 1, this process, empty cache:")
        ok, path = load_and_call(handle)
        downloads = origin.count()
        print(f"    origin requests: {downloads} (downloaded: the handle, then its archive)\n")
        ok &= downloads > 0

        before = origin.count()
        print("run 2, a fresh Python process, same settings:")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", handle],
                               capture_output=True, text=True, env=dict(os.environ))
        print(child.stdout.rstrip())
        if child.returncode != 0:
            print(child.stderr.strip()[-2000:])
        ok &= child.returncode == 0 and f"resolved to: {path}" in child.stdout
        ok &= _report(origin.count() - before)

        before = origin.count()
        print(f"run 3, `hubcache resolve` with TFHUB_CACHE_DIR={cache_dir} (tensorflow_hub's setting):")
        env = {k: v for k, v in os.environ.items() if k != "HUBCACHE_BACKEND"}
        env["TFHUB_CACHE_DIR"] = cache_dir
        cli = subprocess.run([sys.executable, "-m", "hubcache", "resolve", handle],
                             capture_output=True, text=True, env=env)
        print(f"    resolved to: {cli.stdout.strip() or cli.stderr.strip()}")
        ok &= cli.returncode == 0 and cli.stdout.strip() == path
        ok &= _report(origin.count() - before)

        print(f"{'OK' if ok else 'FAILED'}: {origin.count()} origin requests in all, for three runs.")
    return 0 if ok else 1


def _report(requests: int) -> bool:
    print(f"    origin requests: {requests} ({'no download' if requests == 0 else 'UNEXPECTED: downloaded again'})\n")
    return requests == 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        sys.exit(0 if load_and_call(sys.argv[2])[0] else 1)
    sys.exit(main())
