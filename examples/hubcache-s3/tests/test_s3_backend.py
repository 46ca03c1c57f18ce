"""The s3 backend as users meet it: installed with pip, found through its entry point, selected
by ``TFHUB_CACHE_DIR=s3://…``, racing other processes for the lease on a real S3 server (moto's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from importlib import metadata

import pytest

import hubcache
import hubcache_s3
from hubcache.core.config import load_config
from hubcache.core.handles import cache_key
from hubcache.core.resolver import select_backend_name
from hubcache.testing import archive_of, read_tree, tree_of
from hubcache_s3 import S3ObjectStore, s3_filesystem


def run_child(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run ``script`` in a fresh interpreter (no memo, no warm clients) with the test's settings."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def strip(url: str) -> str:
    return url.split("://", 1)[1]


# -- the plugin, as installed -------------------------------------------------------------------


def test_hubcache_plugins_lists_s3_with_distribution_and_version():
    version = metadata.version("hubcache-s3")
    assert version == hubcache_s3.__version__
    result = run_child("from hubcache.cli import main; raise SystemExit(main(['plugins', '--json']))")
    assert result.returncode == 0, result.stderr
    row = {r["name"]: r for r in json.loads(result.stdout)}["s3"]
    assert (row["distribution"], row["version"], row["status"]) == ("hubcache-s3", version, "loaded")
    assert row["backends"] == ["s3"] and row["module"] == "hubcache_s3" and not row["builtin"]
    text = run_child("from hubcache.cli import main; raise SystemExit(main(['plugins']))").stdout
    assert f"hubcache-s3 {version}" in text


def test_loading_the_plugin_imports_neither_s3fs_nor_botocore():
    script = """
        import sys
        from hubcache.core.plugins import get_registry
        assert "s3" in get_registry().backends
        print([m for m in ("s3fs", "botocore", "aiobotocore") if m in sys.modules])
    """
    result = run_child(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_s3fs_is_a_clear_error_naming_the_handle(s3_root):
    # s3fs is installed here (the package depends on it); a child process that blocks its import
    # (sys.modules[name] = None makes `import s3fs` raise ImportError) stands in for an
    # installation without it.
    script = """
        import sys
        sys.modules["s3fs"] = None
        import hubcache
        try:
            hubcache.resolve("https://example.com/model.tar.gz")
        except hubcache.MissingDependencyError as error:
            print(error)
    """
    result = run_child(script, env={"TFHUB_CACHE_DIR": s3_root})
    assert result.returncode == 0, result.stderr
    assert "s3fs" in result.stdout and "model.tar.gz" in result.stdout and "pip install" in result.stdout


@pytest.mark.parametrize("cache_dir", [None, "/some/local/dir", "s3://"])
def test_s3_backend_needs_an_s3_cache_dir(monkeypatch, cache_dir):
    monkeypatch.setenv("HUBCACHE_BACKEND", "s3")
    if cache_dir:
        monkeypatch.setenv("TFHUB_CACHE_DIR", cache_dir)
    with pytest.raises(hubcache.ConfigError) as info:
        hubcache.resolve("https://example.com/m.tar.gz")
    assert "TFHUB_CACHE_DIR=s3://bucket/prefix" in str(info.value)
    assert "m.tar.gz" in str(info.value)


# -- the conditional create the commit and the lease rest on --------------------------------------


def test_create_object_refuses_an_existing_key(s3_root):
    store = S3ObjectStore(s3_root, s3_filesystem())
    path = store.object_path("probe")
    store.create_object(path, b"first")
    with pytest.raises(FileExistsError):
        store.create_object(path, b"second")
    assert store.read_object(path) == b"first"
    # An empty object too (s3fs would close an empty "xb" file with an unconditional write).
    empty = store.object_path("empty")
    store.create_object(empty, b"")
    with pytest.raises(FileExistsError):
        store.create_object(empty, b"")


LEASE_CHILD = """
    import json, os, sys, time
    from hubcache_s3 import S3ObjectStore, s3_filesystem

    root, key = sys.argv[1], sys.argv[2]
    store = S3ObjectStore(root, s3_filesystem(), lease_ttl=2.0)
    ready = store.object_path(f"{key}.ready")
    store.read_object(ready)  # connect before the start line
    waited = []
    start = float(os.environ["CHILD_START_AT"])
    while time.time() < start:
        time.sleep(0.001)
    store.write_object(f"{ready}/{os.getpid()}", b"")
    with store.lock(key, waited.append):
        acquired = time.time()
        # Hold the lease until both processes have reached lock() (however late one started),
        # and a little longer, so the other one's attempt meets a held lease.
        while len(store.list_objects(ready)) < 2 and time.time() < acquired + 20:
            time.sleep(0.05)
        time.sleep(0.3)
        released = time.time()
    print(json.dumps({"pid": os.getpid(), "waited_for": waited, "acquired": acquired, "released": released}))
