#!/usr/bin/env python3
"""What hubcache's start-up hook (``hubcache-autopatch.pth``) costs every interpreter start.

Usage: ``python scripts/startup_cost.py dist/hubcache-*.whl [--runs 20]``

Makes two throw-away virtual environments from this interpreter (without pip): one empty, one with
the wheel installed (``pip install --no-deps``, offline). Then, in interleaved rounds (so that a
busy machine slows all of them alike), starts ``python -c pass`` in the empty one, in the other
without ``HUBCACHE_PATCH_TFHUB``, and in the other with ``HUBCACHE_PATCH_TFHUB=1``, timing each
start from outside; and once each with ``-X importtime``, to show which modules the start
imported and what ``site`` (which reads the ``.pth`` files) cost in all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def _env(patch: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HUBCACHE_PATCH_TFHUB")}
    if patch:
        env["HUBCACHE_PATCH_TFHUB"] = "1"
    return env


def _importtime(python: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """``site``'s cumulative import time (µs) and the modules the start imported beyond the
    empty environment's (by name)."""
    err = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], env=env, capture_output=True,
                         text=True, check=True).stderr
    rows = [line.split("|") for line in err.splitlines() if line.startswith("import time:") and "|" in line]
    names = [row[2].strip() for row in rows[1:]]
    site = next(int(row[1]) for row in rows[1:] if row[2].strip() == "site")
    return site, names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = _venv(Path(tmp) / "bare")
        hooked = _venv(Path(tmp) / "hooked")
        subprocess.run([sys.executable, "-m", "pip", "--python", str(hooked), "install", "--quiet", "--no-deps",
                        "--no-index", str(args.wheel)], check=True)
        cases = {"no hubcache": (bare, _env(False)), "hubcache, variable unset": (hooked, _env(False)),
                 "hubcache, HUBCACHE_PATCH_TFHUB=1": (hooked, _env(True))}
        for python, env in cases.values():  # warm the OS caches
            subprocess.run([str(python), "-c", "pass"], env=env, check=True)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (python, env) in cases.items():
                began = time.perf_counter()
                subprocess.run([str(python), "-c", "pass"], env=env, check=True)
                times[name].append((time.perf_counter() - began) * 1000)
        _, baseline = _importtime(bare, _env(False))
        print(f"{args.runs} starts of `python -c pass` each, interleaved; wall time in ms")
        print(f"{'':36} {'median':>8} {'mean':>8} {'min':>8}   site (µs)  modules beyond the empty venv's")
        for name, (python, env) in cases.items():
            site, names = _importtime(python, env)
            extra = [n for n in names if n not in baseline] or ["-"]
            t = times[name]
            print(f"{name:36} {statistics.median(t):8.2f} {statistics.mean(t):8.2f} {min(t):8.2f}   "
                  f"{site:9}  {', '.join(extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
