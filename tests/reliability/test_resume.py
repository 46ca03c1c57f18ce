"""A resumed download is one object: the origin's file changes between a cut and its resume, the
server ignores If-Range or Range, sends no validator, answers a Range with a 206 whose
Content-Range does not match, or sends more bytes than it announced. Neither a plain ``.tar`` nor
a ``.tar.zst`` without a content checksum (the formats with no end-to-end check of the content)
may ever commit half of one version and half of another: the entry equals one version byte for
byte, or the resolve fails with nothing committed. Requests are counted."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import hubcache
from hubcache import DownloadError
from hubcache.testing import OriginServer, build_model_dir, tar_directory, tree_of
from local_layout import committed_names, manifest_data

from .helpers import EventLog, leftovers

SCENARIO = "10. Resumed downloads are one object"
FORMATS = ("tar", "zst")


def _encode(tar: bytes, fmt: str) -> bytes:
    if fmt == "tar":
        return tar
    import zstandard

    # No content checksum: nothing in the format notices a splice of two versions (at level 1
    # the versions' frames have the same block layout, so a splice decodes without an error).
    return zstandard.ZstdCompressor(level=1, write_checksum=False).compress(tar)


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """Three versions of one model (same layout and sizes, different weights), as directories
    and as archives of each format; every version's archive has the same length, so a splice
    is not betrayed by a size change."""
    root = tmp_path_factory.mktemp("versions")
    # Seeds whose zstd archives come out at one length too (zstd finds a few chance matches in
    # random weights, so some seeds differ by a few bytes).
    dirs = [build_model_dir(root / f"v{i}", weights_bytes=600_000, shards=2, seed=i) for i in (1, 2, 5)]
    for d in dirs:  # one mtime everywhere: tar headers (pax mtime records) of one length
        for where, subdirs, files in os.walk(d):
            for name in subdirs + files:
                os.utime(os.path.join(where, name), (1_700_000_000, 1_700_000_000))
        os.utime(d, (1_700_000_000, 1_700_000_000))
    archives = {fmt: [_encode(tar_directory(d), fmt) for d in dirs] for fmt in FORMATS}
    for fmt, blobs in archives.items():
        assert len({len(b) for b in blobs}) == 1, f"{fmt}: the versions must have one length"
    return {"dirs": dirs, "trees": [tree_of(d) for d in dirs], "archives": archives}


def _manifest(cache_root: str, path: str) -> dict:
    return manifest_data(cache_root, os.path.basename(path))


def _nothing_committed(cache_root: str) -> bool:
    return not committed_names(cache_root)


def _resolve_and_check(origin: OriginServer, url: str, versions: dict, fmt: str, cache_root: str,
                       expected: int) -> tuple[str, list]:
    """Resolve; the entry must be version ``expected`` exactly (files and archive digest)."""
    with EventLog() as log:
        path = hubcache.resolve(url)
    got = tree_of(path)
    trees = versions["trees"]
    which = [i for i, t in enumerate(trees) if t == got]
    assert which == [expected], f"the entry is {'version ' + str(which) if which else 'a splice of versions'}"
    archive = versions["archives"][fmt][expected]
    assert _manifest(cache_root, path)["archive"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert leftovers(cache_root) == []
    return path, log.events


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_changed_object_honouring_if_range_restarts_from_zero(fmt, validator, versions, cache_root, figures):
    """The file is replaced after a cut; the server honours If-Range and answers 200 with the new
    version: the download restarts from byte 0 and commits the new version alone."""
    v1, v2 = versions["archives"][fmt][:2]
    path = f"/resume/changed.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.validators(path, validator)
        origin.fail(path, ("cut", len(v1) // 2), ("change", v2))
        _, events = _resolve_and_check(origin, url, versions, fmt, cache_root, expected=1)
        requests = [(r.status, r.headers.get("Range"), r.headers.get("If-Range")) for r in origin.requests]
    assert [r[0] for r in requests] == [200, 200, 200]
    assert requests[1][1] == f"bytes={len(v1) // 2}-" and requests[1][2], "the resume carried If-Range"
    assert requests[2][1] is None, "the restart asks for the whole file"
    restarts = [e for e in events if e.kind == "download_retry" and e.data["offset"] == 0]
    assert len(restarts) == 1 and "changed" in restarts[0].data["error"]
    figures.update(run=f".{fmt}, {validator}: cut at 1/2, then the file changes (server honours If-Range)",
                   requests=len(requests), outcome="new version committed whole")


@pytest.mark.parametrize("fmt", FORMATS)
def test_changed_object_server_ignoring_if_range(fmt, versions, cache_root, figures):
    """The server ignores If-Range and serves the asked range of the new version as a 206: its
    ETag differs from the first response's, so that 206 is refused and the download restarts."""
    v1, v2 = versions["archives"][fmt][:2]
    path = f"/resume/ignores-if-range.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.validators(path, "etag", if_range=False)
        origin.fail(path, ("cut", len(v1) // 2), ("change", v2))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=1)
        statuses = [r.status for r in origin.requests]
    assert statuses == [200, 206, 200]
    figures.update(run=f".{fmt}: cut at 1/2, file changes, server ignores If-Range (206 of the new file)",
                   requests=len(statuses), outcome="new version committed whole")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("validator", ["none", "weak"])
def test_no_validator_never_resumes(fmt, validator, versions, cache_root, figures):
    """No ETag (or only a weak one) and no Last-Modified: nothing can tell the resumed bytes are
    of the same file, so a cut restarts the download from byte 0 without asking for a range."""
    v1, v2 = versions["archives"][fmt][:2]
    path = f"/resume/novalidator-{validator}.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.validators(path, validator)
        origin.fail(path, ("cut", len(v1) // 2), ("change", v2))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=1)
        ranges = [r.headers.get("Range") for r in origin.requests]
    assert ranges == [None, None]
    figures.update(run=f".{fmt}, validator {validator}: cut at 1/2, then the file changes",
                   requests=len(ranges), outcome="restart from 0 (no Range sent); new version whole")


@pytest.mark.parametrize("fmt", FORMATS)
def test_200_to_a_range_of_the_same_object_skips(fmt, versions, cache_root, figures):
    """The server answers a Range with 200 and the same strong ETag: the same object, so the
    bytes already read are skipped and the download continues (no restart of the pipeline)."""
    v1 = versions["archives"][fmt][0]
    path = f"/resume/ignore-range.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.fail(path, ("cut", len(v1) // 2), ("ignore_range",))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=0)
        statuses = [r.status for r in origin.requests]
    assert statuses == [200, 200]
    figures.update(run=f".{fmt}: cut at 1/2, 200 (same ETag) to the Range request", requests=len(statuses),
                   outcome="skips the bytes already read; one version")


@pytest.mark.parametrize("fmt", FORMATS)
def test_200_to_a_range_with_only_last_modified_restarts(fmt, versions, cache_root, figures):
    """A 200 to a Range request, and only Last-Modified to compare: a date cannot prove the
    bytes are the same, so the download restarts from byte 0."""
    v1, v2 = versions["archives"][fmt][:2]
    path = f"/resume/lm-200.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.validators(path, "last-modified")
        origin.fail(path, ("cut", len(v1) // 2), ("ignore_range",))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=0)
        statuses = [r.status for r in origin.requests]
    assert statuses == [200, 200, 200]
    figures.update(run=f".{fmt}, Last-Modified only: cut at 1/2, 200 to the Range request",
                   requests=len(statuses), outcome="restart from 0; one version")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("start_delta, total_delta", [(1000, 0), (-1000, 0), (0, 1), (0, -1)])
def test_a_206_that_does_not_match_restarts(fmt, start_delta, total_delta, versions, cache_root, figures):
    """A 206 whose Content-Range starts elsewhere than asked, or announces another total, is
    refused: the download restarts from byte 0 and commits the one version."""
    v1 = versions["archives"][fmt][0]
    path = f"/resume/bad-range.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.fail(path, ("cut", len(v1) // 2), ("bad_range", start_delta, total_delta))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=0)
        statuses = [r.status for r in origin.requests]
    assert statuses == [200, 206, 200]
    figures.update(run=f".{fmt}: 206 with Content-Range start {start_delta:+d}, total {total_delta:+d}",
                   requests=len(statuses), outcome="refused; restart from 0; one version")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_beyond_content_length_never_reach_the_entry(fmt, versions, cache_root, figures):
    """The origin sends 4 KiB beyond its Content-Length: they are not part of the download, and
    the connection they sit on is not reused (the next download from the origin is whole)."""
    v1, v2 = versions["archives"][fmt][:2]
    with OriginServer() as origin:
        url = origin.add(f"/resume/extra.{fmt}", v1)
        origin.fail(f"/resume/extra.{fmt}", ("extra", 4096))
        _resolve_and_check(origin, url, versions, fmt, cache_root, expected=0)
        other = origin.add(f"/resume/next.{fmt}", v2)
        _resolve_and_check(origin, other, versions, fmt, cache_root, expected=1)
        requests = origin.count()
    assert requests == 2
    figures.update(run=f".{fmt}: 4 KiB beyond Content-Length, then another download from the origin",
                   requests=requests, outcome="extra bytes ignored; both entries exact")


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_beyond_content_range_are_an_error(fmt, versions, cache_root, monkeypatch, figures):
    """A close-delimited 206 that sends more than its Content-Range announced: the download
    fails at once (not retried), naming the URL, and nothing is committed."""
    v1 = versions["archives"][fmt][0]
    path = f"/resume/overrun.{fmt}"
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.fail(path, ("cut", len(v1) // 2), ("unframed", 4096))
        with pytest.raises(DownloadError, match="more bytes than") as info:
            hubcache.resolve(url)
        requests = origin.count()
    assert requests == 2
    assert url in str(info.value) and "\n" not in str(info.value)
    assert _nothing_committed(cache_root) and leftovers(cache_root) == []
    figures.update(run=f".{fmt}: cut, then a close-delimited 206 with 4 KiB beyond its Content-Range",
                   requests=requests, outcome="DownloadError, nothing committed", message=str(info.value))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_that_keeps_changing_fails_naming_the_handle(fmt, versions, cache_root, figures):
    """The file changes at every resume: after two restarts from byte 0 the resolve fails with
    one line naming the handle; nothing is committed."""
    v1, v2, v3 = versions["archives"][fmt]
    path = f"/resume/churn.{fmt}"
    half = len(v1) // 2
    with OriginServer() as origin:
        url = origin.add(path, v1)
        origin.fail(path, ("cut", half), ("change", v2), ("cut", half), ("change", v3), ("cut", half),
                    ("change", v1))
        with pytest.raises(DownloadError, match="changed") as info:
            hubcache.resolve(url)
        requests = origin.count()
    message = str(info.value)
    assert message.startswith(repr(url)) and "\n" not in message
    assert requests == 6
    assert _nothing_committed(cache_root) and leftovers(cache_root) == []
    figures.update(run=f".{fmt}: the file changes after every cut", requests=requests,
                   outcome="DownloadError after 2 restarts, nothing committed", message=message)
