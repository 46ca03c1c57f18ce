"""A local tier that has the model never waits for a bucket lease held elsewhere (issue 12 §3).

``HUBCACHE_BACKEND=home,gcs`` (or ``tmp,gcs``) against the GCS emulator, with another real
process holding the bucket's download lease for the handle's key
(:class:`hubcache.conformance.LeaseHolder`, heartbeat going): the host that has the model in its
first tier returns the local path at once, skips the copy up (a ``copy_skipped`` event) and
writes nothing under the key in the bucket; the holder fills it. Without a lease the copy up fills
the bucket as before. Copies *down* into the local tier still wait for its (local) lock: that copy
is what makes the path this resolve returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import hubcache
from gcs_emulator import fresh_root  # first: it configures gcsfs before anything imports gcsfs
from hubcache.conformance import LeaseHolder
from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, read_tree, tree_of
from test_tiers import fresh_resolve, tiers

#: Far longer than any test here may take: a resolve that waits for the lease would show.
LOCK_TIMEOUT = 60.0
#: A resolve that does not wait (a local download of a 400 KB model and a few bucket requests).
AT_ONCE = 2.0


@pytest.fixture
def bucket(monkeypatch):
    """A fresh bucket root as ``TFHUB_CACHE_DIR``, a long lock timeout."""
    root = fresh_root()
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", str(LOCK_TIMEOUT))
    return root


def holding(url: str, tmp_path) -> LeaseHolder:
    """Another process holding the bucket's lease for ``url``'s key (the chain's last tier)."""
    holder = LeaseHolder(tiers()[-1], str(tmp_path), lease_ttl=30.0)
    holder.key = cache_key(url)
    return holder


def assert_left_to(holder: LeaseHolder, store) -> None:
    """Nothing of the key in the bucket but the holder's own, live lease."""
    key = holder.key
    assert store.list_objects(store.object_path(key)) == {}
    assert store.read_object(store.object_path(f"{key}.manifest.json")) is None
    assert store.read_object(store.object_path(f"{key}.descriptor.txt")) is None
    assert json.loads(store.read_object(store._lease_path(key)))["lease"] == holder.lease


def kinds(events, kind: str) -> list:
    return [e for e in events if e.kind == kind]


@pytest.mark.parametrize("chain", ["home,gcs", "tmp,gcs"])
def test_a_fresh_download_does_not_wait_for_the_bucket_lease(chain, bucket, origin, model, tmp_path,
                                                             monkeypatch, events):
    """The host downloads from the origin into its first tier while another host holds the
    bucket's lease (downloading the same model): it returns the local path at once and leaves the
    bucket to the holder."""
    monkeypatch.setenv("HUBCACHE_BACKEND", chain)
    url = origin.add("/m.tar.gz", archive_of(model))
    with holding(url, tmp_path) as holder:
        started = time.monotonic()
        path = hubcache.resolve(url)
        took = time.monotonic() - started
        first, gcs = tiers()
        print(f"\n{chain}: resolved in {took:.2f} s with the bucket lease held elsewhere "
              f"(lock timeout {LOCK_TIMEOUT:.0f} s)")
        assert took < AT_ONCE, f"waited {took:.1f} s for the bucket lease"
        assert path == first.store.entry_path(holder.key) and tree_of(path) == tree_of(model)
        assert origin.count() == 1
        assert_left_to(holder, gcs.store)
    assert kinds(events, "copied") == [] and kinds(events, "waiting") == []
    skipped = kinds(events, "copy_skipped")
    assert [(e.backend, e.data["path"]) for e in skipped] == [("gcs", gcs.store.entry_path(holder.key))]
    assert f"pid {holder.pid}" in skipped[0].data["reason"]


def test_a_hit_in_home_returns_at_once_and_writes_nothing_in_the_bucket(bucket, origin, model, tmp_path,
                                                                      monkeypatch, events):
    """A host whose home tier has the model (not the bucket) resolves at once while another host
    holds the bucket's lease, and writes nothing there."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    local = hubcache.resolve(url)
    assert tiers()[1].store.remove(cache_key(url))  # in home only now
    with holding(url, tmp_path) as holder:
        started = time.monotonic()
        path = fresh_resolve(url)
        took = time.monotonic() - started
        assert took < AT_ONCE, f"waited {took:.1f} s"
        assert path == local and origin.count() == 1
        assert_left_to(holder, tiers()[1].store)
    assert kinds(events, "waiting") == []


def test_without_a_lease_the_copy_up_fills_the_bucket(bucket, origin, model, monkeypatch, events):
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    home, gcs = tiers()
    bucket_path = gcs.store.entry_path(cache_key(url))
    assert path == home.store.entry_path(cache_key(url))
    assert read_tree(bucket_path) == tree_of(model)
    assert gcs.store.read_manifest(cache_key(url)) is not None
    assert gcs.store.read_object(gcs.store._lease_path(cache_key(url))) is None, "the lease was released"
    assert [(e.backend, e.data["path"]) for e in kinds(events, "copied")] == [("gcs", bucket_path)]
    assert kinds(events, "copy_skipped") == []


def test_the_holder_fills_the_bucket_and_the_next_host_gets_it_from_there(bucket, origin, model, tmp_path,
                                                                        monkeypatch):
    """The skip loses nothing: once the holder is gone, a host with an empty home (and the
    bucket still empty, the holder having failed) downloads and fills the bucket itself."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    with holding(url, tmp_path):
        hubcache.resolve(url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    path2 = fresh_resolve(url)
    assert path2.startswith(str(tmp_path / "host2-cache")) and origin.count() == 2
    assert read_tree(tiers()[1].store.entry_path(cache_key(url))) == tree_of(model)


def test_a_dead_lease_is_taken_over_without_waiting(bucket, origin, model, monkeypatch, events):
    """A lease whose holder died long ago (its heartbeat time 700 s old) does not keep the bucket
    empty: the copy up takes it over at once and fills the bucket."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    gcs = tiers()[1].store
    gcs.create_object(gcs._lease_path(cache_key(url)), json.dumps(
        {"owner": "a crashed host", "lease": "x", "beat": 1, "time": time.time() - 700, "ttl": 30}).encode())
    started = time.monotonic()
    hubcache.resolve(url)
    took = time.monotonic() - started
    assert took < AT_ONCE, f"waited {took:.1f} s"
    assert read_tree(gcs.entry_path(cache_key(url))) == tree_of(model)
    assert kinds(events, "copy_skipped") == []


_HOME_LOCK = textwrap.dedent("""
    import sys, time
    from hubcache.core import resolver
    store = resolver.current_backend()[1].tiers[0].store
    with store.lock(sys.argv[1], lambda holder: None):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_copy_down_still_waits_for_the_local_lock(bucket, origin, model, tmp_path, monkeypatch, events):
    """A copy down into home waits while another local process holds home's lock for the key
    (a short, local wait): returning the bucket's gs:// path instead would serve the model from
    the network."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(url)  # home and bucket
    home = tiers()[0]
    home.store.release(cache_key(url))
    assert home.store.remove(cache_key(url))
    hold = 1.5
    child = subprocess.Popen([sys.executable, "-c", _HOME_LOCK, cache_key(url), str(hold)],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert child.stdout.readline().strip() == "held"
        started = time.monotonic()
        path = fresh_resolve(url)
        took = time.monotonic() - started
    finally:
        child.wait(30)
    assert path == home.store.entry_path(cache_key(url)) and tree_of(path) == tree_of(model)
    assert took >= hold / 2, f"returned after {took:.2f} s: did not wait for the local lock"
    assert origin.count() == 1, "the bucket served the copy"
    assert [e.backend for e in kinds(events, "waiting")] == ["home"]
    assert [e.backend for e in kinds(events, "copied")][-1] == "home"


_TIER_LOCK = textwrap.dedent("""
    import sys
    from hubcache.core import resolver
    store = resolver.current_backend()[1].tiers[int(sys.argv[2])].store
    with store.lock(sys.argv[1], lambda holder: None):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_copy_up_into_a_local_tier_does_not_wait_either(origin, model, monkeypatch, events):
    """The same for a later tier that is a local directory (``home,tmp``): another process holding
    its lock (until told to stop) makes the copy up skip, not wait."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,tmp")
    monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", str(LOCK_TIMEOUT))
    url = origin.add("/m.tar.gz", archive_of(model))
    child = subprocess.Popen([sys.executable, "-c", _TIER_LOCK, cache_key(url), "1"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert child.stdout.readline().strip() == "held"
        started = time.monotonic()
        path = hubcache.resolve(url)
        took = time.monotonic() - started
    finally:
        child.stdin.close()
        child.wait(30)
    home, tmp = tiers()
    assert took < AT_ONCE, f"waited {took:.1f} s for tmp's lock"
    assert path == home.store.entry_path(cache_key(url)) and tree_of(path) == tree_of(model)
    assert tmp.store.lookup(cache_key(url), url) is None, "tmp is left to the lock's holder"
    skipped = kinds(events, "copy_skipped")
    assert [(e.backend, e.data["path"]) for e in skipped] == [("tmp", tmp.store.entry_path(cache_key(url)))]
    assert f"pid {child.pid}" in skipped[0].data["reason"]
