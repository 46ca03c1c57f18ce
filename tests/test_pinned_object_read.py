"""A gs:// archive read in ranges is one version of the object, against a real GCS emulator.

gcsfs fetches an object in blocks, each block its own ranged GET. The object is replaced for real
(a new generation written to fake-gcs-server) once the first 64 KiB of a download went
downstream, from the download's own read, so the replacement lands at the same point of every
run. The download must then start again from byte 0 and cache the new archive whole, or fail
with :class:`SourceChangedError` when the object keeps changing — never cache a mix of the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from typing import Iterator

import pytest

import hubcache
import gcs_emulator
from gcs_emulator import fresh_root, gcs
from hubcache.core import cache
from hubcache.core.cache import MAX_RESTARTS
from hubcache.core.errors import SourceChangedError
from hubcache.core.entry import descriptor_manifest
from hubcache.core.handles import cache_key
from hubcache.testing import (SUFFIX, ReplaceMidRead, archive_of, replacing_mid_read, same_layout_models,
                              tree_of)

#: Random (incompressible) weights: the archive spans several of the reader's 4 MiB blocks.
WEIGHTS = 12 << 20


@pytest.fixture
def models(tmp_path) -> list[str]:
    """Three models of one layout and different bytes (see ``same_layout_models``)."""
    return same_layout_models(tmp_path, weights_bytes=WEIGHTS)


@pytest.fixture
def replacer() -> Iterator:
    """``replacer(path, [archives])``: replace the object ``path`` (bucket/key) by the next archive
    once 64 KiB of each download went downstream (``hubcache.testing.replacing_mid_read``)."""
    with contextlib.ExitStack() as stack:
        def make(path: str, replacements: list[bytes], write=None) -> ReplaceMidRead:
            write = write or (lambda data: gcs().pipe_file(path, data))
            return stack.enter_context(replacing_mid_read(write, replacements))

        yield make


def manifest_of(path: str) -> dict:
    """A local entry's manifest: the end of its descriptor (``hubcache.core.entry``)."""
    with open(path + ".descriptor.txt", "rb") as f:
        found = descriptor_manifest(f.read())
    assert found is not None, "no manifest in the descriptor"
    return json.loads(found)


@pytest.mark.parametrize("fmt", ["gz", "tar"])
def test_object_replaced_mid_read_restarts_and_caches_the_new_archive_whole(models, replacer, fmt):
    url = f"{fresh_root()}/models/m{SUFFIX[fmt]}"
    old, new = archive_of(models[0], fmt), archive_of(models[1], fmt)
    assert len(old) > 3 * (4 << 20)
    gcs().pipe_file(url[5:], old)
    plugin = replacer(url[5:], [new])

    path = hubcache.resolve(url)

    assert plugin.done == 1
    # Never a mix: every file and the archive digest are the new version's.
    assert tree_of(path) == tree_of(models[1])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert manifest_of(path)["archive"]["bytes"] == len(new)
    assert len(plugin.restarts()) == 1, [e.data for e in plugin.events if e.kind == "download_retry"]
    assert url in plugin.restarts()[0].data["error"]


def test_object_that_keeps_changing_fails_with_source_changed_and_caches_nothing(models, replacer):
    url = f"{fresh_root()}/models/m.tar.gz"
    archives = [archive_of(m) for m in models]
    gcs().pipe_file(url[5:], archives[0])
    # A new version during each of the 1 + MAX_RESTARTS downloads.
    plugin = replacer(url[5:], [archives[(i + 1) % 3] for i in range(MAX_RESTARTS + 1)])

    with pytest.raises(SourceChangedError) as info:
        hubcache.resolve(url)

    assert plugin.done == MAX_RESTARTS + 1
    assert len(plugin.restarts()) == MAX_RESTARTS
    message = str(info.value)
    assert url in message and f"{MAX_RESTARTS + 1} downloads" in message
    assert info.value.hint
    entry = os.path.join(tempfile.gettempdir(), "tfhub_modules", cache_key(url))
    assert not os.path.exists(entry) and not os.path.exists(entry + ".descriptor.txt")


def _lines_for(key: str, since: int) -> list[bytes]:
    """The emulator's log lines about object ``key`` since line ``since``."""
    quoted = key.replace("/", "%2F").encode()
    marks = (b"/o/" + quoted + b" ", b"/o/" + quoted + b"?", b"prefix=" + key.encode() + b"/")
    return [line for line in gcs_emulator.log_since(since) if any(mark in line for mark in marks)]


