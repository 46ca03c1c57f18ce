"""The benchmark harness still runs: ``benchmarks/run.py --quick`` end to end, on a tiny model.

It builds real archives, serves them over loopback, runs hubcache, tensorflow_hub (when
installed) and the shell pipelines in real processes, and must write a sane JSON, table and PNG.
Timings are not judged here (the machine is shared); only that every measure was taken and has
a plausible value, so the harness cannot rot between full runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TOOLS = all(shutil.which(t) for t in ("curl", "zstd", "tar"))


@pytest.mark.timeout(240)
def test_quick_run_writes_a_sane_table_json_and_chart(tmp_path):
    # matplotlib comes with the test extra: without it this fails rather than skips.
    assert importlib.util.find_spec("matplotlib") is not None, "pip install -e '.[test]'"
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--size", "8M", "--repeat", "1",
           "--procs", "2", "--calls", "2000", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    hub = {key: row["median"]["hubcache"] for key, row in rows.items()}
    assert result["settings"]["weights_bytes"] == 8 << 20 and result["settings"]["procs"] == 2
    for key in ("cold_gz", "cold_zst", "cold_tar", "concurrent_wall"):
        assert 0 < hub[key] < 60, (key, hub[key])
    assert 0 < hub["warm_call"] < 1000  # µs
    assert 0 < hub["fresh_process"] < 20_000  # ms
    assert 5 < hub["peak_rss"] < 1024  # MiB: a whole Python process, not a stray unit
    assert hub["concurrent_requests"] == 1  # two racing processes, one download
    for key in ("cold_gz", "warm_call", "fresh_process", "peak_rss", "concurrent_requests"):
        assert rows[key]["target"]["value"] is not None, key

    if HAS_TOOLS:
        for key in ("cold_gz", "cold_zst", "cold_tar", "tar_xf", "warm_call", "fresh_process"):
            assert rows[key]["median"]["limit"] > 0, key
        assert rows["cold_zst"]["target"]["met"] is not None
    else:
        assert "missing" in result and result["missing"]
    # tensorflow_hub comes with the test extra, so its column is always measured here.
    tfhub = {key: row["median"]["tensorflow_hub"] for key, row in rows.items()}
    for key in ("cold_gz", "cold_tar", "warm_call", "fresh_process", "concurrent_wall"):
        assert tfhub[key] > 0, key
    assert tfhub["cold_zst"] is None  # tensorflow_hub cannot read .tar.zst, and is not asked to
    assert rows["cold_gz"]["hub_over_tfhub"] == pytest.approx(hub["cold_gz"] / tfhub["cold_gz"])

    # The printed table has every measure, and the markdown and chart were written.
    for row in result["rows"]:
        assert row["label"] in proc.stdout
    assert (out / "results.md").read_text().count("\n|") >= len(rows) + 1
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
