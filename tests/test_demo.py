"""`make demo` runs examples/demo.py: run it as a user would and check what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hubcache.core.handles import cache_key

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_resolves_through_tmp_and_home_and_cleans_up():
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("HUBCACHE_", "TFHUB_"))})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backend 'tmp':" in out and "backend 'home':" in out
    handles = re.findall(r"^  (?:archive \.tar\.gz|archive \.tar\.zst|tfhub\.dev-style)\s+(\S+)$", out, re.M)
    paths = re.findall(r"-> (\S+)$", out, re.M)
    assert len(handles) == len(paths) == 6
    for handle, path in zip(handles, paths):
        assert path.endswith("/tfhub_modules/" + cache_key(handle))
    assert sum("/tmp/tfhub_modules/" in p for p in paths) == 3
    assert sum("/home/tfhub_modules/" in p for p in paths) == 3
    # Cold resolves download (the .tar.gz in one or more range requests: HUBCACHE_CONNECTIONS; the
    # tfhub-style handle one request more, its redirect); warm ones never do.
    downloads = [int(n) for n in re.findall(r"cold\s+[\d.]+ ms \((\d+) request", out)]
    gz, zst, tfhub = downloads[:3]
    assert len(downloads) == 6 and downloads[3:] == downloads[:3], downloads
    assert gz >= 1 and zst >= 1 and tfhub == gz + 1, downloads
    assert f"origin saw {2 * sum(downloads[:3])} requests in all" in out
    workdir = re.search(r"-> (/\S+?/hubcache-demo-[^/]+)/", out).group(1)
    assert not os.path.exists(workdir), "the demo must leave nothing behind"
