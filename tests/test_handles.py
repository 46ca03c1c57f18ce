"""Handles: parsing, the tensorflow_hub cache key, pins, and bad input through the public API."""

from __future__ import annotations

import hashlib
import os

import pytest

import hubcache
from hubcache import HandleError, HubcacheError
from hubcache.core.handles import ARCHIVE_SUFFIXES, cache_key, parse_handle


@pytest.mark.parametrize("handle", [
    "https://tfhub.dev/google/spice/2",
    "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5",
    "gs://bucket/models/m.tar.gz",
    "/abs/path/model",
    "https://example.com/modèle.tar.gz",  # non-ASCII: encoded as UTF-8, as tensorflow_hub does
])
def test_cache_key_is_tensorflow_hubs_sha1_of_the_handle(handle):
    # tensorflow_hub: hashlib.sha1(handle.encode("utf8")).hexdigest()
    assert cache_key(handle) == hashlib.sha1(handle.encode("utf8")).hexdigest()
    assert parse_handle(handle).key == cache_key(handle)


@pytest.mark.parametrize("handle, scheme, is_local, is_archive", [
    ("https://tfhub.dev/google/spice/2", "https", False, False),
    ("HTTP://host/m.TAR.GZ", "http", False, True),
    ("https://host/m.tar.zst?sig=abc", "https", False, True),  # the query is not part of the path
    ("https://host/download?file=m.tar.gz", "https", False, False),
    ("gs://bucket/m.tgz", "gs", False, True),
    ("memory://bucket/m.tar.xz", "memory", False, True),
    ("file:///srv/models/m.tar.bz2", "file", True, True),
    ("/srv/models/m", "", True, False),
    ("relative/m.tar", "", True, True),
    ("C:\\models\\m.tar", "", True, True),  # a drive letter is not a one-letter scheme
])
def test_parse_handle_shapes(handle, scheme, is_local, is_archive):
    parsed = parse_handle(handle)
    assert (parsed.scheme, parsed.is_local, parsed.is_archive_url) == (scheme, is_local, is_archive)
    assert parsed.raw == handle and parsed.url == handle and parsed.pin is None


def test_every_documented_suffix_is_an_archive():
    for suffix in ARCHIVE_SUFFIXES:
        assert parse_handle(f"https://h/m{suffix}").is_archive_url, suffix
    assert set(ARCHIVE_SUFFIXES) >= {".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz"}


def test_local_path_of_file_urls_and_home_relative_paths():
    assert parse_handle("file:///srv/m.tar.gz").local_path == "/srv/m.tar.gz"
    assert parse_handle("~/models/m").local_path == os.path.join(os.path.expanduser("~"), "models/m")


def test_a_pin_is_split_off_and_not_part_of_the_key():
    digest = "ab" * 32
    parsed = parse_handle(f"https://host/m.tar.gz#sha256={digest.upper()}")
    assert parsed.url == "https://host/m.tar.gz"
    assert parsed.pin == ("sha256", digest)
    assert parsed.key == cache_key("https://host/m.tar.gz")


@pytest.mark.parametrize("algorithm, length", [("sha1", 40), ("md5", 32)])
def test_other_pin_algorithms(algorithm, length):
    parsed = parse_handle(f"https://host/m.tar.gz#{algorithm}={'0' * length}")
    assert parsed.pin == (algorithm, "0" * length)


def test_a_pin_of_the_wrong_length_is_a_handle_error():
    with pytest.raises(HandleError, match="64") as info:
        parse_handle("https://host/m.tar.gz#sha256=abc123")
    assert info.value.handle == "https://host/m.tar.gz#sha256=abc123"


def test_a_fragment_that_is_not_a_pin_stays_in_the_handle():
    parsed = parse_handle("https://host/m.tar.gz#section")
    assert parsed.pin is None and parsed.url == "https://host/m.tar.gz#section"


@pytest.mark.parametrize("bad", [None, 42, b"https://tfhub.dev/google/spice/2", ["a"]])
def test_resolve_refuses_what_is_not_a_handle(bad):
    with pytest.raises(HandleError, match="must be a string") as info:
        hubcache.resolve(bad)  # type: ignore[arg-type]
    # Callers that catch ValueError (as with tensorflow_hub) catch it too.
    assert isinstance(info.value, ValueError) and isinstance(info.value, HubcacheError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_resolve_refuses_an_empty_handle(blank):
    with pytest.raises(HandleError, match="empty"):
        hubcache.resolve(blank)


def test_a_missing_local_path_is_a_handle_error_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(HandleError, match="no such file or directory") as info:
        hubcache.resolve(missing)
    assert missing in str(info.value)


# -- credentials ----------------------------------------------------------------------------------


def test_credentials_are_in_the_key_and_nowhere_else():
    written = "https://reader:hunter2@models.example:8443/m.tar.gz#sha256=" + "0" * 64
    handle = parse_handle(written)
    assert handle.key == cache_key("https://reader:hunter2@models.example:8443/m.tar.gz")
    assert handle.url == "https://***@models.example:8443/m.tar.gz"
    assert handle.raw == "https://***@models.example:8443/m.tar.gz#sha256=" + "0" * 64
    assert "hunter2" not in repr(handle) and "reader" not in repr(handle)
    assert handle.pin == ("sha256", "0" * 64) and handle.is_archive_url


@pytest.mark.parametrize("url, revealed", [
    ("https://***@models.example:8443/m.tar.gz?tf-hub-format=compressed", True),
    ("https://***@models.example:8443/other/path", True),
    ("https://***@models.example/m.tar.gz", False),      # another port
    ("http://***@models.example:8443/m.tar.gz", False),  # another scheme
    ("https://***@mirror.example:8443/m.tar.gz", False),  # another host
    ("https://models.example:8443/m.tar.gz", False),      # no placeholder: nothing to put back
])
def test_credentials_are_revealed_only_for_the_handles_own_host(url, revealed):
    handle = parse_handle("https://reader:hunter2@models.example:8443/m.tar.gz")
    assert handle.reveal(url) == (url.replace("***", "reader:hunter2", 1) if revealed else url)


def test_errors_never_show_credentials_wherever_they_appear():
    error = HandleError("cannot read https://u:pw@h/x and ftp://a:b@c@d/y", handle="https://u:pw@h/x",
                        hint="try https://u:pw@h/x again")
    text = str(error)
    assert "pw" not in text and "a:b" not in text and text.count("***@") == 4
    assert str(HandleError("mail me@example.com about https://h/a@b", handle="/tmp/x@y")) == \
        "'/tmp/x@y': mail me@example.com about https://h/a@b"
