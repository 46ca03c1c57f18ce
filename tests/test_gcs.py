"""The ``gcs`` backend against a real GCS emulator, a real origin server and real processes.

What every object-store backend must do (racing processes, damage ``verify`` finds, entries
tensorflow_hub wrote, links stored as copies, a missing bucket...) runs in
:class:`TestGcsConformance`, the conformance kit's suite; the tests here are the backend's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import hubcache
from gcs_emulator import fresh_root, gcs
from hubcache.backends.gcs import GcsBackend
from hubcache.core.cache import download_into, resolve_in_store
from hubcache.core.config import load_config
from hubcache.core.errors import ConfigError
from hubcache.core.handles import cache_key, parse_handle
from hubcache.core.locate import locate
from hubcache.backends.gcs_store import GcsObjectStore
from hubcache.stores.objectstore import MIN_LEASE_TTL
from hubcache.core.resolver import select_backend_name
from hubcache.testing import ObjectStoreConformance, archive_of, build_model_dir, tree_of
from hubcache.testing import read_tree as read_any_tree


@pytest.fixture
def gcs_root() -> str:
    """A fresh prefix in the session's emulator bucket."""
    return fresh_root()


def strip(url: str) -> str:
    return url.split("://", 1)[1]


def read_tree(url: str) -> dict[str, bytes]:
    """Every file under a gs:// URL, read with the emulator's anonymous client (a client without a
    token would first walk google-auth's credential chain: 15 s per process with gcsfs 2024.12)."""
    return read_any_tree(url, gcs())


class TestGcsConformance(ObjectStoreConformance):
    @pytest.fixture
    def backend(self, conformance_config, gcs_root):
        return GcsBackend(conformance_config.replace(cache_dir=gcs_root, lease_ttl=5.0))


def resolve_with(backend, url: str) -> str:
    handle = parse_handle(url)
    return backend.resolve(handle, locate(handle, "COMPRESSED"))


# -- child processes --------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, time
    import hubcache
    from hubcache.plugins.registry import get_registry

    kinds = []

    class Spy:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            kinds.append(event.kind)
            if event.kind in ("waiting", "download_started"):
                print(json.dumps({"event": event.kind, "time": time.time()}), flush=True)

    get_registry().register(Spy(), "spy")
    path = hubcache.resolve(sys.argv[1])
    print(json.dumps({"path": path, "events": kinds}), flush=True)
""")


def spawn(handle: str, tmp_path, name: str, **env: str) -> subprocess.Popen:
    """A child process resolving ``handle`` with its own TMPDIR and the test's settings."""
    tmpdir = tmp_path / f"{name}-tmp"
    tmpdir.mkdir()
    child_env = {**os.environ, "TMPDIR": str(tmpdir), **env}
    # stderr goes to a file: finish() reads stdout through its buffer (read_line may have
    # buffered more than one line), which communicate() would bypass.
    stderr_path = tmp_path / f"{name}-stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, handle], env=child_env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    proc.stderr_path = stderr_path
    return proc


