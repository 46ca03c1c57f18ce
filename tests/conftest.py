"""Shared fixtures: an isolated environment per test and a local origin server."""

from __future__ import annotations

import os

import pytest

from hubcache.core import resolver
from hubcache.testing import OriginServer, build_model_dir

# Settings that would leak in from the developer's shell and change what is selected.
_SETTINGS = ("HUBCACHE_BACKEND", "TFHUB_CACHE_DIR", "TFHUB_MODEL_LOAD_FORMAT", "HUBCACHE_OFFLINE",
             "HUBCACHE_MAX_SIZE", "HUBCACHE_DISABLE_PLUGINS", "TFHUB_DOWNLOAD_PROGRESS")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test gets its own temp dir (so `tmp` caches never collide), home cache, and no
    inherited hubcache settings; memoised resolves are forgotten between tests."""
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setenv("HUBCACHE_NO_PROGRESS", "1")
    os.makedirs(tmp_path / "tmp", exist_ok=True)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    resolver.clear_memo()
    yield
    resolver.clear_memo()


@pytest.fixture
def origin():
    with OriginServer() as server:
        yield server


@pytest.fixture
def model(tmp_path):
    return build_model_dir(tmp_path / "model", weights_bytes=200_000, shards=2)
