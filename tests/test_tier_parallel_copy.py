"""A ``home,gcs`` copy-down reads the bucket entry's objects in parallel ranges, against the GCS emulator.

``core/tiers.py`` reads a bucket entry's files ahead with ``download/objectfiles.py``:
``HUBCACHE_CONNECTIONS`` ranged reads at once, each at most ``HUBCACHE_CHUNK_SIZE`` bytes (a small
file is one range, a large one several), into one bounded ring, and writes them into the local
tier in order, still checking every file's size and CRC-32 against the manifest. These tests
count the emulator's media requests (each object read once, in the expected ranges), check the
ring's bound, and damage objects behind the manifest (longer, shorter, other bytes): the copy is
refused whichever range meets the damage, and the origin serves the handle.
"""

from __future__ import annotations

import time

import pytest

import gcs_emulator
import hubcache
from gcs_emulator import fresh_root, gcs
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.download import objectfiles
from hubcache.testing import archive_of, build_model_dir, instances_of, tree_of

CHUNK = 256 << 10
CONNECTIONS = 3


@pytest.fixture
def made():
    """The read-aheads built (``objectfiles.ParallelFiles``)."""
    with instances_of(objectfiles.ParallelFiles) as built:
        yield built


@pytest.fixture
def fleet(origin, tmp_path, monkeypatch):
    """Host 1 resolved a model (weights in two 768 KiB shards) through ``home,gcs``; returns
    ``(url, key, bucket entry path (bucket/prefix/key), manifest, model)``; the test then is host 2,
    with the origin's request counts reset."""
    model = build_model_dir(tmp_path / "model", weights_bytes=3 * 512 << 10, shards=2)
    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", str(CONNECTIONS))
    monkeypatch.setenv("HUBCACHE_CHUNK_SIZE", str(CHUNK))
    url = origin.add("/fleet.tar.gz", archive_of(model))
    hubcache.resolve(url)
    gcs_tier = resolver.current_backend()[1].tiers[1]
    key = cache_key(url)
    manifest = gcs_tier.store.read_manifest(key)
    assert manifest is not None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    resolver.clear_memo()
    origin.reset_counts()
    return url, key, gcs_tier.store.object_path(key), manifest, model


def _media_requests(entry: str, since: int) -> dict[str, int]:
    """Media GETs per object of the entry since log line ``since``."""
    time.sleep(0.5)  # the log is drained by a thread
    prefix = entry.split("/", 1)[1].replace("/", "%2F") + "%2F"
    counts: dict[str, int] = {}
    for line in gcs_emulator.log_since(since):
        if b"/download/storage/" not in line:
            continue
        text = line.decode(errors="replace")
        at = text.find(prefix)
        if at >= 0:
            name = text[at + len(prefix):].split("?")[0].split()[0].replace("%2F", "/")
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_copy_down_reads_each_object_once_in_ranges_into_a_bounded_ring(fleet, origin, made):
    url, key, entry, manifest, model = fleet
    time.sleep(0.5)
    since = gcs_emulator.log_mark()

    path = hubcache.resolve(url)

    assert tree_of(path) == tree_of(model) and origin.count() == 0
    # At most two chunks per connection: its current one and the next one it requested early.
    assert len(made) == 1 and made[0]._places == 2 * CONNECTIONS
    assert 0 < made[0].peak_buffered <= 2 * CONNECTIONS * CHUNK
    # One ranged GET per CHUNK of each file (one for a small or empty one): every object read
    # once, a large one in several ranges.
    expected = {r.path: max(1, -(-r.size // CHUNK)) for r in manifest.files}
    assert max(expected.values()) >= 3
    assert _media_requests(entry, since) == expected


DAMAGE = {
    "1 byte longer": lambda data: data + b"!",
    "1 byte shorter": lambda data: data[:-1],
    "bytes changed in its second range": lambda data: data[:CHUNK + 10] + bytes([data[CHUNK + 10] ^ 1]) + data[CHUNK + 11:],
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_large_object_changed_behind_the_manifest_is_refused_in_parallel(case, fleet, origin, made):
    url, key, entry, manifest, model = fleet
    weights = max(manifest.files, key=lambda r: r.size).path
    assert max(manifest.files, key=lambda r: r.size).size > 2 * CHUNK
    data = gcs().cat_file(f"{entry}/{weights}")
    gcs().pipe_file(f"{entry}/{weights}", DAMAGE[case](data))

    path = hubcache.resolve(url)

    # The bucket's entry was a miss: the origin served the handle, its bytes are the model's.
    assert made, "the copy was read ahead in parallel"
    assert origin.count() > 0
    assert tree_of(path) == tree_of(model)


def test_one_connection_reads_each_file_as_one_stream(fleet, origin, made, monkeypatch):
    url, key, entry, manifest, model = fleet
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", "1")

    path = hubcache.resolve(url)

    assert tree_of(path) == tree_of(model) and origin.count() == 0
    assert made == []
