"""Shared fixtures: an isolated environment per test and a local origin server."""

from __future__ import annotations

import getpass
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.core.events import Event
from hubcache.plugins.registry import get_registry
from hubcache.testing import OriginServer, build_model_dir, isolate


def _keep_bytecode_out_of_tree() -> None:
    """Under ``PYTHONDONTWRITEBYTECODE``, in an environment installed without ``.pyc`` files (or
    whose ``__pycache__`` folders were cleared), every Python process the suite starts compiles
    again all it imports: the CLI runs, lease holders and racers (gcsfs: 4 s instead of 1-2 s),
    each TensorFlow import of the examples, test_tf and the benchmark smoke test (1,800 modules:
    10-17 s instead of 5-8 s). Then keep the bytecode in a cache of the suite's own under the
    user cache dir (``PYTHONPYCACHEPREFIX``, inherited by every child): nothing is written next
    to a source file, which is what the setting asks, and the code run is the same. Nothing
    changes where the installed packages have their bytecode (a fresh ``pip install``), or when
    ``PYTHONPYCACHEPREFIX`` is set already."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    if os.path.exists(importlib.util.cache_from_source(pytest.__file__)):
        return  # the installer wrote bytecode next to the sources: every process reads it
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    prefix = os.path.join(cache, "hubcache-tests", "pycache")
    # What earlier sessions compiled from pytest's temp dirs (copies of the package, plugins the
    # tests write) is never read again: those paths are new in every session.
    try:
        user = getpass.getuser()
    except (ImportError, KeyError, OSError):
        user = "unknown"
    shutil.rmtree(os.path.join(prefix, os.path.relpath(tempfile.gettempdir(), os.sep), f"pytest-of-{user}"),
                  ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    sys.pycache_prefix = prefix  # this process: the modules it imports from now on
    sys.dont_write_bytecode = False


_keep_bytecode_out_of_tree()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Every test gets its own temp dir (so `tmp` caches never collide), home cache, and no
    inherited hubcache settings; memoised resolves are forgotten between tests."""
    isolate(monkeypatch, tmp_path)
    yield
    resolver.clear_memo()


@pytest.fixture
def origin():
    with OriginServer() as server:
        yield server


@pytest.fixture
def model(tmp_path):
    return build_model_dir(tmp_path / "model", weights_bytes=200_000, shards=2)


@pytest.fixture
def events():
    """Every event hubcache emits during the test, recorded through the public ``hubcache_event``
    hook as a logging plugin would."""
    seen: list[Event] = []

    class Recorder:
        @hubcache.hookimpl
        def hubcache_event(self, event: Event) -> None:
            seen.append(event)

    registry = get_registry()
    recorder = Recorder()
    registry.pm.register(recorder, name="test-event-recorder")
    yield seen
    registry.pm.unregister(recorder)
