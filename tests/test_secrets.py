"""Secrets and pins: credentials in a handle's URL are sent as HTTP basic auth to that host only and
never written down (descriptor, manifest, events, the ``-v`` log, the progress bar, error
messages); the signed query of a redirect target is not stored; a pin that cannot be checked is
an error, never silently ignored. The most telling cases, with their figures, are in
``tests/reliability/test_secrets_and_pins.py``."""

from __future__ import annotations

import pytest

import hubcache
from hubcache import DownloadError, HandleError, IntegrityError
from hubcache.core.handles import parse_handle
from hubcache.testing import archive_of, tree_of
from hostile_inputs import PASSWORD, PIN, USER, basic, run_cli, with_credentials


# -- credentials in the URL --------------------------------------------------------------------------


def test_percent_encoded_credentials_are_decoded_for_the_header(origin, model):
    url = origin.add("/private/m.tar.gz", archive_of(model))
    origin.require_auth("/private/m.tar.gz", "me@example.com", "p:ss/w?rd")
    hubcache.resolve(with_credentials(url, "me%40example.com", "p%3Ass%2Fw%3Frd"))
    assert origin.requests[0].status == 200


def test_wrong_credentials_fail_without_showing_them(origin, model):
    url = origin.add("/private/m.tar.gz", archive_of(model))
    origin.require_auth("/private/m.tar.gz", USER, PASSWORD)
    handle = with_credentials(url, USER, "not-the-" + PASSWORD)
    with pytest.raises(DownloadError, match="HTTP 401") as info:
        hubcache.resolve(handle)
    message = str(info.value)
    assert PASSWORD not in message and USER not in message and "***@" in message
    assert "\n" not in message
    for attribute in (info.value.url, info.value.handle, info.value.message, info.value.hint or ""):
        assert PASSWORD not in attribute, "callers log the attributes too"


def test_credentials_follow_a_redirect_on_the_same_host(origin, model):
    origin.add("/private/v2/m.tar.gz", archive_of(model))
    origin.require_auth("/private/v2/m.tar.gz", USER, PASSWORD)
    url = origin.redirect("/private/m.tar.gz", "/private/v2/m.tar.gz")
    assert tree_of(hubcache.resolve(with_credentials(url))) == tree_of(model)
    assert [r.headers.get("Authorization") for r in origin.requests] == [basic(USER, PASSWORD)] * 2


def test_a_handle_whose_credentials_were_hidden_is_refused():
    """A handle copied from hubcache's own output (``***``) cannot be fetched or keyed: say so."""
    with pytest.raises(HandleError, match="hidden") as info:
        parse_handle("https://***@models.example/m.tar.gz")
    assert info.value.hint


def test_a_pins_file_may_name_the_handle_with_its_credentials(origin, model, tmp_path, monkeypatch):
    url = origin.add("/private/m.tar.gz", archive_of(model))
    origin.require_auth("/private/m.tar.gz", USER, PASSWORD)
    pins = tmp_path / "pins.txt"
    pins.write_text(f"{with_credentials(url)} sha256={'0' * 64}\n")
    monkeypatch.setenv("HUBCACHE_PINS", str(pins))
    with pytest.raises(IntegrityError, match="pins") as info:
        hubcache.resolve(with_credentials(url))
    assert PASSWORD not in str(info.value)


# -- pins that cannot be checked -------------------------------------------------------------------



def test_a_directory_pinned_by_the_pins_file_is_an_error(model, tmp_path, monkeypatch):
    pins = tmp_path / "pins.txt"
    pins.write_text(f"{model} sha256={'ab' * 32}\n")
    monkeypatch.setenv("HUBCACHE_PINS", str(pins))
    with pytest.raises(IntegrityError, match="directory") as info:
        hubcache.resolve(model)
    assert f"remove its line from {pins}" in str(info.value)


def test_the_cli_reports_an_uncheckable_pin_in_one_line(model):
    out = run_cli("resolve", model + PIN)
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr.count(b"\n") == 1 and b"Traceback" not in out.stderr and b"IntegrityError" not in out.stderr
