"""An s3:// archive read in ranges is one version of the object, against a real S3 server (moto's).

s3fs fetches an object in blocks, each block its own ranged GET, each sent with
``If-Match: <the ETag seen at open>``; moto, as S3, answers ``412 Precondition Failed`` once the
object was replaced. The object is replaced for real (a PUT to moto) once the first 64 KiB of a
download went downstream, from the download's own read. The download must then start again from
byte 0 and cache the new archive whole, or fail with :class:`SourceChangedError` when the object
keeps changing — never a mix, never an error that does not say the object changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from typing import Iterator

import pytest

import hubcache
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
def client(moto_endpoint, bucket):
    """The test's own s3fs client of moto (not hubcache's)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="testing", secret="testing",
                             skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def models(tmp_path) -> list[str]:
    """Three models of one layout and different bytes (see ``same_layout_models``)."""
    return same_layout_models(tmp_path, weights_bytes=WEIGHTS)


@pytest.fixture
def replacer(client) -> Iterator:
    """``replacer(path, [archives])``: replace the object ``path`` (bucket/key) by the next archive
    once 64 KiB of each download went downstream (``hubcache.testing.replacing_mid_read``)."""
    with contextlib.ExitStack() as stack:
        def make(path: str, replacements: list[bytes], write=None) -> ReplaceMidRead:
            write = write or (lambda data: client.pipe_file(path, data))
            return stack.enter_context(replacing_mid_read(write, replacements))

        yield make


def manifest_of(path: str) -> dict:
    """A local entry's manifest: the end of its descriptor (``hubcache.core.entry``)."""
    with open(path + ".descriptor.txt", "rb") as f:
        found = descriptor_manifest(f.read())
    assert found is not None, "no manifest in the descriptor"
    return json.loads(found)


def archive_url(bucket: str, suffix: str = ".tar.gz") -> str:
    return f"s3://{bucket}/{uuid.uuid4().hex[:12]}/m{suffix}"


@pytest.mark.parametrize("fmt", ["gz", "tar"])
def test_object_replaced_mid_read_restarts_and_caches_the_new_archive_whole(bucket, client, models, replacer,
                                                                           fmt):
    url = archive_url(bucket, SUFFIX[fmt])
    old, new = archive_of(models[0], fmt), archive_of(models[1], fmt)
    assert len(old) > 3 * (4 << 20)
    client.pipe_file(url[5:], old)
    plugin = replacer(url[5:], [new])

    path = hubcache.resolve(url)  # the default tmp backend; the archive is read from moto

    assert plugin.done == 1
    assert tree_of(path) == tree_of(models[1])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(new).hexdigest()
    assert len(plugin.restarts()) == 1, [e.data for e in plugin.events if e.kind == "download_retry"]
    assert url in plugin.restarts()[0].data["error"]


def test_object_that_keeps_changing_fails_with_source_changed_and_caches_nothing(bucket, client, models,
                                                                                 replacer):
    url = archive_url(bucket)
    archives = [archive_of(m) for m in models]
    client.pipe_file(url[5:], archives[0])
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


def test_object_replaced_before_the_download_with_its_old_listing_cached_resolves_the_new_one(
        bucket, client, models, replacer, capsys):
    """The version is looked up afresh at open, not taken from a listing the process cached
    before the object was replaced (s3fs would send that listing's ETag in If-Match: a 412 on the
    first block). The object does not change during the download: no restart."""
    import fsspec

    url = archive_url(bucket)
    archive = archive_of(models[1])
    client.pipe_file(url[5:], archive_of(models[0]))
    fs = fsspec.core.url_to_fs(url)[0]  # the client hubcache reads with (fsspec's cached instance)
    fs.ls(url[5:].rsplit("/", 1)[0])  # caches the listing, with the first version's ETag and size
    client.pipe_file(url[5:], archive)
    plugin = replacer(url[5:], [])

    path = hubcache.resolve(url)

    assert tree_of(path) == tree_of(models[1])
    assert manifest_of(path)["archive"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert plugin.restarts() == [] and [e.kind for e in plugin.events].count("download_started") == 1

    # What the pinning costs: the requests of the source hubcache reads, read to the end in 1 MiB
    # reads, seen by a listener on the botocore events of the s3fs client it reads with: a spy,
    # it changes nothing.
    s3 = fs.s3
    sent: list[tuple[str, dict]] = []

    def record(request, **_) -> None:
        sent.append((request.method, dict(request.headers)))

    s3.meta.events.register("before-send.s3", record)
    try:
        with cache.open_source(url) as source:
            while source.read(1 << 20):
                pass
    finally:
        s3.meta.events.unregister("before-send.s3", record)
    heads = [h for m, h in sent if m == "HEAD"]
    gets = [h for m, h in sent if m == "GET"]
    with capsys.disabled():
        print(f"\n[s3 pinned read] {len(archive)} bytes: {len(heads)} HEAD, {len(gets)} ranged GET")
    # One HEAD (the ETag and size, which the unpinned file took too) and one ranged GET per block
    # (s3fs makes them at least 5 MiB), each sent with If-Match: the ETag.
    assert len(heads) == 1
    assert 1 < len(gets) <= -(-len(archive) // (4 << 20))
    assert all(h.get("If-Match") and h.get("Range") for h in gets), gets
