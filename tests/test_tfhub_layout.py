"""The cache layout is tensorflow_hub's, both ways.

(a) An entry written the way tensorflow_hub writes it (``<sha1(handle)>/`` plus a
``<sha1>.descriptor.txt`` without hubcache's ``Writer:`` line) is adopted without any request at
the origin when it is a complete SavedModel, and downloaded again when it is not.
(b) With tensorflow_hub installed, its own resolver returns hubcache's entries without contacting
the origin, and hubcache adopts what tensorflow_hub downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.core import entry as entry_layout
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import archive_of, build_model_dir, tree_of
from local_layout import manifest_data


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), "tfhub_modules")


def write_like_tensorflow_hub(handle: str, source_dir: str) -> str:
    """Put ``source_dir`` in the cache as tensorflow_hub's resolver leaves a finished download:
    the entry dir, and a descriptor in its format (``resolver._write_module_descriptor_file``)."""
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, cache_key(handle))
    shutil.copytree(source_dir, entry)
    with open(entry + ".descriptor.txt", "w") as f:
        f.write(f"Module: {handle}\nDownload Time: {datetime.today()}\n"
                f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})")
    return entry


@pytest.fixture
def served(origin, tmp_path):
    """A tfhub.dev-style handle on the origin serving a model different from the cached one,
    so a download would be visible both in the request count and in the files."""
    fresh = build_model_dir(tmp_path / "served", weights_bytes=50_000, shards=2, seed=99)
    return origin.add_tfhub_model("/google/cached/1", archive_of(fresh, "gz")), fresh


def test_a_complete_tensorflow_hub_entry_is_adopted_without_a_request(origin, model, served):
    handle, _ = served
    entry = write_like_tensorflow_hub(handle, model)
    # Debris a crashed tensorflow_hub download leaves: its own lock and temp dir names.
    open(entry + ".lock", "w").close()
    os.makedirs(f"{entry}.0123456789abcdef.tmp")
    descriptor = open(entry + ".descriptor.txt").read()

    assert hubcache.resolve(handle) == entry
    assert origin.count() == 0
    assert tree_of(entry) == tree_of(model)
    # Adopted: its descriptor now ends with a manifest (tensorflow_hub's lines kept, hubcache's
    # added), and it is listed as committed; tensorflow_hub's other files are intact.
    states = {e.key: e.state for e in LocalStore(cache_root()).entries()}
    assert states[cache_key(handle)] == "committed"
    manifest = manifest_data(cache_root(), cache_key(handle))
    assert manifest["creator"] == "adopted from tensorflow_hub"
    assert sorted(p for p, _, _ in manifest["files"]) == sorted(tree_of(model))
    with open(entry + ".descriptor.txt", "rb") as f:
        assert entry_layout.descriptor_head(f.read()) == f"{descriptor}\n{entry_layout.WRITER_TAG}\n"
    assert os.path.exists(entry + ".lock") and os.path.isdir(f"{entry}.0123456789abcdef.tmp")
    # Later resolves (a new process has no memo) are hits too.
    resolver.clear_memo()
    assert hubcache.resolve(handle) == entry and origin.count() == 0


def test_a_tf1_hub_module_entry_is_adopted(origin, tmp_path, served):
    handle, _ = served
    module = tmp_path / "tf1"
    (module / "variables").mkdir(parents=True)
    (module / "tfhub_module.pb").write_bytes(b"\x08\x03")
    (module / "saved_model.pb").write_bytes(b"\x08\x01" * 100)
    (module / "variables" / "variables.index").write_bytes(b"idx")
    (module / "variables" / "variables.data-00000-of-00001").write_bytes(b"w" * 1000)
    entry = write_like_tensorflow_hub(handle, str(module))
    assert hubcache.resolve(handle) == entry and origin.count() == 0


def _remove_shard(entry: str) -> None:
    os.unlink(os.path.join(entry, "variables", "variables.data-00001-of-00002"))


def _empty(entry: str) -> None:
    shutil.rmtree(entry)
    os.mkdir(entry)


def _no_saved_model(entry: str) -> None:
    os.unlink(os.path.join(entry, "saved_model.pb"))


def _empty_saved_model(entry: str) -> None:
    open(os.path.join(entry, "saved_model.pb"), "w").close()


def _no_descriptor(entry: str) -> None:
    # Without a descriptor nobody can say who wrote it: hubcache does not trust it.
    os.unlink(entry + ".descriptor.txt")


@pytest.mark.parametrize("damage", [_remove_shard, _empty, _no_saved_model, _empty_saved_model, _no_descriptor],
                         ids=lambda fn: fn.__name__.strip("_"))
def test_an_incomplete_tensorflow_hub_entry_is_downloaded_again(origin, model, served, damage):
    handle, fresh = served
    entry = write_like_tensorflow_hub(handle, model)
    damage(entry)
    assert hubcache.resolve(handle) == entry
    assert origin.count("/storage/google/cached/1.tar.gz") == 1
    assert tree_of(entry) == tree_of(fresh)
    with open(entry + ".descriptor.txt") as f:
        assert f.readline() == f"Module: {handle}\n"


def test_hubcache_entries_have_the_layout_tensorflow_hub_reads(origin, model):
    handle = origin.add_tfhub_model("/google/fresh/1", archive_of(model, "gz"))
    path = hubcache.resolve(handle)
    key = cache_key(handle)
    assert path == os.path.join(cache_root(), key) and os.listdir(path)
    with open(path + ".descriptor.txt") as f:
        assert f.readline() == f"Module: {handle}\n"
    # tensorflow_hub treats `<sha1>.lock` as a download in progress: hubcache must not leave one.
    assert not os.path.exists(path + ".lock")
    assert not [n for n in os.listdir(cache_root()) if n.endswith(".tmp")]


# -- (b) tensorflow_hub itself ----------------------------------------------------------------------


def test_tensorflow_hub_and_hubcache_share_one_cache(origin, model, tmp_path, monkeypatch):
    # tensorflow_hub comes with the test extra: without it this fails rather than skips.
    assert importlib.util.find_spec("tensorflow_hub") is not None, "pip install -e '.[test]'"
    cache = tmp_path / "shared-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    ours = origin.add_tfhub_model("/google/by-hubcache/1", archive_of(model, "gz"))
    theirs = origin.add_tfhub_model("/google/by-tfhub/1", archive_of(model, "gz"))

    made_by_hubcache = hubcache.resolve(ours)
    assert made_by_hubcache == str(cache / cache_key(ours))
    origin.reset_counts()

    program = """
        import json, sys
        import tensorflow_hub
        print(json.dumps([tensorflow_hub.resolve(h) for h in sys.argv[1:]]))
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(program), ours, theirs],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    by_tfhub = json.loads(out.stdout.strip().splitlines()[-1])

    # tensorflow_hub found hubcache's entry and did not ask the origin for it...
    assert by_tfhub[0] == made_by_hubcache
    assert origin.count("/google/by-hubcache/1") == 0
    assert origin.count("/storage/google/by-hubcache/1.tar.gz") == 0
    # ...and downloaded the other one itself, into the same layout.
    assert by_tfhub[1] == str(cache / cache_key(theirs))
    assert origin.count("/storage/google/by-tfhub/1.tar.gz") == 1
    assert tree_of(by_tfhub[1]) == tree_of(model)

    # hubcache adopts what tensorflow_hub downloaded, without a request.
    origin.reset_counts()
    assert hubcache.resolve(theirs) == by_tfhub[1]
    assert origin.count() == 0
    # And the cache holds what tensorflow_hub's own tests expect: two names per model.
    keys = (cache_key(ours), cache_key(theirs))
    assert set(os.listdir(cache)) == {n for k in keys for n in (k, f"{k}.descriptor.txt")}


