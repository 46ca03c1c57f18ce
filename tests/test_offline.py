"""Offline mode (``HUBCACHE_OFFLINE=1``): committed entries only, and never a network call.

"No network call" is proved two ways: the origin server is stopped (the issue's set-up), and the
resolving child process runs under a Python audit hook (``sys.addaudithook``, the interpreter's
own instrumentation, not a mock) that records every socket created, connected or name looked up.
Where the origin is left running, its request count must stay at zero as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import hubcache
from hubcache.cli import main
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, tree_of

AUDITED = textwrap.dedent("""
    import json, sys
    network = []

    def audit(event, args):
        if event in ("socket.__new__", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.sendto", "socket.bind"):
            network.append(event)

    sys.addaudithook(audit)
    import hubcache
    out = {"network": network}
    try:
        out["path"] = hubcache.resolve(sys.argv[1])
    except hubcache.HubcacheError as error:
        out["error"], out["kind"] = str(error), type(error).__name__
    print(json.dumps(out))
""")


def resolve_audited(handle: str, **env: str) -> dict:
    """Resolve in a child process under the audit hook; returns path or error, and the network
    events the child produced."""
    result = subprocess.run([sys.executable, "-c", AUDITED, handle], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def cached(origin, model, monkeypatch):
    """A handle downloaded into the home cache while online; returns (url, path)."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    url = origin.add("/online.tar.gz", archive_of(model, "zst"))
    online = resolve_audited(url)
    assert "path" in online and online["network"], "the online download does use the network"
    return url, online["path"]


def test_cached_entry_resolves_offline_with_the_origin_stopped(cached, origin, model):
    url, path = cached
    origin.stop()
    offline = resolve_audited(url, HUBCACHE_OFFLINE="1")
    assert offline == {"network": [], "path": path}
    assert tree_of(path) == tree_of(model)


def test_miss_offline_names_the_handle_and_how_to_prefetch_it(cached, origin, model):
    missing = origin.add("/never-fetched.tar.gz", archive_of(model))
    origin.reset_counts()
    offline = resolve_audited(missing, HUBCACHE_OFFLINE="1")
    assert offline["kind"] == "OfflineError" and offline["network"] == []
    assert offline["error"] == (f"{missing!r}: not in the cache, and offline mode is on (HUBCACHE_OFFLINE) "
                                f"(run `hubcache prefetch {missing}` while online)")
    assert origin.count() == 0, "the running origin saw no request"
    origin.stop()
    assert resolve_audited(missing, HUBCACHE_OFFLINE="1") == offline


def test_tfhub_style_handle_prefetched_then_used_offline(origin, model, monkeypatch, capsys):
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    handle = origin.add_tfhub_model("/google/tiny/3", archive_of(model))
    assert main(["prefetch", handle]) == 0
    origin.stop()
    offline = resolve_audited(handle, HUBCACHE_OFFLINE="1")
    assert offline["network"] == [] and tree_of(offline["path"]) == tree_of(model)


def test_damaged_entry_is_not_served_offline(cached, origin):
    url, path = cached
    os.unlink(os.path.join(path, "saved_model.pb"))
    origin.stop()
    offline = resolve_audited(url, HUBCACHE_OFFLINE="1")
    assert offline["kind"] == "OfflineError" and offline["network"] == []


def test_cli_resolve_offline(cached, origin, capsys, monkeypatch):
    url, path = cached
    origin.stop()
    monkeypatch.setenv("HUBCACHE_OFFLINE", "1")
    missing = url.replace("online", "elsewhere")
    assert main(["resolve", url, missing]) == 1
    out, err = capsys.readouterr()
    assert out == path + "\n"
    assert err == (f"hubcache: error: {missing!r}: not in the cache, and offline mode is on "
                   f"(HUBCACHE_OFFLINE) (run `hubcache prefetch {missing}` while online)\n")


def test_prefetch_offline_checks_what_is_missing(cached, origin, capsys, monkeypatch):
    url, _ = cached
    origin.stop()
    monkeypatch.setenv("HUBCACHE_OFFLINE", "1")
    missing = url.replace("online", "elsewhere")
    assert main(["prefetch", "--json", url, missing]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [(r["handle"], r["status"], r["kind"]) for r in results] == [
        (url, "cached", None), (missing, "failed", "OfflineError")]


def test_switching_offline_in_process_keeps_hits(cached, origin, monkeypatch):
    url, path = cached
    assert hubcache.resolve(url) == path
    origin.stop()
    monkeypatch.setenv("HUBCACHE_OFFLINE", "1")  # part of the settings fingerprint: re-selected
    assert hubcache.resolve(url) == path
    assert resolver.current_backend()[0].get("offline") is True
    with pytest.raises(hubcache.OfflineError) as info:
        hubcache.resolve(url + "?other")
    assert info.value.handle == url + "?other"
    assert cache_key(url + "?other") not in os.listdir(os.path.dirname(path))
