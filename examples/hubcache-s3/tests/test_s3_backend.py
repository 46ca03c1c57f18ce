"""The s3 backend as users meet it: installed with pip, found through its entry point, selected
by ``TFHUB_CACHE_DIR=s3://…``, on a real S3 server (moto's).

What every object-store backend must do (the conditional create, processes racing for the lease
and for one handle, a missing bucket...) runs in ``test_s3_conformance.py``, hubcache's
conformance kit; the tests here are the plugin's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import hubcache
import hubcache_s3
from hubcache.core.config import load_config
from hubcache.core.handles import cache_key
from hubcache.core.resolver import select_backend_name
from hubcache.testing import archive_of, read_tree, tree_of
from hubcache_s3 import S3ObjectStore, s3_filesystem


def run_child(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``script`` in a fresh interpreter (no memo, no warm clients) with the test's settings."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def strip(url: str) -> str:
    return url.split("://", 1)[1]


# -- the plugin, as installed -------------------------------------------------------------------


def test_hubcache_plugins_lists_s3_with_distribution_and_version():
    version = metadata.version("hubcache-s3")
    assert version == hubcache_s3.__version__
    result = run_child("from hubcache.cli import main; raise SystemExit(main(['plugins', '--json']))")
    assert result.returncode == 0, result.stderr
    row = {r["name"]: r for r in json.loads(result.stdout)}["s3"]
    assert (row["distribution"], row["version"], row["status"]) == ("hubcache-s3", version, "loaded")
    assert row["backends"] == ["s3"] and row["module"] == "hubcache_s3" and not row["builtin"]
    text = run_child("from hubcache.cli import main; raise SystemExit(main(['plugins']))").stdout
    assert f"hubcache-s3 {version}" in text


def test_loading_the_plugin_imports_neither_s3fs_nor_botocore():
    script = """
        import sys
        from hubcache.plugins.registry import get_registry
        assert "s3" in get_registry().backends
        print([m for m in ("s3fs", "botocore", "aiobotocore") if m in sys.modules])
    """
    result = run_child(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_s3fs_is_a_clear_error_naming_the_handle(s3_root):
    # s3fs is installed here (the package depends on it); a child process that blocks its import
    # (sys.modules[name] = None makes `import s3fs` raise ImportError) stands in for an
    # installation without it.
    script = """
        import sys
        sys.modules["s3fs"] = None
        import hubcache
        try:
            hubcache.resolve("https://example.com/model.tar.gz")
        except hubcache.MissingDependencyError as error:
            print(error)
    """
    result = run_child(script, env={"TFHUB_CACHE_DIR": s3_root})
    assert result.returncode == 0, result.stderr
    assert "s3fs" in result.stdout and "model.tar.gz" in result.stdout and "pip install" in result.stdout


@pytest.mark.parametrize("cache_dir", [None, "/some/local/dir", "s3://"])
def test_s3_backend_needs_an_s3_cache_dir(monkeypatch, cache_dir):
    monkeypatch.setenv("HUBCACHE_BACKEND", "s3")
    if cache_dir:
        monkeypatch.setenv("TFHUB_CACHE_DIR", cache_dir)
    with pytest.raises(hubcache.ConfigError) as info:
        hubcache.resolve("https://example.com/m.tar.gz")
    assert "TFHUB_CACHE_DIR=s3://bucket/prefix" in str(info.value)
    assert "m.tar.gz" in str(info.value)


RESOLVE_CHILD = """
    import json, sys
    import hubcache
    first = hubcache.resolve(sys.argv[1])
    second = hubcache.resolve(sys.argv[1])
    print(json.dumps([first, second]))
"""


def test_tfhub_cache_dir_s3_resolves_through_hubcache(origin, model, s3_root, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", s3_root)
    assert select_backend_name(load_config())[0] == "s3", "an s3:// cache dir selects the backend"
    url = origin.add("/models/tiny.tar.gz", archive_of(model, "zst"))
    # Only hubcache-s3's own endpoint setting: botocore's AWS_ENDPOINT_URL is taken away.
    env = {**os.environ, "HUBCACHE_BACKEND": "s3", "HUBCACHE_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    del env["AWS_ENDPOINT_URL"]
    for attempt in range(2):  # two processes: the second has no memo and finds the entry in S3
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(RESOLVE_CHILD), url], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [f"{s3_root}/{cache_key(url)}"] * 2
    assert origin.count() == 1, "one download for four resolves in two processes"
    assert read_tree(f"{s3_root}/{cache_key(url)}") == tree_of(model)
    descriptor = S3ObjectStore(s3_root, s3_filesystem()).read_object(
        f"{strip(s3_root)}/{cache_key(url)}.descriptor.txt")
    assert descriptor is not None and f"Module: {url}".encode() in descriptor