TFHUB_WAITER = """
    import json, os, sys, time
    import tensorflow_hub
    from tensorflow_hub import resolver as tfhub_resolver, tf_utils

    tf_utils.read_file_to_string("/proc/self/status")  # file systems loaded before the clock starts
    print("ready", flush=True)
    lock = sys.stdin.readline().strip()
    # What tensorflow_hub watches of a lock it finds to judge it alive: the holder's temp dir,
    # named by the task in the lock file (resolver._wait_for_lock_to_disappear).
    task = tfhub_resolver._task_uid_from_lock_file(lock)
    watched = tfhub_resolver._temp_download_dir(tfhub_resolver._module_dir(lock), task)
    print(json.dumps([tf_utils.read_file_to_string(lock), watched, os.path.isdir(watched)]), flush=True)
    print(json.dumps([tensorflow_hub.resolve(h) for h in sys.argv[1:3]]), flush=True)
    print(json.dumps(tensorflow_hub.resolve(sys.argv[3])), flush=True)
"""


@pytest.mark.slow
def test_tensorflow_hub_and_hubcache_wait_for_each_others_downloads(origin, tmp_path, monkeypatch, events):
    """Real tensorflow_hub in a child process, one cache, three models:

    - A, committed by hubcache: tensorflow_hub serves it without a request;
    - B, being downloaded by another hubcache process: tensorflow_hub finds `<key>.lock`, measures
      the holder's temp dir growing (its own staleness check), waits, and serves hubcache's entry;
    - C, downloaded by tensorflow_hub: hubcache finds tensorflow_hub's `<key>.lock`, waits (a
      `waiting` event naming tensorflow_hub) and adopts the entry.

    Each archive is requested once; the cache ends with two names per model."""
    assert importlib.util.find_spec("tensorflow_hub") is not None, "pip install -e '.[test]'"
    cache = tmp_path / "shared-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    handles, archives = [], []
    for name, seed, size in (("a", 1, 300_000), ("b", 2, 1_500_000), ("c", 3, 300_000)):
        model = build_model_dir(tmp_path / name, weights_bytes=size, shards=1, seed=seed)
        handles.append(origin.add_tfhub_model(f"/google/{name}/1", archive_of(model, "gz")))
        archives.append(f"/storage/google/{name}/1.tar.gz")
    a, b, c = handles
    path_a = hubcache.resolve(a)
    origin.throttle(archives[1], 300_000)  # about 5 s and 3 s
    origin.throttle(archives[2], 100_000)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    tfhub = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TFHUB_WAITER), a, b, c], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    downloader = None
    try:
        assert tfhub.stdout.readline().strip() == "ready", tfhub.stderr.read()[-3000:]
        downloader = subprocess.Popen([sys.executable, "-c", "import sys, hubcache; hubcache.resolve(sys.argv[1])", b],
                                      stderr=subprocess.PIPE, text=True)
        lock_b = str(cache / f"{cache_key(b)}.lock")
        deadline = time.monotonic() + 30
        while not (os.path.exists(lock_b) and os.path.getsize(lock_b)
                   and [n for n in os.listdir(cache) if n.endswith(".tmp")]):
            assert time.monotonic() < deadline and downloader.poll() is None, "hubcache's download never started"
            time.sleep(0.01)
        tfhub.stdin.write(lock_b + "\n")
        tfhub.stdin.flush()
        line = tfhub.stdout.readline()
        assert line, tfhub.stderr.read()[-3000:]
        text, watched, exists = json.loads(line)
        # tensorflow_hub reads hubcache's lock and watches the temp dir hubcache writes into.
        assert text.startswith(f"{socket.gethostname()}.{downloader.pid}.hc"), text
        assert exists and os.path.dirname(watched) == str(cache) and watched.startswith(lock_b[:-5] + ".hc")
        assert downloader.poll() is None, "hubcache's download ended before tensorflow_hub asked for B"
        assert json.loads(tfhub.stdout.readline()) == [path_a, str(cache / cache_key(b))]
        assert downloader.wait(timeout=60) == 0, downloader.stderr.read()
        lock_c = cache / f"{cache_key(c)}.lock"
        while not lock_c.exists():
            assert time.monotonic() < deadline + 60 and tfhub.poll() is None, tfhub.stderr.read()[-3000:]
            time.sleep(0.005)
        path_c = hubcache.resolve(c)  # while tensorflow_hub downloads it
        assert json.loads(tfhub.stdout.readline()) == path_c == str(cache / cache_key(c))
        assert tfhub.wait(timeout=60) == 0
    finally:
        for proc in (tfhub, downloader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    waited = [e.data["holder"] for e in events if e.kind == "waiting" and e.handle == c]
    assert waited and "tensorflow_hub" in waited[0], waited
    assert [origin.count(path) for path in archives] == [1, 1, 1], "a download was repeated"
    assert LocalStore(str(cache)).read_manifest(cache_key(c)).creator == "adopted from tensorflow_hub"
    keys = [cache_key(h) for h in handles]
    assert set(os.listdir(cache)) == {n for k in keys for n in (k, f"{k}.descriptor.txt")}


TFHUB_IMPATIENT = """
    import json, sys, time, types
    from tensorflow_hub import resolver as tfhub_resolver

    module_dir, handle = sys.argv[1:3]
    # tensorflow_hub's wait loop pauses a fixed 5 s between its looks at the lock
    # (resolver._wait_for_lock_to_disappear); only that pause is shortened here, so the test takes
    # seconds, not a minute. The staleness check itself (the holder's temp dir did not grow for
    # lock_file_timeout_sec) is tensorflow_hub's own.
    real_sleep = time.sleep
    tfhub_resolver.time = types.SimpleNamespace(time=time.time, sleep=lambda s: real_sleep(min(s, 0.2)))
    stolen = []

    def download(handle, tmp_dir):  # called only if tensorflow_hub took the lock for itself
        stolen.append(time.time())
        raise RuntimeError("stolen")

    print("ready", flush=True)
    sys.stdin.readline()
    try:
        path = tfhub_resolver.atomic_download(handle, download, module_dir, lock_file_timeout_sec=1)
    except RuntimeError:
        path = None
    print(json.dumps({"path": path, "stolen": bool(stolen)}), flush=True)
"""


def test_tensorflow_hub_never_steals_the_lock_of_a_slow_download_that_makes_progress(origin, tmp_path, monkeypatch):
    """A real tensorflow_hub resolve (its ``atomic_download`` with a 1 s ``lock_file_timeout_sec``)
    finds the lock of a hubcache download (another process) that a loopback origin trickles at
    about 250 kB/s: tensorflow_hub measures hubcache's temp dir growing at every look, never
    steals the lock, and returns hubcache's entry once it is committed. The origin serves the
    archive once."""
    assert importlib.util.find_spec("tensorflow_hub") is not None, "pip install -e '.[test]'"
    cache = tmp_path / "shared-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    model = build_model_dir(tmp_path / "slow", weights_bytes=1_000_000, shards=1, seed=5)
    data = archive_of(model, "gz")
    url = origin.add("/trickle.tar.gz", data)
    origin.throttle("/trickle.tar.gz", 250_000, step=4096)  # about 4 s, a few kB at a time
    key = cache_key(url)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    tfhub = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TFHUB_IMPATIENT), str(cache / key), url],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    downloader = None
    try:
        assert tfhub.stdout.readline().strip() == "ready", tfhub.stderr.read()[-3000:]
        downloader = subprocess.Popen([sys.executable, "-c", "import sys, hubcache; hubcache.resolve(sys.argv[1])", url],
                                      stderr=subprocess.PIPE, text=True)
        lock = cache / f"{key}.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.stat().st_size and [n for n in os.listdir(cache) if n.endswith(".tmp")]):
            assert time.monotonic() < deadline and downloader.poll() is None, "hubcache's download never started"
            time.sleep(0.01)
        tfhub.stdin.write("go\n")
        tfhub.stdin.flush()
        line = tfhub.stdout.readline()
        assert line, tfhub.stderr.read()[-3000:]
        assert downloader.wait(timeout=60) == 0, downloader.stderr.read()
    finally:
        for proc in (tfhub, downloader):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert json.loads(line) == {"path": str(cache / key), "stolen": False}
    assert origin.count("/trickle.tar.gz") == 1
    assert tree_of(str(cache / key)) == tree_of(model)
    assert set(os.listdir(cache)) == {key, f"{key}.descriptor.txt"}
