"""Tier chains (``HUBCACHE_BACKEND=home,tmp`` locally, ``home,gcs`` against the GCS emulator):
read-through, copy-down without the origin, download once and fill every tier, unwritable tiers.

The origin's request count is the proof of who served the bytes.
"""

from __future__ import annotations

import os

import pytest

import hubcache
from gcs_emulator import fresh_root  # first: it configures gcsfs before anything imports gcsfs
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.plugins.registry import get_registry
from hubcache.testing import archive_of, read_tree, tree_of


@pytest.fixture
def copies():
    """``copied`` events seen during the test: (tier, path)."""
    seen = []

    class Recorder:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            if event.kind == "copied":
                seen.append((event.backend, event.data["path"]))

    get_registry().pm.register(Recorder(), name="test-copies")
    yield seen
    get_registry().pm.unregister(name="test-copies")


def tiers():
    return resolver.current_backend()[1].tiers


def fresh_resolve(url: str) -> str:
    """Resolve as a new process would (nothing memoised)."""
    resolver.clear_memo()
    return hubcache.resolve(url)


@pytest.fixture
def chain(monkeypatch):
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,tmp")


def test_miss_everywhere_downloads_once_and_fills_every_tier(chain, origin, model, copies):
    url = origin.add("/m.tar.zst", archive_of(model, "zst"))
    path = hubcache.resolve(url)
    home, tmp = tiers()
    assert path == home.store.entry_path(cache_key(url))
    assert origin.count() == 1
    assert tree_of(path) == tree_of(model) == tree_of(tmp.store.entry_path(cache_key(url)))
    assert copies == [("tmp", tmp.store.entry_path(cache_key(url)))]
    assert tmp.store.read_manifest(cache_key(url)).to_json() == home.store.read_manifest(cache_key(url)).to_json()


def test_hit_in_a_later_tier_is_copied_down_without_the_origin(chain, origin, model, copies):
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(url)
    home, tmp = tiers()
    home.store.remove(cache_key(url))
    copies.clear()
    path = fresh_resolve(url)
    assert path == home.store.entry_path(cache_key(url)) and tree_of(path) == tree_of(model)
    assert origin.count() == 1, "the second tier served the copy"
    assert copies == [("home", path)]
    # The first tier now answers by itself: no copies, no origin.
    copies.clear()
    assert fresh_resolve(url) == path and copies == [] and origin.count() == 1


def test_copy_down_works_offline_with_the_origin_stopped(chain, origin, model, monkeypatch):
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(url)
    tiers()[0].store.remove(cache_key(url))
    origin.stop()
    monkeypatch.setenv("HUBCACHE_OFFLINE", "1")
    path = fresh_resolve(url)
    assert path == tiers()[0].store.entry_path(cache_key(url)) and tree_of(path) == tree_of(model)
    with pytest.raises(hubcache.OfflineError, match="not in any tier of home,tmp"):
        fresh_resolve(url + "?nope")


def test_damaged_source_tier_is_a_miss_and_the_origin_serves(chain, origin, model, copies):
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(url)
    home, tmp = tiers()
    home.store.remove(cache_key(url))
    copies.clear()
    weights = os.path.join(tmp.store.entry_path(cache_key(url)), "variables", "variables.data-00000-of-00002")
    data = bytearray(open(weights, "rb").read())
    data[100] ^= 0xFF  # same size, other bytes: only the CRC check of the copy notices
    open(weights, "wb").write(bytes(data))
    path = fresh_resolve(url)
    # Not copied, not served: downloaded again into the first tier.
    assert copies == [] and path == home.store.entry_path(cache_key(url))
    assert tree_of(path) == tree_of(model) and origin.count() == 2


def test_unwritable_first_tier_is_read_and_skipped_for_writes(chain, origin, model, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("the home cache cannot be created under a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert path == tiers()[1].store.entry_path(cache_key(url)) and tree_of(path) == tree_of(model)
    assert fresh_resolve(url) == path and origin.count() == 1


def test_management_commands_see_every_tier(chain, origin, model, capsys):
    from hubcache.cli import main

    url = origin.add("/m.tar.gz", archive_of(model))
    assert main(["prefetch", url]) == 0
    capsys.readouterr()
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "home: 1 entry" in out and "tmp: 1 entry" in out
    assert main(["rm", url]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()] == ["[home]", "[tmp]"]


def test_home_and_gcs_the_bucket_serves_a_new_host(origin, model, monkeypatch, tmp_path, copies):
    root = fresh_root()
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/fleet.tar.gz", archive_of(model))
    path = hubcache.resolve(url)  # host 1: downloads once, fills home and the bucket
    assert origin.count() == 1
    bucket_path = tiers()[1].store.entry_path(cache_key(url))
    assert bucket_path.startswith("gs://") and read_tree(bucket_path) == tree_of(model)
    assert copies == [("gcs", bucket_path)]
    # Host 2: an empty home cache; the bucket serves it, the origin is not contacted.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    copies.clear()
    path2 = fresh_resolve(url)
    assert path2 != path and path2.startswith(str(tmp_path / "host2-cache"))
    assert tree_of(path2) == tree_of(model)
    assert origin.count() == 1, "the bucket served host 2"
    assert copies == [("home", path2)]


def test_copy_down_respects_the_first_tiers_budget(chain, origin, model, tmp_path, monkeypatch):
    from hubcache.testing import build_model_dir

    other = origin.add("/other.tar.gz", archive_of(build_model_dir(tmp_path / "other", seed=5)))
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(other)
    hubcache.resolve(url)
    home = tiers()[0]
    for key in (cache_key(other), cache_key(url)):
        home.store.release(key)  # as if those resolves were made by processes that have exited
    home.store.remove(cache_key(url))
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", str(sum(len(v) for v in tree_of(model).values())))
    path = fresh_resolve(url)  # copied down from tmp; `other` no longer fits in home
    assert path == tiers()[0].store.entry_path(cache_key(url))
    assert [e.key for e in tiers()[0].store.entries()] == [cache_key(url)]
    assert origin.count() == 2
