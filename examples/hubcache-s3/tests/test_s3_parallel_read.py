"""An s3:// archive read over several ranged reads at once, against a real S3 server (moto's).

hubcache reads an object of at least two chunks (``HUBCACHE_CHUNK_SIZE``) with
``HUBCACHE_CONNECTIONS`` worker threads, each calling the ranged read of the s3fs file opened
once, which sends ``If-Match: <the ETag seen at open>`` with every GET; moto, as S3, answers
``412 Precondition Failed`` once the object was replaced. Replaced mid-read, the read is a
``SourceChangedError``, never a splice of two versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Iterator

import pytest

import hubcache
from hubcache.core.entry import descriptor_manifest
from hubcache.core.errors import SourceChangedError
from hubcache.download import objectread
from hubcache.download.fetch import open_source
from hubcache.testing import (ReplaceMidRead, archive_of, instances_of, replacing_mid_read, same_layout_models,
                              tree_of)

CHUNK = 256 << 10
CONNECTIONS = 3


@pytest.fixture
def client(moto_endpoint, bucket):
    """The test's own s3fs client of moto (not hubcache's)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="testing", secret="testing",
                             skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def made() -> Iterator[list]:
    """The parallel readers built (``objectread.ParallelRanges``), to check one was used."""
    with instances_of(objectread.ParallelRanges) as built:
        yield built


def _url(bucket: str, name: str = "big.bin") -> str:
    return f"s3://{bucket}/{uuid.uuid4().hex[:12]}/{name}"


def test_large_object_is_read_in_parallel_with_if_match_in_order(bucket, client, made):
    import fsspec

    url = _url(bucket)
    body = os.urandom(3 * 1024 * 1024 + 777)
    client.pipe_file(url[5:], body)
    s3 = fsspec.core.url_to_fs(url)[0].s3  # the client hubcache reads with: a spy on its requests
    sent: list[dict] = []

    def record(request, **_) -> None:
        if request.method == "GET":
            sent.append(dict(request.headers))

    s3.meta.events.register("before-send.s3", record)
    try:
        with open_source(url, connections=CONNECTIONS, chunk_size=CHUNK) as source:
            data = bytearray()
            while piece := source.read(100_000):
                data += piece
    finally:
        s3.meta.events.unregister("before-send.s3", record)

    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
    assert len(made) == 1 and 0 < made[0].peak_buffered <= CONNECTIONS * CHUNK
    assert len(sent) == -(-len(body) // CHUNK)
    assert all(h.get("If-Match") and h.get("Range") for h in sent), sent


def test_object_replaced_during_a_parallel_read_is_source_changed(bucket, client, made):
    url = _url(bucket)
    old, new = os.urandom(4 << 20), os.urandom(4 << 20)
    client.pipe_file(url[5:], old)
    source = open_source(url, connections=CONNECTIONS, chunk_size=CHUNK)
    got = bytearray()
    with pytest.raises(SourceChangedError) as info, source:
        got += source.read(1000)
        client.pipe_file(url[5:], new)
        while data := source.read(100_000):
            got += data
    assert made and url in str(info.value) and "changed" in str(info.value)
    assert bytes(got) == old[:len(got)]


@pytest.fixture
def replacer(client) -> Iterator:
    with contextlib.ExitStack() as stack:
        def make(path: str, replacements: list[bytes]) -> ReplaceMidRead:
            return stack.enter_context(replacing_mid_read(lambda data: client.pipe_file(path, data), replacements))

        yield make


def test_resolve_restarts_in_parallel_after_a_replacement_and_caches_the_new_archive_whole(
        bucket, client, tmp_path, monkeypatch, replacer, made):
    monkeypatch.setenv("HUBCACHE_CONNECTIONS", str(CONNECTIONS))
    monkeypatch.setenv("HUBCACHE_CHUNK_SIZE", str(CHUNK))
    models = same_layout_models(tmp_path, 2, weights_bytes=3 << 20)
    url = _url(bucket, "m.tar")
    old, new = archive_of(models[0], "tar"), archive_of(models[1], "tar")
    assert len(old) == len(new) > 8 * CHUNK
    client.pipe_file(url[5:], old)
    plugin = replacer(url[5:], [new])

    path = hubcache.resolve(url)  # the default tmp backend; the archive is read from moto

    assert plugin.done == 1 and len(plugin.restarts()) == 1
    assert len(made) == 2
    assert tree_of(path) == tree_of(models[1])
    with open(path + ".descriptor.txt", "rb") as f:
        manifest = json.loads(descriptor_manifest(f.read()))
    assert manifest["archive"]["sha256"] == hashlib.sha256(new).hexdigest()