def read_line(proc: subprocess.Popen, timeout: float = 20.0) -> dict:
    """The child's next JSON line (fails the test after ``timeout`` seconds)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert result and result[0], f"no output from the child: {proc.poll()=}"
    return json.loads(result[0])


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> dict:
    """Wait for the child; return its last JSON line (the result)."""
    proc.stdin.close()
    proc.wait(timeout)
    assert proc.returncode == 0, proc.stderr_path.read_text()
    return json.loads(proc.stdout.read().strip().splitlines()[-1])


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def local_files(path) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


# -- selection and configuration -------------------------------------------------------------


def test_gs_cache_dir_selects_gcs_cold_miss_then_hit(origin, model, gcs_root, monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", gcs_root)
    assert select_backend_name(load_config())[0] == "gcs"
    handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model))
    path = hubcache.resolve(handle)
    assert path == f"{gcs_root}/{cache_key(handle)}"
    assert read_tree(path) == tree_of(model)
    assert origin.count("/storage/google/tiny/1.tar.gz") == 1
    assert hubcache.resolve(handle) == path  # memoised
    # Another process (its own memo and TMPDIR) gets the hit: no origin request at all.
    origin.reset_counts()
    assert finish(spawn(handle, tmp_path, "reader"))["path"] == path
    assert origin.count() == 0
    assert local_files(tmp_path / "tmp") == [], "the gcs backend must not leave local files"


def test_hit_costs_one_request(origin, model, gcs_root):
    """A hit in a new process reads the descriptor (which holds the manifest) and nothing else."""

    class Counting(GcsObjectStore):
        calls: list[str] = []

        def read_object(self, path, limit=None):
            self.calls.append(f"read {path}")
            return super().read_object(path, limit)

        def read_versioned(self, path, limit=None):
            self.calls.append(f"read {path}")
            return super().read_versioned(path, limit)

        def list_objects(self, path):
            self.calls.append(f"list {path}")
            return super().list_objects(path)

        def create_object(self, path, data):
            self.calls.append(f"create {path}")
            return super().create_object(path, data)

    url = origin.add("/m.tar.gz", archive_of(model))
    handle = parse_handle(url)
    config = load_config()
    store = Counting(gcs_root, gcs())
    path, _ = resolve_in_store(store, handle, locate(handle, "COMPRESSED"), config)
    store.calls.clear()
    fresh = Counting(gcs_root, gcs())
    assert resolve_in_store(fresh, handle, locate(handle, "COMPRESSED"), config)[0] == path
    assert fresh.calls == [f"read {strip(gcs_root)}/{handle.key}.descriptor.txt"]


@pytest.mark.parametrize("cache_dir", [None, "/some/local/dir"])
def test_gcs_backend_needs_a_gs_cache_dir(monkeypatch, cache_dir):
    monkeypatch.setenv("HUBCACHE_BACKEND", "gcs")
    if cache_dir:
        monkeypatch.setenv("TFHUB_CACHE_DIR", cache_dir)
    with pytest.raises(ConfigError) as info:
        hubcache.resolve("https://example.com/m.tar.gz")
    assert "TFHUB_CACHE_DIR=gs://bucket/prefix" in str(info.value)
    assert "m.tar.gz" in str(info.value)


def test_missing_gcsfs_names_the_extra(tmp_path):
    # gcsfs is installed here (the tests need it); a child process that blocks its import
    # (sys.modules[name] = None makes `import gcsfs` raise ImportError) stands in for an
    # installation without the extra.
    script = textwrap.dedent("""
        import sys
        sys.modules["gcsfs"] = None
        import hubcache
        try:
            hubcache.resolve("https://example.com/model.tar.gz")
        except hubcache.MissingDependencyError as error:
            print(error)
    """)
    env = {**os.environ, "TFHUB_CACHE_DIR": "gs://some-bucket/cache", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "gcsfs" in out.stdout and "pip install 'hubcache[gcs]'" in out.stdout
    assert "model.tar.gz" in out.stdout


def test_import_hubcache_does_not_import_gcsfs():
    script = ("import sys, hubcache; from hubcache.plugins.registry import get_registry; "
              "r = get_registry(); assert {'gcs', 'remote'} <= set(r.backends), r.backends; "
              "print('gcsfs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- the commit protocol ------------------------------------------------------------------------


def test_upload_killed_before_manifest_is_not_trusted_and_redone(origin, tmp_path, gcs_root, monkeypatch):
    # Four 1 MB shards of random bytes: the first two fill an upload batch, which goes up while
    # the rest still trickles in from the throttled origin, so the kill lands mid-upload.
    model = build_model_dir(tmp_path / "big", weights_bytes=4 << 20, shards=4)
    data = archive_of(model)
    url = origin.add("/big.tar.gz", data)
    origin.throttle("/big.tar.gz", len(data) / 3.0)
    monkeypatch.setenv("TFHUB_CACHE_DIR", gcs_root)
    monkeypatch.setenv("HUBCACHE_LEASE_TTL", "2")
    key = cache_key(url)
    fs = gcs()
    entry = f"{strip(gcs_root)}/{key}"
    child = spawn(url, tmp_path, "killed")
    try:
        # Under "<key>/" only: gcsfs 2024.12's find() of an empty prefix returns its siblings.
        wait_for(lambda: child.poll() is not None or fs.find(f"{entry}/"), 20, "the first uploaded objects")
        assert child.poll() is None, child.stderr_path.read_text()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    uploaded = fs.find(f"{entry}/")
    assert uploaded and not fs.exists(f"{entry}.descriptor.txt")
    assert len(uploaded) < len(tree_of(model)), "the child was killed after its upload had finished"
    backend = GcsBackend(load_config())
    states = {e.key: e.state for e in backend.entries()}
    assert states[key] == "in progress", "an entry without a manifest must not be trusted"
    assert backend.store.lookup(key, url) is None
    origin.throttle("/big.tar.gz", None)
    path = hubcache.resolve(url)  # takes the dead child's lease over, then downloads again
    assert read_tree(path) == tree_of(model)
    assert origin.count("/big.tar.gz") == 2
    assert {e.key: e.state for e in backend.entries()}[key] == "committed"
    assert not fs.exists(f"{entry}.lock"), "the lease is released after the commit"


@contextlib.contextmanager
def uploading(store, url: str):
    """Under the lease of ``url``'s entry, a writer that uploaded the whole archive (no commit):
    yields ``(writer, the object paths it wrote)``."""
    handle = parse_handle(url)
    with store.lock(handle.key, on_wait=lambda holder: None):
        writer = store.writer(handle.key, url)
        download_into(writer, handle, locate(handle, "COMPRESSED"), load_config())
        writer._flush()
        writer._wait()
        yield writer, sorted(writer._written)


def test_a_writer_whose_lease_was_taken_over_deletes_nothing_on_abort(origin, model, gcs_root):
    """A holder that stalled past the TTL lost its lease to another host, which now uploads the
    same keys: when the stale holder then fails, its abort must not delete those objects (the new
    holder owns the entry; its commit removes what it does not use)."""
    url = origin.add("/stale.tar.gz", archive_of(model))
    store = GcsObjectStore(gcs_root, gcs(), lease_ttl=0.6)
    lease_object = f"{strip(gcs_root)}/{parse_handle(url).key}.lock"
    with uploading(store, url) as (writer, uploaded):
        assert len(uploaded) > 2
        # Another host takes the lease over (as after a stall) and rewrites two of the objects.
        gcs().pipe_file(lease_object, json.dumps({"owner": "other-host pid 1", "lease": "other",
                                                  "beat": 1, "time": time.time(), "ttl": 0.6}).encode())
        rewritten = uploaded[:2]
        for path in rewritten:
            gcs().pipe_file(path, b"the new holder's bytes")
        wait_for(lambda: store.lease_lost(parse_handle(url).key), 5.0, "the heartbeat to notice the takeover")
        writer.abort()
    assert [gcs().cat_file(path) for path in rewritten] == [b"the new holder's bytes"] * 2
    assert all(gcs().exists(path) for path in uploaded), "the new holder's entry is left to it"


def test_an_abort_withdraws_only_the_versions_it_wrote(origin, model, gcs_root):
    """A writer that still holds its lease and fails withdraws its uploads, each only at the
    generation it wrote: an object rewritten since by someone else stays."""
    url = origin.add("/withdraw.tar.gz", archive_of(model))
    with uploading(GcsObjectStore(gcs_root, gcs()), url) as (writer, uploaded):
        gcs().pipe_file(uploaded[0], b"someone else's bytes")
        writer.abort()
    assert gcs().cat_file(uploaded[0]) == b"someone else's bytes"
    assert not any(gcs().exists(path) for path in uploaded[1:])


def test_spooled_large_files_and_small_batches(origin, model, gcs_root):
    """Files above the in-memory threshold are spooled and streamed; small ones go in batches."""
    url = origin.add("/spool.tar.zst", archive_of(model, "zst"))
    handle = parse_handle(url)
    store = GcsObjectStore(gcs_root, gcs(), workers=3, small_file=50_000, batch_bytes=10_000, batch_files=2)
    path, manifest = resolve_in_store(store, handle, locate(handle, "COMPRESSED"), load_config())
    assert max(f.size for f in manifest.files) > 50_000
    assert read_tree(path) == tree_of(model)
    assert store.verify(handle.key, full=True) == []


def test_gs_archive_handles_work_with_every_cache_backend(model, gcs_root, monkeypatch):
    archive = f"{gcs_root}/archives/model.tar.gz"
    gcs().pipe_file(strip(archive), archive_of(model))
    local = hubcache.resolve(archive)  # the default tmp backend
    assert local.startswith(os.environ["TMPDIR"]) and tree_of(local) == tree_of(model)
    monkeypatch.setenv("TFHUB_CACHE_DIR", f"{gcs_root}/cache")
    remote = hubcache.resolve(archive)
    assert remote == f"{gcs_root}/cache/{cache_key(archive)}"
    assert read_tree(remote) == tree_of(model)


# -- many hosts, one bucket ----------------------------------------------------------------------


def test_lease_takeover_after_holder_is_killed(origin, model, gcs_root, tmp_path, monkeypatch):
    data = archive_of(model)
    url = origin.add("/slow.tar.gz", data)
    origin.throttle("/slow.tar.gz", 2000)  # the holder would take minutes
    ttl = 2.0
    monkeypatch.setenv("TFHUB_CACHE_DIR", gcs_root)
    monkeypatch.setenv("HUBCACHE_LEASE_TTL", str(ttl))
    key = cache_key(url)
    holder = spawn(url, tmp_path, "holder")
    waiter = None
    try:
        assert read_line(holder)["event"] == "download_started"
        lease = json.loads(gcs().cat_file(f"{strip(gcs_root)}/{key}.lock"))
        assert lease["owner"].endswith(f"pid {holder.pid}")
        waiter = spawn(url, tmp_path, "waiter")
        assert read_line(waiter)["event"] == "waiting"
        time.sleep(ttl)  # the waiter sees a live heartbeat for a while: no takeover
        assert waiter.poll() is None
        origin.throttle("/slow.tar.gz", None)
        holder.send_signal(signal.SIGKILL)
        killed_at = time.time()
        taken = read_line(waiter, timeout=ttl + 10)
        assert taken["event"] == "download_started"
        takeover = taken["time"] - killed_at
        print(f"\nlease takeover {takeover:.2f} s after SIGKILL (HUBCACHE_LEASE_TTL={ttl:g})")
        # A lease is judged by at least MIN_LEASE_TTL (3 s): three heartbeats at the 1 s floor.
        judged = max(ttl, MIN_LEASE_TTL)
        assert judged - 1.5 < takeover < judged + 3
        result = finish(waiter)
    finally:
        holder.kill()
        holder.wait()
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert result["path"] == f"{gcs_root}/{key}"
    assert read_tree(result["path"]) == tree_of(model)
    assert origin.count("/slow.tar.gz") == 2


def test_an_emulator_is_never_sent_real_credentials(tmp_path, monkeypatch):
    """With STORAGE_EMULATOR_HOST set and no HUBCACHE_GCS_TOKEN, the credentials gcsfs would find
    (here: application-default credentials of a user) must not go to the emulator's host."""
    from hubcache.backends.gcs import gcs_filesystem

    gcs()  # the emulator runs; STORAGE_EMULATOR_HOST names it
    # A user's application-default credentials; its token endpoint is a closed loopback port, so
    # nothing leaves the machine even if something tried to refresh it.
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "id.apps.googleusercontent.com",
                               "client_secret": "secret", "refresh_token": "real-refresh-token",
                               "token_uri": "http://127.0.0.1:9/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.delenv("HUBCACHE_GCS_TOKEN", raising=False)
    fs = gcs_filesystem()
    assert fs.credentials.credentials is None and fs.credentials.method == "anon"
    assert GcsBackend(load_config().replace(cache_dir=fresh_root())).describe()["token"].startswith("anon")
    monkeypatch.setenv("HUBCACHE_GCS_TOKEN", "google_default")  # an explicit choice is kept
    assert gcs_filesystem().credentials.method == "google_default"


