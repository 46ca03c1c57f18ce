"""Many writers, one entry. A bucket cache is written by a whole fleet at once: hosts pause (a
stopped VM, a swapped-out process, a debugger) past their lease's TTL and resume, the origin
republishes a model while they do, and a thousand hosts may wait on one entry. Played here against
fake-gcs-server with real processes and real ``SIGSTOP``/``SIGCONT``: writer A is stopped in the
middle of its upload, or just before its commit, while the origin republishes the model and B takes
the lease over and commits the new version. Every upload is conditional on the object version the
writer knows (its listing, taken before its last lease check, or its own writes), so A's resumed
writes are refused: A withdraws what it wrote and returns B's entry. The request rate of one waiting
host is measured, and from it the load of a fleet: GCS allows about one update per second per
object name and starts a new bucket near 5,000 reads per second.

A waiting host reads the entry's manifest with exponential backoff and jitter (each sleep drawn
from the upper half of the step, the step capped at 1 s: about 1.33 reads a second at the cap) and
the lease a few times per TTL of its holder; the holder rewrites its lease at most once a second.
With the default TTL of 30 s that is about 1.33 + 4/30 ≈ 1.47 reads a second per waiting host, so
1,000 waiting hosts send about 1,470 reads a second and 10,000 about 14,700: the first within a new
bucket's 5,000, the second not, until GCS scales the bucket up (it doubles the rate every 20
minutes). A fleet that large should stagger its start, or keep the model in a local tier first.
"""

from __future__ import annotations

import pytest

from gcs_emulator import emulator_url, fresh_root
from hubcache.backends.gcs import GcsBackend
from hubcache.conformance import fleet_takeover, stalled_writer_republished, waiter_request_rate
from hubcache.core.config import load_config
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer, archive_of, build_model_dir, tree_of, read_tree

SCENARIO = "19. Many writers, one entry"
LEASE_TTL = 1.5


@pytest.fixture
def backend():
    emulator_url()
    return GcsBackend(load_config().replace(cache_dir=fresh_root(), retries=1, timeout=10.0))


@pytest.mark.parametrize("stall_at", ["upload", "commit"])
def test_a_stalled_writer_never_overwrites_a_committed_entry(backend, tmp_path, stall_at, figures):
    """Writer A (a real process) stopped with SIGSTOP mid-upload (before its second object) or
    at its commit (after its last lease check, before it creates the descriptor holding the manifest); the origin
    republishes the model; B takes the lease over and commits version 2; A resumed with SIGCONT:
    none of A's writes lands, A withdraws its objects and returns B's entry, which verifies."""
    import hashlib

    old = build_model_dir(tmp_path / "v1", weights_bytes=200_000, shards=2, seed=1)
    new = build_model_dir(tmp_path / "v2", weights_bytes=300_000, shards=3, seed=2)
    with OriginServer() as origin:
        url = origin.add("/republished.tar.gz", archive_of(old))
        new_archive = archive_of(new)
        m = stalled_writer_republished(backend, str(tmp_path), url, LEASE_TTL, stall_at,
                                       republish=lambda: origin.add("/republished.tar.gz", new_archive))
        downloads = origin.count("/republished.tar.gz")
    key = cache_key(url)
    store = GcsBackend(backend.config).store
    manifest = store.read_manifest(key)
    problems = store.verify(key, full=True)
    objects = set(store._relative(key, store.list_objects(store.object_path(key))))
    assert m["a"]["event"] == "resolved" and m["a"]["path"] == m["b_path"], m["a"]
    assert manifest.archive["sha256"] == hashlib.sha256(new_archive).hexdigest() == m["a"]["sha256"]
    assert problems == [] and read_tree(store.entry_path(key)) == tree_of(new)
    assert objects == {f.path for f in manifest.files}
    assert downloads == 2 and m["a_lost"]
    figures.update(run=f"gcs on fake-gcs-server; HUBCACHE_LEASE_TTL={LEASE_TTL:g} s; A stopped at {stall_at}, "
                       "origin republished, B resolves, A resumed",
                   stopped_at=stall_at, b_committed_after_seconds=round(m["b_seconds"], 2),
                   a_answered_after_sigcont_seconds=round(m["a_seconds"], 2),
                   a_learned_lease_lost=m["a_lost"], a_returned_b_entry=m["a"]["path"] == m["b_path"],
                   verify_full_problems=len(problems), objects_not_in_manifest=len(objects - {f.path for f in manifest.files}),
                   origin_downloads=downloads)


def test_one_waiting_host_request_rate(backend, tmp_path, figures):
    """One host waits on an entry whose lease another process holds (TTL 30 s; the waiter's own
    TTL 0.4 s): its manifest reads per second, lease reads, and how soon it sees the commit; the
    fleet's load computed from the measured rate (plus the lease reads of the default 30 s TTL)."""
    m = waiter_request_rate(backend, str(tmp_path))
    # Steps of 0.125-0.25 s from one read's start to the next (objectstore.MAX_POLL): 5.3 reads/s.
    assert m["manifest_rate"] <= 6.2 and m["steady_rate"] <= 6.0 and m["lease_reads"] <= 3, m
    assert m["latency"] < 1.0
    per_host = m["steady_rate"] + 4 / 30.0
    figures.update(run=f"one waiter for {m['window']:g} s on a live lease held by another process",
                   manifest_reads_per_second=round(m["manifest_rate"], 2),
                   steady_manifest_reads_per_second=round(m["steady_rate"], 2),
                   lease_reads=m["lease_reads"], commit_noticed_after_seconds=round(m["latency"], 2),
                   reads_per_second_1000_hosts=round(1000 * per_host),
                   reads_per_second_10000_hosts=round(10000 * per_host))


def test_a_fleet_takes_a_dead_lease_over_with_few_rewrites(backend, figures):
    """Sixteen waiters (each with its own store) find the same dead lease at once: one takes it
    over, and the lease object receives a few takeover rewrites, not one per waiter."""
    m = fleet_takeover(backend, 16)
    assert m["winners"] == 1 and 1 <= m["rewrites"] <= 4, m
    figures.update(run="16 waiters released at once on a lease dead for 1,000 s", waiters=m["waiters"],
                   lease_holders=m["winners"], takeover_rewrites=m["rewrites"])
