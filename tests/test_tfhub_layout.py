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