"""


def test_two_processes_race_for_the_lease_exactly_one_wins(s3_root):
    key = uuid.uuid4().hex + "0" * 8
    env = {**os.environ, "CHILD_START_AT": str(time.time() + 2.0)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(LEASE_CHILD), s3_root, key], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    winners = [r for r in results if not r["waited_for"]]
    assert len(winners) == 1, results
    winner, loser = winners[0], next(r for r in results if r["waited_for"])
    assert len(loser["waited_for"]) == 1 and f"pid {winner['pid']}" in loser["waited_for"][0], "names the holder"
    # Mutual exclusion: the loser got the lease only after the winner gave it back.
    assert loser["acquired"] >= winner["released"]
    store = S3ObjectStore(s3_root, s3_filesystem())
    assert store.read_object(store.object_path(f"{key}.lock")) is None, "a released lease is deleted"


# -- resolving through hubcache, in other processes -----------------------------------------------

RESOLVE_CHILD = """
    import json, sys
    import hubcache
    first = hubcache.resolve(sys.argv[1])
    second = hubcache.resolve(sys.argv[1])
    print(json.dumps([first, second]))
"""


def test_tfhub_cache_dir_s3_resolves_through_hubcache(origin, model, s3_root, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", s3_root)
    assert select_backend_name(load_config())[0] == "s3", "an s3:// cache dir selects the backend"
    url = origin.add("/models/tiny.tar.gz", archive_of(model, "zst"))
    # Only hubcache-s3's own endpoint setting: botocore's AWS_ENDPOINT_URL is taken away.
    env = {**os.environ, "HUBCACHE_BACKEND": "s3", "HUBCACHE_S3_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}
    del env["AWS_ENDPOINT_URL"]
    for attempt in range(2):  # two processes: the second has no memo and finds the entry in S3
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(RESOLVE_CHILD), url], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [f"{s3_root}/{cache_key(url)}"] * 2
    assert origin.count() == 1, "one download for four resolves in two processes"
    assert read_tree(f"{s3_root}/{cache_key(url)}") == tree_of(model)
    descriptor = S3ObjectStore(s3_root, s3_filesystem()).read_object(
        f"{strip(s3_root)}/{cache_key(url)}.descriptor.txt")
    assert descriptor is not None and f"Module: {url}".encode() in descriptor


RACE_CHILD = """
    import json, os, sys, time
    import s3fs  # imported before the start line, so racing children start together
    import hubcache
    from hubcache.core.plugins import get_registry

    kinds = []

    class Spy:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            kinds.append(event.kind)

    get_registry().register(Spy(), "spy")
    start = float(os.environ["CHILD_START_AT"])
    while time.time() < start:
        time.sleep(0.001)
    print(json.dumps({"path": hubcache.resolve(sys.argv[1]), "events": kinds}))
"""


def test_two_processes_resolving_the_same_handle_download_it_once(origin, model, s3_root):
    url = origin.add("/race.tar.gz", archive_of(model))
    # About a second of download, so the second process finds the lease held.
    origin.throttle("/race.tar.gz", len(archive_of(model)))
    env = {**os.environ, "TFHUB_CACHE_DIR": s3_root, "CHILD_START_AT": str(time.time() + 2.0)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACE_CHILD), url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert {r["path"] for r in results} == {f"{s3_root}/{cache_key(url)}"}
    downloaders = [r for r in results if "download_started" in r["events"]]
    assert len(downloaders) == 1, results
    assert "waiting" in next(r for r in results if r is not downloaders[0])["events"]
    assert origin.count("/race.tar.gz") == 1
    assert read_tree(results[0]["path"]) == tree_of(model)


def test_a_missing_bucket_is_a_one_line_error(origin, model, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", "s3://no-such-bucket/cache")
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(hubcache.CacheError) as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert "\n" not in message and url in message and "s3://no-such-bucket/cache" in message
    assert "bucket" in (info.value.hint or ""), message
