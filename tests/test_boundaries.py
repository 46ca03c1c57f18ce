"""Failures from outside the archive are one-line ``HubcacheError``s: a redirect to a non-HTTP URL,
a local path that is not valid UTF-8, a ``TFHUB_CACHE_DIR`` that is a file or blank. Each through
the API and through the ``hubcache`` command (exit status 1, one line on stderr, no traceback),
with nothing committed. The cases through the ``hubcache`` command, with their figures, are in
``tests/reliability/test_every_failure.py``."""

from __future__ import annotations

import os
import tempfile

import pytest

import hubcache
from hubcache import DownloadError, HandleError
from hubcache.testing import archive_of, tree_of
from local_layout import committed_names


def committed(root: str) -> list[str]:
    return committed_names(root)


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


# -- TFHUB_CACHE_DIR ---------------------------------------------------------------------------------


def test_an_empty_cache_dir_means_unset_as_for_tensorflow_hub(origin, model, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", "")
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert tree_of(path) == tree_of(model)
    assert os.path.dirname(os.path.dirname(path)) == tempfile.gettempdir()
