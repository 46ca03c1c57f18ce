"""Shared and read-only caches: a cache populated by another user and mounted read-only serves
hits without the download lock and without writing anything; a miss there is a clear
``CacheError``, or lands in a writable tier when a chain of tiers is configured.

Read-only is made real, not simulated: the cache is bind-mounted read-only (``mount --bind`` then
``remount,ro``), so even root gets EROFS, and the resolving process runs as another user
(``nobody``), so the files are not its own either. Without root (no mount), the fallback is a
cache whose directories are made unwritable, which holds for non-root users only; the test says
which it used in its figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import hubcache
from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, build_model_dir, tree_of

from local_layout import drop_manifest, manifest_json

from .helpers import child_results, held_locks, open_files, snapshot, start_child

SCENARIO = "7. Shared and read-only caches"
NOBODY = 65534
WEIGHTS = 8 << 20  # big enough that reading the model on a hit would show in the bytes read


def _mount_readonly(source: str, target: str) -> bool:
    for cmd in (["mount", "--bind", source, target], ["mount", "-o", "remount,bind,ro", target]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", target], capture_output=True)
            return False
    return True


@pytest.fixture
def readonly_view(tmp_path):
    """``(populate, view, how)``: fill ``populate``; ``view`` shows the same files read-only."""
    populate = str(tmp_path / "shared-cache")
    os.makedirs(populate)
    if os.geteuid() == 0:
        # A world-traversable mount point (pytest's tmp dirs are 0700), so `nobody` can reach it.
        view = tempfile.mkdtemp(prefix="hubcache-ro-", dir="/tmp")
        os.chmod(view, 0o755)
        if not _mount_readonly(populate, view):
            os.rmdir(view)
            pytest.skip("cannot bind-mount read-only here (no CAP_SYS_ADMIN), and root ignores permissions")
        try:
            yield populate, view, "read-only bind mount, resolved as user nobody"
        finally:
            subprocess.run(["umount", "-l", view], capture_output=True)
            os.rmdir(view)
    else:
        state = {"done": False}

        def freeze() -> None:
            for dirpath, _, _ in os.walk(populate):
                os.chmod(dirpath, 0o555)
            state["done"] = True

        yield populate, populate, freeze
        for dirpath, _, _ in os.walk(populate):
            os.chmod(dirpath, 0o755)


def _make_readonly(how) -> str:
    if callable(how):  # the non-root fallback: take write permission away now
        how()
        return "directories chmod 0555 (non-root user)"
    return how


def _populate(origin, model, root: str, monkeypatch) -> tuple[str, str, str]:
    """One hubcache entry and one tensorflow_hub entry (dir + descriptor, no manifest) in ``root``;
    returns (hubcache handle, tensorflow_hub handle, uncached handle)."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    ours = origin.add("/ro/ours.tar.gz", archive_of(model))
    hubcache.resolve(ours)
    theirs = origin.add("/ro/theirs.tar.gz", archive_of(model))
    entry = os.path.join(root, cache_key(theirs))
    shutil.copytree(model, entry)
    with open(entry + ".descriptor.txt", "w") as f:
        f.write(f"Module: {theirs}\nDownload Time: {time.ctime()}\nDownloader Hostname: elsewhere (PID:1)\n")
    missing = origin.add("/ro/missing.tar.gz", archive_of(model))
    return ours, theirs, missing


def _child_env(view: str) -> dict[str, str]:
    # `nobody` cannot enter pytest's private dirs: give it a temp dir of its own.
    return {"TFHUB_CACHE_DIR": view, "TMPDIR": "/tmp", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}


def test_hits_in_a_readonly_cache_take_no_lock_and_write_nothing(origin, model, readonly_view, monkeypatch,
                                                               figures):
    """As another user on a read-only mount: both kinds of entry resolve, the origin sees nothing,
    the process holds no write lock and never opens the download lock, and no byte changes."""
    populate, view, how = readonly_view
    ours, theirs, _ = _populate(origin, model, populate, monkeypatch)
    how = _make_readonly(how)
    before = snapshot(populate)
    origin.reset_counts()
    user = NOBODY if os.geteuid() == 0 else None
    child = start_child({"handles": [ours, theirs], "hold": True, "setuid": user}, env=_child_env(view))
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read().decode()
        report = json.loads(line)
        locks = held_locks(child.pid)
        files = open_files(child.pid)
    finally:
        child.communicate(timeout=30)
    results = {r["handle"]: r for r in report["results"]}
    assert results[ours].get("path") == os.path.join(view, cache_key(ours)), results[ours]
    assert results[theirs].get("path") == os.path.join(view, cache_key(theirs)), results[theirs]
    assert tree_of(results[ours]["path"]) == tree_of(model)
    assert origin.count() == 0
    assert [lock for lock in locks if lock[0] != "READ"] == [], f"write locks held: {locks}"
    # The only locks: shared ones on the entry directories themselves (taken through read-only
    # fds; they keep `hubcache prune` by the cache's owner off the entries while this process uses them).
    entries = {os.path.realpath(results[h]["path"]) for h in (ours, theirs)}
    assert locks and all(os.path.realpath(path) in entries for _, path in locks), locks
    assert not [f for f in files if f.endswith(".lock")], "the download lock was opened"
    assert snapshot(populate) == before, "the read-only cache changed"
    # The tensorflow_hub entry cannot be given a manifest here: it is checked by sizes, not read.
    assert report["bytes_read"] < WEIGHTS // 4, f"{report['bytes_read']} bytes read to serve two hits"
    figures.update(run=f"{how}: a hubcache entry and a tensorflow_hub entry resolved",
                   hits=2, origin_requests=0, write_locks=0,
                   shared_read_locks=len(locks), bytes_changed=0, bytes_read_by_the_hits=report["bytes_read"],
                   model_bytes=WEIGHTS)