def test_cli_rm_and_prune_keep_a_download_in_progress_on_another_host(gcs_root, tmp_path, monkeypatch):
    """`hubcache rm` and `hubcache prune`, run as their own processes, leave alone an entry whose
    lease a third process holds (a download in progress), and say who downloads it; exit 1 for rm."""
    from hubcache.conformance import LeaseHolder

    monkeypatch.setenv("TFHUB_CACHE_DIR", gcs_root)
    backend = GcsBackend(load_config().replace(cache_dir=gcs_root))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    with LeaseHolder(backend, str(tmp_path), lease_ttl=30.0, upload=True) as holder:
        rm = subprocess.run([sys.executable, "-m", "hubcache", "rm", holder.key], capture_output=True,
                            text=True, env=env, timeout=60)
        prune = subprocess.run([sys.executable, "-m", "hubcache", "prune", "--json"], capture_output=True,
                               text=True, env=env, timeout=60)
        store = backend.store
        objects = store.list_objects(store.object_path(holder.key))
        lease = json.loads(store.read_object(store._lease_path(holder.key)))
    print(f"\nhubcache rm: {rm.stdout.strip()} {rm.stderr.strip()}")
    assert rm.returncode == 1, (rm.stdout, rm.stderr)
    assert "being downloaded by" in rm.stdout + rm.stderr and f"pid {holder.pid}" in rm.stdout + rm.stderr
    assert "Traceback" not in rm.stderr + prune.stderr
    assert prune.returncode == 0, prune.stderr
    actions = [a for report in json.loads(prune.stdout) for a in report.get("actions", [])]
    assert actions and all(a["outcome"] == "kept" and f"pid {holder.pid}" in str(a) for a in actions), actions
    assert objects and lease["lease"] == holder.lease, "the download's objects and lease are intact"


