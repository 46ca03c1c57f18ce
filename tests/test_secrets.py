"""Secrets and pins: credentials in a handle's URL are sent as HTTP basic auth to that host only and
never written down (descriptor, manifest, events, the ``-v`` log, the progress bar, error
messages); the signed query of a redirect target is not stored; a pin that cannot be checked is
an error, never silently ignored."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile

import pytest

import hubcache
from hubcache import DownloadError, HandleError, IntegrityError
from hubcache.core.events import Event
from hubcache.core.handles import cache_key, parse_handle
from hubcache.core.plugins import get_registry
from hubcache.testing import OriginServer, archive_of, tree_of

HUBCACHE_CLI = os.path.join(os.path.dirname(sys.executable), "hubcache")
USER, PASSWORD = "model-reader", "s3cr3t-Pa55w0rd"
SIGNATURE = "X-Goog-Signature=deadbeefcafe0123456789signed"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, user: str = USER, password: str = PASSWORD) -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), "tfhub_modules")


def every_byte_under(root: str) -> bytes:
    """The names and contents of everything under ``root`` (what a grep -r would see)."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            full = os.path.join(dirpath, name)
            out.append(full.encode())
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    out.append(f.read())
    return b"\n".join(out)


@pytest.fixture
def events():
    seen: list[Event] = []

    class Recorder:
        @hubcache.hookimpl
        def hubcache_event(self, event: Event) -> None:
            seen.append(event)

    registry = get_registry()
    recorder = Recorder()
    registry.pm.register(recorder, name="test-secrets-recorder")
    yield seen
    registry.pm.unregister(recorder)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([HUBCACHE_CLI, *args], capture_output=True, timeout=120, env=full)


# -- credentials in the URL --------------------------------------------------------------------------


