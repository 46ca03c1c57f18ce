"""``import hubcache`` and everything short of ``load`` stay light: no TensorFlow, no gcsfs.

Each check runs in a fresh interpreter: this test process has long since imported TensorFlow
(tests/test_tf.py) by the time this file runs, so only a new process shows what hubcache itself
imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hubcache.testing import archive_of

#: Modules that must appear only when used: TensorFlow and its kin (``load``), gcsfs and the
#: Google auth stack (the gcs backend when it is selected).
HEAVY = ("tensorflow", "tensorflow_hub", "tf_keras", "keras", "gcsfs", "google.auth")


def _imported_after(script: str) -> list[str]:
    """Run ``script`` in a fresh interpreter and return which of :data:`HEAVY` it imported."""
    program = textwrap.dedent(script) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_hubcache_imports_nothing_heavy():
    assert _imported_after("import hubcache; hubcache.load; hubcache.HubcacheError") == []


@pytest.mark.parametrize("fmt", ["gz", "zst"])
def test_resolve_local_archive_imports_nothing_heavy(model, tmp_path, fmt):
    archive = tmp_path / f"model.tar.{fmt}"
    archive.write_bytes(archive_of(model, fmt))
    script = f"""
        import os, hubcache
        path = hubcache.resolve({str(archive)!r})
        assert os.path.isfile(os.path.join(path, "saved_model.pb")), path
    """
    assert _imported_after(script) == []


def test_resolve_over_http_and_directory_imports_nothing_heavy(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    script = f"""
        import hubcache
        hubcache.resolve({url!r})
        assert hubcache.resolve({model!r}) == {model!r}
    """
    assert _imported_after(script) == []
    assert origin.count("/m.tar.gz") == 1


def test_cli_config_loads_every_plugin_without_heavy_imports():
    """``hubcache config`` instantiates the selected backend and loads every installed plugin
    (gcs included, once it is installed): plugin modules must import their heavy clients lazily."""
    script = """
        import contextlib, io
        from hubcache.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["config"]) == 0
            assert main(["plugins"]) == 0
    """
    assert _imported_after(script) == []
