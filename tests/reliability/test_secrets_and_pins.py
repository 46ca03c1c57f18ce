"""Secrets and pins: a handle may carry credentials (``http://user:password@host/…``) and a
download may be redirected to a signed URL (``?X-Goog-Signature=…``). The credentials are sent
as HTTP basic auth to the handle's host only, and neither they nor the signature may ever be
written down: every file of the cache, the hook events, the ``-v`` log, the progress bar, the
error messages and ``--json`` output are searched for them, for a good download, a cut one that is
retried and a failing one (the origin and the storage are two real loopback servers). A pin that
cannot be checked (a directory handle, a model read ``UNCOMPRESSED``) is an error, never ignored.
"""

from __future__ import annotations

import json
import os

import pytest

import hubcache
from hubcache import IntegrityError
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer, archive_of, tree_of
from local_layout import manifest_data
from hostile_inputs import (PASSWORD, PIN, SIGNATURE, USER, basic, cache_root, every_byte_under, run_cli,
                            with_credentials)

SCENARIO = "15. Secrets and pins"
SIGNED = b"deadbeefcafe"  # the secret part of SIGNATURE


# -- credentials in the URL --------------------------------------------------------------------------


def test_credentials_are_sent_as_basic_auth_and_never_written_down(origin, model, events, figures):
    """A handle with ``user:password@``: the origin gets an ``Authorization: Basic`` header and
    serves; the cache (names and bytes), the manifest, the descriptor and the events hold
    ``***@`` in their place."""
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
    manifest = manifest_data(*os.path.split(path))
    shown = url.replace("http://", "http://***@")
    assert manifest["handle"] == shown and manifest["source"] == shown
    with open(path + ".descriptor.txt", encoding="utf-8") as f:
        assert shown in f.read()
    seen = repr([(e.kind, e.handle, e.data) for e in events])
    assert PASSWORD not in seen and USER not in seen and "***@" in seen
    figures.update(run="resolve http://user:password@127.0.0.1/…/m.tar.gz (in-process)",
                   origin_saw="Authorization: Basic (user:password)",
                   password_in_cache_dir=stored.count(PASSWORD.encode()),
                   user_in_cache_dir=stored.count(USER.encode()),
                   password_in_events=seen.count(PASSWORD), manifest_handle="http://***@127.0.0.1:PORT/…")


def test_credentials_do_not_follow_a_redirect_to_another_host(origin, model, events, figures):
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
    assert manifest_data(*os.path.split(path))["source"] == target.split("?")[0]
    stored = every_byte_under(cache_root())
    assert SIGNED not in stored and PASSWORD.encode() not in stored
    seen = repr([(e.kind, e.handle, e.data) for e in events])
    assert SIGNED.decode() not in seen and PASSWORD not in seen
    figures.update(run="handle with credentials, redirected by its host to a signed URL on another host",
                   origin_saw="Authorization: Basic", storage_saw="no Authorization; the signed query",
                   signature_in_cache_dir=stored.count(SIGNED), password_in_cache_dir=stored.count(PASSWORD.encode()),
                   signature_in_events=seen.count(SIGNED.decode()))


def test_the_cli_log_progress_bar_and_errors_never_show_credentials_or_signatures(origin, model, figures):
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
    stored = every_byte_under(cache_root())
    json_error = json.dumps(json.loads(json_out.stdout)[0]["error"]).encode()
    for secret in (PASSWORD.encode(), SIGNED):
        assert secret not in out.stdout + out.stderr
        assert secret not in stored
        assert secret not in json_error
    assert b"***@" in out.stderr
    figures.update(run="`hubcache -v resolve` (progress bar on) of a handle with credentials redirected to a "
                       "signed URL, cut once and retried, plus a 404; then `resolve --json` of the 404",
                   exit_status=out.returncode, stderr_lines=out.stderr.count(b"\n"),
                   password_in_log_and_stderr=(out.stdout + out.stderr).count(PASSWORD.encode()),
                   signature_in_log_and_stderr=(out.stdout + out.stderr).count(SIGNED),
                   secrets_in_json_output=json_error.count(PASSWORD.encode()) + json_error.count(SIGNED),
                   secrets_in_cache_dir=stored.count(PASSWORD.encode()) + stored.count(SIGNED))


# -- pins that cannot be checked -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file url"])
def test_a_pinned_directory_handle_is_an_error(model, form, figures):
    """A directory has no archive bytes to check a ``#sha256=`` pin against: an IntegrityError
    naming the handle that says to remove the pin."""
    handle = (model if form == "path" else f"file://{model}") + PIN
    with pytest.raises(IntegrityError, match="directory") as info:
        hubcache.resolve(handle)
    message = str(info.value)
    assert message.startswith(repr(handle)) and "no archive bytes" in message and "\n" not in message
    assert "remove the pin" in message
    figures.update(run=f"resolve a model directory, given as a {form}, with #sha256=…",
                   error="IntegrityError", message=message.replace(model, "DIR").replace(PIN[8:], PIN[8:12] + "…"))


def test_a_pinned_handle_read_uncompressed_is_an_error(origin, model, monkeypatch, figures):
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
    figures.update(run="TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED; resolve a tfhub.dev-style handle with #sha256=…, "
                       "and its gs:// directory with #sha256=…",
                   error="IntegrityError", origin_requests=origin.count(),
                   message=str(info.value).replace(handle, "HANDLE").replace(PIN[8:], PIN[8:12] + "…"))