def test_credentials_are_sent_as_basic_auth_and_never_written_down(origin, model, events):
    url = origin.add("/private/m.tar.gz", archive_of(model))
    origin.require_auth("/private/m.tar.gz", USER, PASSWORD)
    handle = with_credentials(url)
    path = hubcache.resolve(handle)
    assert tree_of(path) == tree_of(model)
    (request,) = origin.requests
    assert request.headers["Authorization"] == basic(USER, PASSWORD)
    assert "@" not in request.headers["Host"]
    # The key is tensorflow_hub's: sha1 of the handle as written, credentials included.
    assert os.path.basename(path) == cache_key(handle)
    stored = every_byte_under(cache_root())
    assert PASSWORD.encode() not in stored and USER.encode() not in stored
    with open(path + ".manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    shown = url.replace("http://", "http://***@")
    assert manifest["handle"] == shown and manifest["source"] == shown
    with open(path + ".descriptor.txt", encoding="utf-8") as f:
        assert shown in f.read()
    seen = repr([(e.kind, e.handle, e.data) for e in events])
    assert PASSWORD not in seen and USER not in seen and "***@" in seen


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


def test_credentials_do_not_follow_a_redirect_to_another_host(origin, model, events):
    """The handle's host redirects to storage elsewhere (another port is another origin) with a
    signed URL: the storage never sees the Authorization header, and the signature is stored
    nowhere (the manifest's source drops the redirect target's query)."""
    with OriginServer() as storage:
        target = storage.add("/bucket/m.tar.gz", archive_of(model)) + "?" + SIGNATURE
        url = origin.redirect("/private/m.tar.gz", target)
        origin.require_auth("/private/m.tar.gz", USER, PASSWORD)
        path = hubcache.resolve(with_credentials(url))
        (stored_request,) = storage.requests
    assert origin.requests[0].headers["Authorization"] == basic(USER, PASSWORD)
    assert "Authorization" not in stored_request.headers
    assert stored_request.query == SIGNATURE, "the signed URL is fetched as given"
    with open(path + ".manifest.json", encoding="utf-8") as f:
        assert json.load(f)["source"] == target.split("?")[0]
    stored = every_byte_under(cache_root())
    assert b"deadbeefcafe" not in stored and PASSWORD.encode() not in stored
    seen = repr([(e.kind, e.handle, e.data) for e in events])
    assert "deadbeefcafe" not in seen and PASSWORD not in seen


def test_credentials_follow_a_redirect_on_the_same_host(origin, model):
    origin.add("/private/v2/m.tar.gz", archive_of(model))
    origin.require_auth("/private/v2/m.tar.gz", USER, PASSWORD)
    url = origin.redirect("/private/m.tar.gz", "/private/v2/m.tar.gz")
    assert tree_of(hubcache.resolve(with_credentials(url))) == tree_of(model)
    assert [r.headers.get("Authorization") for r in origin.requests] == [basic(USER, PASSWORD)] * 2


def test_the_cli_log_progress_bar_and_errors_never_show_credentials_or_signatures(origin, model):
    """`hubcache -v resolve` with the progress bar forced on, for a good handle, a cut that is
    retried, and a failing one: grep stdout, stderr and the cache for the secrets."""
    with OriginServer() as storage:
        archive = archive_of(model, "zst")
        target = storage.add("/bucket/m.tar.zst", archive) + "?" + SIGNATURE
        storage.fail("/bucket/m.tar.zst", ("cut", len(archive) // 2))
        url = origin.redirect("/private/m.tar.zst", target)
        origin.require_auth("/private/m.tar.zst", USER, PASSWORD)
        missing = with_credentials(origin.url("/private/missing.tar.zst"))
        env = {"TFHUB_DOWNLOAD_PROGRESS": "1", "HUBCACHE_NO_PROGRESS": ""}
        out = run_cli("-v", "resolve", with_credentials(url), missing, env=env)
        json_out = run_cli("resolve", "--json", missing, env=env)
    assert out.returncode == 1 and b"Traceback" not in out.stderr
    assert b"retrying" in out.stderr and b"HTTP 404" in out.stderr and b"downloading" in out.stderr
    for secret in (PASSWORD.encode(), b"deadbeefcafe"):
        assert secret not in out.stdout + out.stderr
        assert secret not in every_byte_under(cache_root())
        assert secret not in json.dumps(json.loads(json_out.stdout)[0]["error"]).encode()
    assert b"***@" in out.stderr


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


PIN = "#sha256=" + "ab" * 32


@pytest.mark.parametrize("form", ["path", "file url"])
def test_a_pinned_directory_handle_is_an_error(model, form):
    handle = (model if form == "path" else f"file://{model}") + PIN
    with pytest.raises(IntegrityError, match="directory") as info:
        hubcache.resolve(handle)
    message = str(info.value)
    assert message.startswith(repr(handle)) and "no archive bytes" in message and "\n" not in message
    assert "remove the pin" in message


def test_a_directory_pinned_by_the_pins_file_is_an_error(model, tmp_path, monkeypatch):
    pins = tmp_path / "pins.txt"
    pins.write_text(f"{model} sha256={'ab' * 32}\n")
    monkeypatch.setenv("HUBCACHE_PINS", str(pins))
    with pytest.raises(IntegrityError, match="directory") as info:
        hubcache.resolve(model)
    assert f"remove its line from {pins}" in str(info.value)


def test_a_pinned_handle_read_uncompressed_is_an_error(origin, model, monkeypatch):
    """UNCOMPRESSED reads the model in place: no archive to check, so the pin is refused before
    anything is fetched (the tfhub.dev pointer is not even asked for)."""
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model), uncompressed="gs://bucket/tiny")
    with pytest.raises(IntegrityError, match="UNCOMPRESSED") as info:
        hubcache.resolve(handle + PIN)
    assert "TFHUB_MODEL_LOAD_FORMAT=COMPRESSED" in str(info.value)
    assert origin.count() == 0
    with pytest.raises(IntegrityError, match="directory"):
        hubcache.resolve("gs://bucket/tiny" + PIN)


def test_the_cli_reports_an_uncheckable_pin_in_one_line(model):
    out = run_cli("resolve", model + PIN)
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr.count(b"\n") == 1 and b"Traceback" not in out.stderr and b"IntegrityError" not in out.stderr
