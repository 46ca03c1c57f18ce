"""A tier chain and another host's bucket lease (issues 12 §3 and 15).

``HUBCACHE_BACKEND=home,gcs`` (or ``tmp,gcs``) against the GCS emulator, with another real
process holding the bucket's download lease for the handle's key
(:class:`hubcache.conformance.LeaseHolder`, heartbeat going):

- a host that has the model in its first tier returns the local path at once and writes nothing
  under the key in the bucket (issue 12);
- a host whose tiers all miss waits for the holder, as hosts that start together must for the
  fleet to download once (issue 15), and downloads itself only once the lease is gone or after
  ``HUBCACHE_LOCK_TIMEOUT`` (then leaving the bucket to the holder).

Without a lease the copy up fills the bucket. Copies *down* into the local tier wait for its
(local) lock: that copy is what makes the path this resolve returns.
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
def test_a_fresh_download_waits_for_the_host_holding_the_bucket_lease(chain, bucket, origin, model, tmp_path,
                                                                      monkeypatch, events):
    """Hosts that miss together download once (issue 15): while another host holds the bucket's
    lease for the key (downloading the same model), a host whose tiers all miss waits for it
    instead of downloading too. Here the holder gives up without committing: the waiter then takes
    the lease, downloads once, and fills its own tier and the bucket."""
    import threading

    monkeypatch.setenv("HUBCACHE_BACKEND", chain)
    url = origin.add("/m.tar.gz", archive_of(model))
    result: dict = {}

    def resolve() -> None:
        try:
            result["path"] = hubcache.resolve(url)
        except Exception as error:  # reported below
            result["error"] = error

    with holding(url, tmp_path) as holder:
        resolver = threading.Thread(target=resolve)
        resolver.start()
        deadline = time.monotonic() + 10
        while not kinds(events, "waiting") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert resolver.is_alive() and origin.count() == 0, "downloaded while another host held the lease"
    resolver.join(30)
    assert not resolver.is_alive() and "error" not in result, result
    first, gcs = tiers()
    key = cache_key(url)
    assert result["path"] == first.store.entry_path(key) and tree_of(result["path"]) == tree_of(model)
    assert origin.count() == 1
    assert read_tree(gcs.store.entry_path(key)) == tree_of(model)
    waiting = kinds(events, "waiting")
    assert [e.backend for e in waiting] == ["gcs"] and f"pid {holder.pid}" in waiting[0].data["holder"]
    assert [e.backend for e in kinds(events, "copied")] == ["gcs"] and kinds(events, "copy_skipped") == []


def test_after_the_lock_timeout_a_host_downloads_for_itself(bucket, origin, model, tmp_path, monkeypatch, events):
    """A holder that keeps its lease alive past ``HUBCACHE_LOCK_TIMEOUT`` does not fail the
    resolve: the host downloads into its own tier and leaves the bucket to the holder."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", "1.5")
    url = origin.add("/m.tar.gz", archive_of(model))
    with holding(url, tmp_path) as holder:
        started = time.monotonic()
        path = hubcache.resolve(url)
        took = time.monotonic() - started
        home, gcs = tiers()
        assert 1.5 <= took < 1.5 + AT_ONCE, took
        assert path == home.store.entry_path(holder.key) and tree_of(path) == tree_of(model)
        assert origin.count() == 1
        assert_left_to(holder, gcs.store)
    assert [e.backend for e in kinds(events, "copy_skipped")] == ["gcs"]


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


def test_a_dead_lease_is_taken_over_without_waiting(bucket, origin, model, monkeypatch, events):
    """A lease whose holder died long ago (its heartbeat time 700 s old) does not keep the bucket
    empty: the host takes it over without waiting for its TTL (after the random pause of at most
    ``TAKEOVER_SPREAD`` that spreads a fleet's takeovers) and fills the bucket."""
    from hubcache.stores.objectstore import TAKEOVER_SPREAD

    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/m.tar.gz", archive_of(model))
    gcs = tiers()[1].store
    gcs.create_object(gcs._lease_path(cache_key(url)), json.dumps(
        {"owner": "a crashed host", "lease": "x", "beat": 1, "time": time.time() - 700, "ttl": 30}).encode())
    started = time.monotonic()
    hubcache.resolve(url)
    took = time.monotonic() - started
    assert took < AT_ONCE + TAKEOVER_SPREAD, f"waited {took:.1f} s"
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