def _requests_for(key: str, since: int) -> dict[str, int]:
    """The emulator's requests for object ``key`` since line ``since``: object metadata GETs,
    media (ranged) GETs, and listings of the key as a prefix."""
    time.sleep(0.5)  # the log is drained by a thread
    counts = {"metadata": 0, "media": 0, "listing": 0}
    for line in _lines_for(key, since):
        kind = "media" if b"/download/storage/" in line else "listing" if b"prefix=" in line else "metadata"
        counts[kind] += 1
    return counts


def test_unchanged_object_resolves_without_restarts_and_counts_its_requests(models, replacer, capsys):
    url = f"{fresh_root()}/models/m.tar.gz"
    archive = archive_of(models[0])
    gcs().pipe_file(url[5:], archive)
    plugin = replacer(url[5:], [])
    key = url[5:].split("/", 1)[1]

    path = hubcache.resolve(url)

    assert tree_of(path) == tree_of(models[0])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert plugin.restarts() == [] and [e.kind for e in plugin.events].count("download_started") == 1

    # What the pinning costs: the source hubcache reads, against the unpinned read it made before
    # (the filesystem's own file, 4 MiB blocks) of a copy (so that no late log line of one is
    # counted as the other's), each read to the end in 1 MiB reads.
    def requests_of(name: str, read) -> tuple[dict[str, int], list[bytes]]:
        time.sleep(0.5)  # the emulator's log is drained by a thread
        since = gcs_emulator.log_mark()
        read()
        return _requests_for(name, since), _lines_for(name, since)

    def read_all(f) -> None:
        with f:
            while f.read(1 << 20):
                pass

    gcs().pipe_file(url[5:] + ".copy", archive)
    pinned, lines = requests_of(key, lambda: read_all(cache.open_source(url)))
    unpinned, _ = requests_of(key + ".copy", lambda: read_all(gcs().open(url[5:] + ".copy", "rb",
                                                                         block_size=1 << 22)))
    with capsys.disabled():
        print(f"\n[pinned read] {len(archive)} bytes: unpinned {unpinned}, pinned {pinned}")
    # One ranged GET per 4 MiB block, each naming the generation, and one metadata lookup: the
    # generation comes with the size, which the unpinned file looks up too (one gcsfs info: an
    # object GET raced against a listing, 1-2 GETs and 0-1 listing in the emulator's log).
    assert pinned["media"] == -(-len(archive) // (4 << 20))
    assert pinned["metadata"] <= 2 and pinned["listing"] <= 1
    assert all(b"generation=" in line for line in lines if b"/download/storage/" in line)


def test_other_filesystems_compare_the_version_key_and_restart(models, replacer, tmp_path):
    """A filesystem without a server-side pin (here fsspec's local one, through a ``local://``
    URL): the object is overwritten in place mid-read; its ``ukey`` changes, so the read that
    follows the next block (or the end of the read) raises, and the download starts over."""
    target = tmp_path / "m.tar"
    old, new = archive_of(models[0], "tar"), archive_of(models[1], "tar")
    assert len(old) == len(new)
    target.write_bytes(old)
    url = f"local://{target}"

    def overwrite(data: bytes) -> None:
        with open(target, "r+b") as f:  # in place: the open reader sees the new bytes
            f.write(data)
        stat = os.stat(target)  # a coarse clock could leave the mtime as it was
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    plugin = replacer("", [new], write=overwrite)

    path = hubcache.resolve(url)

    assert plugin.done == 1
    assert tree_of(path) == tree_of(models[1])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert len(plugin.restarts()) == 1


def test_object_replaced_before_the_download_with_its_old_listing_cached_resolves_the_new_one(models,
                                                                                           replacer):
    """The generation is looked up afresh at open, not taken from a listing the process cached
    before the object was replaced (with the old generation's size, too)."""
    import fsspec

    url = f"{fresh_root()}/models/m.tar.gz"
    archive = archive_of(models[1])
    gcs().pipe_file(url[5:], archive_of(models[0]))
    fs = fsspec.core.url_to_fs(url)[0]  # the client hubcache reads with (fsspec's cached instance)
    fs.ls(url[5:].rsplit("/", 1)[0])  # caches the listing: the first generation and its size
    gcs().pipe_file(url[5:], archive)
    plugin = replacer(url[5:], [])

    path = hubcache.resolve(url)

    assert tree_of(path) == tree_of(models[1])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert plugin.restarts() == []
