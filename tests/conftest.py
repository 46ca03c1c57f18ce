"""Shared fixtures: an isolated environment per test and a local origin server."""

from __future__ import annotations

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.core.events import Event
from hubcache.plugins.registry import get_registry
from hubcache.testing import OriginServer, build_model_dir, isolate


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
