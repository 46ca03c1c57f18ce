"""Failures from outside the archive are one-line ``HubcacheError``s: a redirect to a non-HTTP URL,
a local path that is not valid UTF-8, a ``TFHUB_CACHE_DIR`` that is a file or blank. Each through
the API and through the ``hubcache`` command (exit status 1, one line on stderr, no traceback),
with nothing committed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

import hubcache
from hubcache import ConfigError, DownloadError, HandleError
from hubcache.testing import archive_of, tree_of

HUBCACHE_CLI = os.path.join(os.path.dirname(sys.executable), "hubcache")


def run_cli(*args: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([HUBCACHE_CLI, *args], capture_output=True, timeout=120, env=full)


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: bytes) -> None:
    assert out.returncode == 1 and out.stdout == b"", out.stderr
    assert out.stderr.startswith(b"hubcache: error: ") and out.stderr.count(b"\n") == 1, out.stderr
    assert b"Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


def committed(root: str) -> list[str]:
    names = os.listdir(root) if os.path.isdir(root) else []
    return [n for n in names if n.endswith(".manifest.json") or os.path.isdir(os.path.join(root, n))]


# -- redirects to something that is not http(s) ------------------------------------------------------


@pytest.mark.parametrize("target, message", [
    ("file:///etc/passwd", "redirected to a file:// URL; only http and https"),
    ("ftp://127.0.0.1/m.tar.gz", "redirected to a ftp:// URL"),
    ("gs://bucket/m.tar.gz", "redirected to a gs:// URL"),
    ("data:,hello", "redirected to a data: URL"),
    ("http://127.0.0.1:99999999/m.tar.gz", "redirected to an invalid URL"),
])
def test_a_redirect_to_a_non_http_url_fails_at_once(origin, target, message):
    url = origin.redirect("/models/m.tar.gz", "/elsewhere")
    origin.routes["/models/m.tar.gz"].headers["Location"] = target  # exactly as given
    with pytest.raises(DownloadError, match=message) as info:
        hubcache.resolve(url)
    assert origin.count() == 1, "not retried"
    assert url in str(info.value) and "\n" not in str(info.value)
    assert committed(os.path.join(tempfile.gettempdir(), "tfhub_modules")) == []


def test_a_redirect_to_file_through_the_cli(origin):
    url = origin.redirect("/models/m.tar.gz", "file:///etc/passwd")
    out = run_cli("resolve", url)
    assert_one_line_error(out, url.encode(), b"file://")
    assert origin.count() == 1


# -- a local path that is not UTF-8 ----------------------------------------------------------------


def test_a_path_that_is_not_utf8_is_a_handle_error(model, tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/\xff-model.tar.gz"
    with open(raw, "wb") as f:
        f.write(archive_of(model))
    handle = os.fsdecode(raw)  # what Python makes of such a name: '\udcff' stands for the byte
    with pytest.raises(HandleError, match="not valid UTF-8") as info:
        hubcache.resolve(handle)
    assert "0xff" in str(info.value) and "\n" not in str(info.value)
    str(info.value).encode("utf-8")  # the message itself can be printed anywhere
    os.makedirs(os.fsencode(str(tmp_path)) + b"/\xfe-dir")
    with pytest.raises(HandleError, match="not valid UTF-8"):
        hubcache.resolve(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xfe-dir"))


def test_a_path_that_is_not_utf8_through_the_cli(model, tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/\xff.tar.gz"
    with open(raw, "wb") as f:
        f.write(archive_of(model))
    out = run_cli("resolve", raw)
    assert_one_line_error(out, b"not valid UTF-8", b"0xff")


# -- TFHUB_CACHE_DIR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["the file", "under the file"])
def test_a_cache_dir_that_is_a_file_is_a_config_error(origin, model, tmp_path, monkeypatch, where):
    afile = tmp_path / "not-a-dir"
    afile.write_text("hello")
    cache_dir = str(afile) if where == "the file" else str(afile / "cache")
    monkeypatch.setenv("TFHUB_CACHE_DIR", cache_dir)
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(ConfigError, match="is not a directory") as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert message.startswith(repr(url)) and "TFHUB_CACHE_DIR" in message and "\n" not in message
    assert origin.count() == 0 and afile.read_text() == "hello"
    out = run_cli("resolve", url, env={"TFHUB_CACHE_DIR": cache_dir})
    assert_one_line_error(out, b"TFHUB_CACHE_DIR", url.encode())


@pytest.mark.parametrize("value", [" ", "\t \n"])
def test_a_blank_cache_dir_is_a_config_error(origin, model, monkeypatch, value):
    monkeypatch.setenv("TFHUB_CACHE_DIR", value)
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(ConfigError, match="TFHUB_CACHE_DIR.* is blank") as info:
        hubcache.resolve(url)
    assert "unset TFHUB_CACHE_DIR" in str(info.value) and "\n" not in str(info.value)
    out = run_cli("resolve", url, env={"TFHUB_CACHE_DIR": value})
    assert_one_line_error(out, b"is blank")
    out = run_cli("config", env={"TFHUB_CACHE_DIR": value})
    assert_one_line_error(out, b"is blank")


def test_an_empty_cache_dir_means_unset_as_for_tensorflow_hub(origin, model, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", "")
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert tree_of(path) == tree_of(model)
    assert os.path.dirname(os.path.dirname(path)) == tempfile.gettempdir()
