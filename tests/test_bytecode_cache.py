"""The suite's bytecode cache (``tests/conftest.py``): under ``PYTHONDONTWRITEBYTECODE``, in an
environment without ``.pyc`` files, the processes the tests start keep their bytecode under the
user cache dir and never next to a source file; where the installer wrote bytecode, or
``PYTHONPYCACHEPREFIX`` is set, nothing changes."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

# conftest's set-up as the suite runs it (at import), then a fresh child importing a new module
# (only when bytecode is not written beside the sources: that child would write it beside the
# installed packages too).
_PROBE = r"""
import importlib.util, json, os, subprocess, sys
import pytest
installed = os.path.exists(importlib.util.cache_from_source(pytest.__file__))  # before conftest
sys.path.insert(0, sys.argv[1])
import conftest
child = 0
if os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
    child = subprocess.run([sys.executable, "-c", "import probe_module"], cwd=sys.argv[2],
                           env=dict(os.environ, PYTHONPATH=sys.argv[2])).returncode
print(json.dumps({"prefix": os.environ.get("PYTHONPYCACHEPREFIX"), "sys_prefix": sys.pycache_prefix,
                  "dont_write": os.environ.get("PYTHONDONTWRITEBYTECODE"), "child": child,
                  "installed": installed}))
"""


def _probe(tmp_path, **env: str) -> dict:
    source = tmp_path / "src"
    source.mkdir()
    (source / "probe_module.py").write_text("VALUE = 1\n")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    # -B: the probe itself writes no bytecode beside the installed packages, whatever the case
    # (conftest reads the environment variable, which -B does not set).
    done = subprocess.run([sys.executable, "-B", "-c", _PROBE, TESTS, str(source)], capture_output=True, text=True,
                          env={**base, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["child"] == 0
    result["beside_source"] = os.path.exists(source / "__pycache__")
    result["cached"] = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "cache") for n in names
                        if n.startswith("probe_module.")]
    return result


def test_without_installed_bytecode_children_cache_it_under_the_user_cache_dir(tmp_path):
    # Bytecode of an earlier session's pytest temp dir (gone) and of a venv under the temp dir.
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    mirror = tmp_path / "cache" / "hubcache-tests" / "pycache" / os.path.relpath(system_tmp, os.sep)
    stale = mirror / f"pytest-of-{getpass.getuser()}" / "pytest-1" / "copy" / "__init__.cpython-311.pyc"
    kept = mirror / "venv-gcs-floor" / "gcsfs" / "__init__.cpython-311.pyc"
    for path in (stale, kept):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"old")
    result = _probe(tmp_path, PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(system_tmp))
    assert not result["beside_source"], "bytecode written next to a source file"
    if result["installed"]:
        # This environment has its bytecode (a fresh pip install): nothing to do, nothing done.
        assert result["prefix"] is None and result["dont_write"] == "1" and not result["cached"]
    else:
        prefix = str(tmp_path / "cache" / "hubcache-tests" / "pycache")
        assert result["prefix"] == result["sys_prefix"] == prefix and result["dont_write"] is None
        assert [p for p in result["cached"] if p.startswith(prefix) and p.endswith(".pyc")], result["cached"]
        assert not stale.exists() and kept.exists(), "only what pytest's temp dirs held is forgotten"


def test_an_explicit_prefix_or_writable_bytecode_is_left_alone(tmp_path):
    mine = str(tmp_path / "mine")
    result = _probe(tmp_path, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=mine)
    assert result["prefix"] == mine and result["dont_write"] == "1" and not result["cached"]
    assert not result["beside_source"]
    (tmp_path / "src").rename(tmp_path / "src-1")
    result = _probe(tmp_path)
    assert result["prefix"] is None and result["dont_write"] is None and not result["cached"]
