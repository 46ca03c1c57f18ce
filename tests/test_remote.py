"""The ``remote`` backend (UNCOMPRESSED): a local tfhub.dev-style server answers 303 with a gs://
directory in a real GCS emulator; nothing is written locally."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import hubcache
from gcs_emulator import fresh_root, gcs
from hubcache.core.config import load_config
from hubcache.core.errors import ConfigError, DownloadError, HandleError
from hubcache.core.resolver import select_backend_name
from hubcache.testing import archive_of, read_tree, tree_of


@pytest.fixture
def uncompressed(monkeypatch):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    monkeypatch.setenv("HUBCACHE_RETRIES", "1")


@pytest.fixture
def remote_model(model) -> str:
    """The model's files, uncompressed, in the emulator (as tfhub.dev keeps them)."""
    directory = f"{fresh_root()}/google/tiny/1/uncompressed"
    fs = gcs()
    fs.pipe({f"{directory[5:]}/{rel}": data for rel, data in tree_of(model).items()})
    return directory


def local_files(*roots) -> list[str]:
    return [os.path.join(d, f) for root in roots for d, _, files in os.walk(root) for f in files]


def test_uncompressed_selects_remote_and_follows_the_303(origin, model, remote_model, uncompressed, tmp_path):
    assert select_backend_name(load_config()) == ("remote", "TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED")
    handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model), uncompressed=remote_model)
    assert hubcache.resolve(handle) == remote_model
    assert read_tree(remote_model) == tree_of(model)
    assert [(r.path, r.query, r.status) for r in origin.requests] == [
        ("/google/tiny/1", "tf-hub-format=uncompressed", 303)], "the archive must not be fetched"
    assert hubcache.resolve(handle) == remote_model
    assert origin.count() == 1, "a second resolve is memoised"
    assert local_files(tmp_path / "tmp", tmp_path / "home-cache") == [], "nothing is written locally"


def test_redirect_before_the_pointer_is_followed(origin, model, remote_model, uncompressed):
    origin.add_tfhub_model("/models/tiny/1", archive_of(model), uncompressed=remote_model)
    handle = origin.redirect("/google/moved/1", "/models/tiny/1?tf-hub-format=uncompressed", status=301)
    assert hubcache.resolve(handle) == remote_model


def test_directory_handles_resolve_to_themselves(origin, remote_model, model, uncompressed, tmp_path):
    assert hubcache.resolve(remote_model) == remote_model
    assert hubcache.resolve(model) == model
    assert origin.count() == 0
    assert local_files(tmp_path / "tmp", tmp_path / "home-cache") == []


def test_archive_handle_needs_a_cache_backend(origin, model, uncompressed, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(ConfigError) as info:
        hubcache.resolve(url)
    assert "archives need a cache backend" in str(info.value) and url in str(info.value)
    assert origin.count() == 0
    assert local_files(tmp_path / "tmp", tmp_path / "home-cache") == []


def test_200_instead_of_303(origin, uncompressed):
    origin.add("/google/page/1", b"<!DOCTYPE html><html>a model page</html>")
    handle = origin.url("/google/page/1")
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(handle)
    assert info.value.status == 200
    assert "200 instead of 303" in str(info.value) and str(info.value).startswith(repr(handle))


@pytest.mark.parametrize("status", [404, 410, 503])
def test_other_status(origin, uncompressed, status):
    origin.add("/google/gone/1", b"no", status=status)
    handle = origin.url("/google/gone/1")
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(handle)
    assert info.value.status == status and str(status) in str(info.value)
    assert str(info.value).startswith(repr(handle))


@pytest.mark.parametrize("body", ["https://storage.googleapis.com/bucket/model", "", "gs://", "not a path at all"])
def test_303_body_that_is_not_a_gs_path(origin, model, uncompressed, body):
    handle = origin.add_tfhub_model("/google/odd/1", archive_of(model), uncompressed=body or None)
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(handle)
    assert info.value.status == 303 and "gs://" in str(info.value)
    assert str(info.value).startswith(repr(handle))


def test_gs_directory_that_does_not_exist(origin, model, uncompressed):
    missing = f"{fresh_root()}/google/none/1/uncompressed"
    handle = origin.add_tfhub_model("/google/none/1", archive_of(model), uncompressed=missing)
    with pytest.raises(HandleError) as info:
        hubcache.resolve(handle)
    assert missing in str(info.value) and "no such directory" in str(info.value)


@pytest.mark.parametrize("value", ["uncompresed", "ZIP", "1"])
def test_invalid_load_format(monkeypatch, value):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", value)
    with pytest.raises(ConfigError) as info:
        hubcache.resolve("https://example.com/google/x/1")
    assert value in str(info.value) and "COMPRESSED, UNCOMPRESSED or AUTO" in str(info.value)


def test_auto_means_compressed(origin, model, remote_model, monkeypatch):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "AUTO")
    handle = origin.add_tfhub_model("/google/auto/1", archive_of(model), uncompressed=remote_model)
    path = hubcache.resolve(handle)
    assert path.startswith(os.environ["TMPDIR"]) and tree_of(path) == tree_of(model)


def test_missing_gcsfs_names_the_extra(origin, model, tmp_path):
    # gcsfs is installed here (the tests need it); a child process that blocks its import
    # (sys.modules[name] = None makes `import gcsfs` raise ImportError) stands in for an
    # installation without the extra.
    handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model), uncompressed="gs://bucket/m/uncompressed")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gcsfs"] = None
        import hubcache
        try:
            hubcache.resolve({handle!r})
        except hubcache.MissingDependencyError as error:
            print(error)
    """)
    env = {**os.environ, "TFHUB_MODEL_LOAD_FORMAT": "UNCOMPRESSED", "TMPDIR": str(tmp_path / "tmp")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "gcsfs" in out.stdout and "pip install 'hubcache[gcs]'" in out.stdout and handle in out.stdout


def test_pointer_redirect_to_another_scheme_fails_at_once(origin, uncompressed):
    """A redirect to file:// is the server's answer, not a transient failure: no retries."""
    origin.redirect("/google/sneaky/1", "file:///etc/passwd")
    handle = origin.url("/google/sneaky/1")
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(handle)
    assert "'file' URL" in str(info.value) and str(info.value).startswith(repr(handle))
    assert origin.count("/google/sneaky/1") == 1


def test_oversized_303_body_is_refused_not_cut(origin, uncompressed):
    """A 303 body longer than the cap is an error (a cut-off gs:// path could name another
    directory), and the rest of the body is not read: the connection is closed."""
    body = ("gs://bucket/" + "a" * (64 << 20)).encode()
    origin.add("/google/huge/1", body, status=303)
    handle = origin.url("/google/huge/1")
    began = time.monotonic()
    with pytest.raises(DownloadError) as info:
        hubcache.resolve(handle)
    assert "longer than 4096 bytes" in str(info.value) and str(info.value).startswith(repr(handle))
    assert time.monotonic() - began < 5