def test_a_gs_cache_dir_holds_exactly_tensorflow_hubs_names_and_a_hit_writes_nothing(origin, tmp_path, gcs_root,
                                                                                       monkeypatch):
    """``TFHUB_CACHE_DIR=gs://...``: after cold resolves of two handles (one in this process, one
    in a child), the bucket prefix holds ``<key>/...`` and ``<key>.descriptor.txt`` per model and
    nothing else (no lease, no manifest object); a hit in a new process sends the emulator one
    request, a GET of the descriptor, and no write (counted in the emulator's own request log)."""
    import gcs_emulator

    monkeypatch.setenv("TFHUB_CACHE_DIR", gcs_root)
    models = [build_model_dir(tmp_path / f"m{i}", weights_bytes=30_000, seed=i) for i in range(2)]
    urls = [origin.add(f"/names-{i}.tar.gz", archive_of(m)) for i, m in enumerate(models)]
    hubcache.resolve(urls[0])
    assert finish(spawn(urls[1], tmp_path, "second"))["path"] == f"{gcs_root}/{cache_key(urls[1])}"
    prefix = strip(gcs_root)
    names = {p[len(prefix) + 1:] for p in gcs().find(prefix)}
    expected = {f"{cache_key(u)}/{rel}" for u, m in zip(urls, models) for rel in tree_of(m)}
    assert names == expected | {f"{cache_key(u)}.descriptor.txt" for u in urls}
    time.sleep(0.5)  # the emulator's log is drained by a thread
    mark = gcs_emulator.log_mark()
    assert finish(spawn(urls[0], tmp_path, "hit"))["path"] == f"{gcs_root}/{cache_key(urls[0])}"
    time.sleep(0.5)
    requests = [line for line in gcs_emulator.log_since(mark) if b'\\"' in line and b"HTTP/1.1" in line]
    writes = [line for line in requests if any(m in line for m in (b'\\"POST ', b'\\"PUT ', b'\\"PATCH ',
                                                                     b'\\"DELETE '))]
    assert writes == [], writes
    descriptor = f"{prefix}/{cache_key(urls[0])}.descriptor.txt".replace("/", "%2F").split("%2F", 1)[1]
    assert len(requests) == 1 and b'\\"GET ' in requests[0] and descriptor.encode() in requests[0], requests
    assert origin.count() == 2
