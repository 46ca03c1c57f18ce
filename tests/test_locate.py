"""Locate: which handle shapes are archives, directories or tfhub.dev-style models, and the
``?tf-hub-format=compressed`` query that tfhub.dev-style handles are fetched with."""

from __future__ import annotations

import os

import pytest

import hubcache
from hubcache import HandleError
from hubcache.core.handles import cache_key, parse_handle
from hubcache.core.locate import Location, locate, with_query
from hubcache.testing import archive_of, tree_of


@pytest.mark.parametrize("url, expected", [
    ("https://tfhub.dev/google/spice/2", "https://tfhub.dev/google/spice/2?tf-hub-format=compressed"),
    ("https://h/m?a=1&b=2", "https://h/m?a=1&b=2&tf-hub-format=compressed"),
    # Existing parameters are kept byte for byte: re-encoding would break signed URLs.
    ("https://h/m?sig=a%20b%2Fc&flag&e=", "https://h/m?sig=a%20b%2Fc&flag&e=&tf-hub-format=compressed"),
    ("https://h/m?tf-hub-format=compressed", "https://h/m?tf-hub-format=compressed"),
    ("https://h/m?x=1#frag", "https://h/m?x=1&tf-hub-format=compressed#frag"),
])
def test_with_query_appends_and_keeps_what_is_there(url, expected):
    assert with_query(url, **{"tf-hub-format": "compressed"}) == expected


def loc(handle: str, load_format: str = "COMPRESSED") -> Location:
    return locate(parse_handle(handle), load_format)


def test_tfhub_style_handles_are_archives_fetched_with_the_compressed_query():
    assert loc("https://tfhub.dev/google/spice/2") == Location(
        "https://tfhub.dev/google/spice/2?tf-hub-format=compressed", "archive")
    # Any http(s) handle that is not an archive URL is treated the same way.
    assert loc("http://models.internal/team/m/3?rev=7") == Location(
        "http://models.internal/team/m/3?rev=7&tf-hub-format=compressed", "archive")


def test_uncompressed_load_format_asks_for_a_pointer():
    assert loc("https://tfhub.dev/google/spice/2", "UNCOMPRESSED") == Location(
        "https://tfhub.dev/google/spice/2?tf-hub-format=uncompressed", "pointer")


@pytest.mark.parametrize("url", [
    "https://h/m.tar.gz", "https://h/m.tgz?sig=abc", "http://h/a/b/m.tar.zst",
    "https://h/m.tar.bz2", "https://h/m.tar.xz", "https://h/m.tar",
])
def test_archive_urls_are_fetched_as_they_are(url):
    assert loc(url) == Location(url, "archive")
    assert loc(url, "UNCOMPRESSED") == Location(url, "archive")


@pytest.mark.parametrize("url, kind", [
    ("memory://bucket/m.tar.zst", "archive"),
    ("gs://bucket/models/m.tar.gz", "archive"),
    ("gs://bucket/models/m/uncompressed", "directory"),
])
def test_other_fsspec_urls_by_suffix(url, kind):
    assert loc(url) == Location(url, kind)


def test_local_directories_files_and_file_urls(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    assert loc(str(model)) == Location(str(model), "directory")
    assert loc(f"file://{model}") == Location(str(model), "directory")
    assert loc(str(archive)) == Location(str(archive), "archive")
    assert loc(f"file://{archive}") == Location(str(archive), "archive")
    # A suffix-less local file is an archive too: its format is read from its bytes.
    (tmp_path / "blob").write_bytes(b"x")
    assert loc(str(tmp_path / "blob")).kind == "archive"
    # Relative paths become absolute, so the returned path does not depend on a later chdir.
    monkeypatch.chdir(tmp_path)
    assert loc("model") == Location(str(model), "directory")


def test_a_missing_local_path_is_a_handle_error(tmp_path):
    with pytest.raises(HandleError, match="no such file or directory"):
        loc(str(tmp_path / "missing"))
    with pytest.raises(HandleError):
        loc(f"file://{tmp_path}/missing.tar.gz")


# -- through the public API and a real origin --------------------------------------------------


def test_tfhub_handle_keeps_its_query_and_follows_the_redirect(origin, model):
    handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model, "gz")) + "?token=a%20b&flag"
    path = hubcache.resolve(handle)
    assert tree_of(path) == tree_of(model)
    # The key is the handle as written, query included, exactly as tensorflow_hub computes it.
    assert os.path.basename(path) == cache_key(handle)
    handle_requests = [r.query for r in origin.requests if r.path == "/google/tiny/1"]
    assert handle_requests == ["token=a%20b&flag&tf-hub-format=compressed"]
    assert origin.count("/storage/google/tiny/1.tar.gz") == 1


def test_a_handle_that_already_asks_for_compressed_is_not_asked_twice(origin, model):
    handle = origin.add_tfhub_model("/google/tiny/2", archive_of(model, "zst")) + "?tf-hub-format=compressed"
    assert tree_of(hubcache.resolve(handle)) == tree_of(model)
    assert [r.query for r in origin.requests if r.path == "/google/tiny/2"] == ["tf-hub-format=compressed"]


def test_the_bare_model_page_is_never_fetched(origin, model):
    # The origin answers the bare handle with an HTML page; hubcache must always add the query.
    handle = origin.add_tfhub_model("/google/tiny/3", archive_of(model, "gz"))
    hubcache.resolve(handle)
    queries = [r.query for r in origin.requests if r.path == "/google/tiny/3"]
    assert queries == ["tf-hub-format=compressed"]
    assert [r.status for r in origin.requests] == [302, 200]