def test_an_older_hubcaches_entry_in_a_readonly_cache_is_served_as_it_is(origin, model, readonly_view, monkeypatch,
                                                                          figures):
    """An entry an older hubcache committed (its manifest in ``<key>.manifest.json``, its use,
    lock and owner files beside it) resolves from a read-only cache as another user; it cannot be
    rewritten in the current layout there, so nothing changes and the origin sees nothing."""
    populate, view, how = readonly_view
    ours, _, _ = _populate(origin, model, populate, monkeypatch)
    key = cache_key(ours)
    manifest = manifest_json(populate, key)
    drop_manifest(populate, key)
    with open(os.path.join(populate, f"{key}.manifest.json"), "wb") as f:
        f.write(manifest)
    for suffix in (".hubcache.lock", ".hubcache.use", ".hubcache.owner"):
        open(os.path.join(populate, key + suffix), "w").close()
    how = _make_readonly(how)
    before = snapshot(populate)
    origin.reset_counts()
    user = NOBODY if os.geteuid() == 0 else None
    report = child_results(start_child({"handles": [ours], "setuid": user}, env=_child_env(view)))
    assert report["results"][0].get("path") == os.path.join(view, key), report
    assert origin.count() == 0 and snapshot(populate) == before, "the read-only cache changed"
    figures.update(run=f"{how}: an entry in an older hubcache's layout resolved", hits=1, origin_requests=0,
                   bytes_changed=0)


def test_miss_in_a_readonly_cache_is_a_clear_error(origin, model, readonly_view, monkeypatch, figures):
    """A miss (and a damaged entry, which cannot be rebuilt there) raises a one-line CacheError
    naming the handle and what to do; the CLI prints it and exits 1; no download starts."""
    populate, view, how = readonly_view
    ours, theirs, missing = _populate(origin, model, populate, monkeypatch)
    damaged = origin.add("/ro/damaged.tar.gz", archive_of(model))
    path = hubcache.resolve(damaged)
    os.unlink(os.path.join(path, "saved_model.pb"))
    how = _make_readonly(how)
    origin.reset_counts()
    user = NOBODY if os.geteuid() == 0 else None
    child = start_child({"handles": [missing, damaged], "setuid": user}, env=_child_env(view))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()
    results = {r["handle"]: r for r in json.loads(out.decode().splitlines()[-1])["results"]}
    for handle in (missing, damaged):
        result = results[handle]
        assert result.get("kind") == "CacheError", result
        message = result["error"]
        assert message.startswith(repr(handle)) and "\n" not in message
        assert "not writable" in message and "TFHUB_CACHE_DIR" in message, message
    assert origin.count() == 0, "a download started although nothing could be stored"
    cli = subprocess.run([sys.executable, "-m", "hubcache", "resolve", missing], capture_output=True, text=True,
                         env=dict(os.environ, **_child_env(view)), timeout=60)
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "not writable" in cli.stderr
    figures.update(run=f"{how}: an uncached handle and a damaged entry",
                   error="CacheError", origin_requests=0, message=results[missing]["error"][:200])


def test_miss_falls_through_to_a_writable_tier(origin, model, readonly_view, monkeypatch, tmp_path, figures):
    """HUBCACHE_BACKEND=home,tmp with the home tier a read-only shared cache: hits come from it,
    a miss downloads once into the writable tmp tier."""
    populate, view, how = readonly_view
    ours, theirs, missing = _populate(origin, model, populate, monkeypatch)
    how = _make_readonly(how)
    # home's root is $XDG_CACHE_HOME/tfhub_modules: make that the read-only view.
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    os.symlink(view, xdg / "tfhub_modules")
    monkeypatch.delenv("TFHUB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,tmp")
    origin.reset_counts()
    hit = hubcache.resolve(ours)
    fetched = hubcache.resolve(missing)
    assert hit == os.path.join(str(xdg / "tfhub_modules"), cache_key(ours))
    assert fetched.startswith(str(tmp_path / "tmp")), fetched
    assert tree_of(fetched) == tree_of(model)
    assert origin.count() == 1
    figures.update(run=f"{how.split(',')[0]} as the first tier of HUBCACHE_BACKEND=home,tmp "
                       "(resolved in-process): one hit, one miss",
                   origin_requests=origin.count(), miss_went_to="tmp tier")


@pytest.fixture
def model(tmp_path):
    return build_model_dir(tmp_path / "model", weights_bytes=WEIGHTS, shards=2)
