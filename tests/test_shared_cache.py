"""The shared default cache, attacked by a second real user (``tests/second_user.py``).

``<tmp>/tfhub_modules`` is shared by every user of a machine, and any of them can create it first
and fill it. These tests play that other user for real: the attacker's files are ``nobody``'s and
its processes run as ``nobody``; the victim is this process (root) or a child that drops to uid
65533 before resolving. Every test asserts what the victim got and that nothing of theirs changed.
The most telling cases, with their figures, are in
``tests/reliability/test_shared_default_cache.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.stores import usage
from hubcache.core.errors import CacheError, UnsafeArchiveError
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import archive_of, tree_of
from local_layout import write_manifest_json
from second_user import (NOBODY, cache, cli, evil, hold_flock, machine_tmp, manifest_of, needs_root,  # noqa: F401
                         plant_entry, plant_shared_root, resolve_code, run_python, snapshot, stop, write_like_tensorflow_hub)

pytestmark = needs_root


# -- 1. the default root, created first by another user ------------------------------------------


@pytest.mark.parametrize("mode, owner", [(0o777, NOBODY), (0o1777, NOBODY), (0o755, NOBODY), (0o777, 0)],
                         ids=["0777-nobody", "1777-nobody", "0755-nobody", "0777-root"])
def test_a_default_root_made_by_another_user_is_never_used(machine_tmp, origin, model, evil, mode, owner, caplog):
    url = origin.add("/m.tar.gz", archive_of(model))
    shared, planted = plant_shared_root(machine_tmp, url, evil, mode=mode, owner=owner)
    before = snapshot(shared)
    with caplog.at_level("INFO", logger="hubcache"):
        path = hubcache.resolve(url)
    fallback = os.path.join(machine_tmp, "tfhub_modules-0")
    assert path == os.path.join(fallback, cache_key(url)) != planted
    assert tree_of(path) == tree_of(model) and origin.count() == 1
    assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700
    assert snapshot(shared) == before, "the other user's directory was changed"
    assert any("not using" in r.getMessage() and shared in r.getMessage() for r in caplog.records)
    # `hubcache config` shows the root in effect.
    out = cli({"TMPDIR": machine_tmp}, "config")
    assert out.returncode == 0 and re.search(rf"backend\.root\s+{re.escape(fallback)}\s", out.stdout), out.stdout


def test_an_unsafe_fallback_is_a_clear_error(machine_tmp, origin, model, evil):
    url = origin.add("/m.tar.gz", archive_of(model))
    shared = os.path.join(machine_tmp, "tfhub_modules")
    plant_entry(shared, url, evil)
    fallback = os.path.join(machine_tmp, "tfhub_modules-0")
    plant_entry(fallback, url, evil)
    os.chown(shared, NOBODY, NOBODY)
    os.chown(fallback, NOBODY, NOBODY)
    with pytest.raises(CacheError) as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert message.startswith(repr(url)) and "\n" not in message
    assert fallback in message and "belongs to another user" in message and "TFHUB_CACHE_DIR" in message
    assert origin.count() == 0
    out = cli({"TMPDIR": machine_tmp}, "resolve", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and fallback in out.stderr
    out = cli({"TMPDIR": machine_tmp}, "config")  # still shows where the cache would be
    assert out.returncode == 0 and fallback in out.stdout


def test_a_root_hubcache_creates_is_0755_whatever_the_umask(machine_tmp, origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    old = os.umask(0)
    try:
        path = hubcache.resolve(url)
    finally:
        os.umask(old)
    root = os.path.dirname(path)
    assert root == os.path.join(machine_tmp, "tfhub_modules")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert not mode & 0o022, (os.path.join(dirpath, name), oct(mode))
    # ...so the next process trusts it.
    resolver.clear_memo()
    assert hubcache.resolve(url) == path and origin.count() == 1


# -- 2. an explicit root others can write ------------------------------------------------------------


def test_a_group_writable_root_of_a_private_group_is_fine(tmp_path, origin, model, monkeypatch):
    """umask 002 with user-private groups (Debian, Ubuntu): group-writable by the owner alone."""
    from hubcache.stores import safefs

    if not safefs.private_group(0, 0):
        pytest.skip("root's group has other members here")
    root = tmp_path / "cache"
    root.mkdir()
    os.chown(root, 0, 0)
    os.chmod(root, 0o775)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(root))
    url = origin.add("/m.tar.gz", archive_of(model))
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


# -- 3. what another user planted in a root we trust ---------------------------------------------------


def test_an_entry_manifest_of_another_user_is_not_served(cache, origin, model, evil):
    """A committed-looking entry, manifest and descriptor nobody planted in our root."""
    url = origin.add("/m.tar.gz", archive_of(model))
    planted = plant_entry(cache, url, evil)
    path = hubcache.resolve(url)
    assert path == planted and tree_of(path) == tree_of(model), "the planted files were served"
    assert os.stat(path).st_uid == 0 and origin.count() == 1


def test_an_entry_directory_swapped_for_a_link_is_a_miss(cache, origin, model, evil, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    elsewhere = str(tmp_path / "elsewhere")
    shutil.copytree(evil, elsewhere)  # same sizes: only following the link would pass the check
    shutil.rmtree(path)
    os.symlink(elsewhere, path)
    os.lchown(path, NOBODY, NOBODY)
    resolver.clear_memo()
    assert hubcache.resolve(url) == path
    assert not os.path.islink(path) and tree_of(path) == tree_of(model) and origin.count() == 2


def test_a_file_swapped_for_a_same_size_link_is_damage(cache, origin, model, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    index = os.path.join(path, "variables", "variables.index")
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * os.path.getsize(index))
    os.unlink(index)
    os.symlink(secret, index)
    store = LocalStore(cache)
    assert store.verify(cache_key(url)) == ["variables/variables.index is a symbolic link"]
    resolver.clear_memo()
    assert hubcache.resolve(url) == path and not os.path.islink(index) and origin.count() == 2


def test_a_fifo_as_a_model_file_never_blocks_verify_full(cache, origin, model):
    (open(os.path.join(model, "assets", "empty.txt"), "wb")).close()
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    empty = os.path.join(path, "assets", "empty.txt")
    os.unlink(empty)
    os.mkfifo(empty)  # the same size as the recorded file: 0
    out = cli({"TFHUB_CACHE_DIR": cache}, "verify", "--full", url)
    assert out.returncode == 1 and "assets/empty.txt is not a regular file" in out.stdout, out.stdout + out.stderr


def test_a_planted_lock_link_in_a_root_we_do_not_own_is_refused_at_once(tmp_path, origin, model, monkeypatch):
    # (pytest's tmp dirs are root's and 0700: nobody could not reach the cache, which is fine here)
    """A team cache owned by nobody (its owner is trusted): a link as lock file cannot be replaced
    by us, so resolving fails at once, naming the file."""
    root = str(tmp_path / "team")
    os.mkdir(root, 0o755)
    os.chown(root, NOBODY, NOBODY)
    url = origin.add("/m.tar.gz", archive_of(model))
    target = tmp_path / "precious"
    target.write_text("precious")
    lock = os.path.join(root, cache_key(url) + ".lock")
    os.symlink(target, lock)
    os.lchown(lock, NOBODY, NOBODY)
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", "20")
    began = time.monotonic()
    with pytest.raises(CacheError) as info:
        hubcache.resolve(url)
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert f"refusing the lock file {lock}: it is a symbolic link" in message and "\n" not in message
    assert target.read_text() == "precious" and origin.count() == 0


def test_an_entry_locked_by_another_users_process_does_not_stall_a_resolve(cache, origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    usage.release(path)
    holder = hold_flock(path)  # readers of a shared cache lock its entry directories too
    try:
        began = time.monotonic()
        out = run_python(resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
        took = time.monotonic() - began
    finally:
        stop(holder)
    assert out.stdout.strip() == path, out.stdout + out.stderr[-2000:]
    assert took < 5, f"stalled {took:.1f} s"


# -- 4. the writer and adoption keep to the entry ---------------------------------------------------


def test_the_local_writer_refuses_every_path_leaving_its_temp_dir(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(str(sandbox / "cache"))
    writer = store.writer("0" * 40, "test://handle")
    writer.add_dir("sub")
    writer.add_symlink("link", "sub")
    for bad in ("../x", "a/../../x", "/abs", "a//b", "./x", "", "link/x", "link/deeper/x"):
        with pytest.raises(UnsafeArchiveError):
            writer.add_file(bad, [b"data"])
    with pytest.raises(UnsafeArchiveError):
        writer.add_dir("link")
    with pytest.raises(UnsafeArchiveError):
        writer.add_hardlink("h", "link")
    for target in ("../../outside", "/etc", "sub/../../x"):
        with pytest.raises(UnsafeArchiveError):
            writer.add_symlink("l2", target)
    # A link to outside planted in the temp dir by someone else is unlinked, not written through.
    os.symlink(outside / "victim", os.path.join(writer.tmp, "planted"))
    writer.add_file("planted", [b"data"])
    assert not (outside / "victim").exists() and os.listdir(outside) == []
    writer.abort()
    assert os.listdir(sandbox / "cache") == []


def _tfhub_entry_with_links(cache: str, url: str, model: str, links: dict[str, str]) -> str:
    entry = write_like_tensorflow_hub(cache, url, model)
    for link, target in links.items():
        os.symlink(target, os.path.join(entry, link))
    return entry


@pytest.mark.parametrize("links", [
    {"assets/passwd": "/etc/passwd"},
    {"assets/up": "../../.."},
    # A chain whose outer link comes first: lexically inside, through `l2` it leaves the entry.
    {"l1": "assets/l2/..", "assets/l2": "../.."},
], ids=["absolute", "dotdot", "chain"])
def test_a_tensorflow_hub_entry_with_a_link_leaving_it_is_not_adopted(cache, origin, model, links):
    url = origin.add("/m.tar.gz", archive_of(model))
    entry = _tfhub_entry_with_links(cache, url, model, links)
    assert hubcache.resolve(url) == entry
    assert origin.count() == 1, "adopted an entry with a link out of it"
    assert all(not os.path.lexists(os.path.join(entry, link)) for link in links)


def test_verify_full_reports_links_that_leave_the_entry(cache, origin, model, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    key = cache_key(url)
    store = LocalStore(cache)
    manifest = store.read_manifest(key)
    # As an older hubcache could commit it: the chain, outer link first, then a link whose target
    # on disk is not the one recorded.
    os.symlink("assets/l2/..", os.path.join(path, "l1"))
    os.symlink("../..", os.path.join(path, "assets", "l2"))
    os.symlink(str(tmp_path), os.path.join(path, "assets", "moved"))
    manifest.symlinks = {"l1": "assets/l2/..", "assets/l2": "../..", "assets/moved": "vocab.txt"}
    write_manifest_json(cache, key, manifest.to_json())
    out = cli({"TFHUB_CACHE_DIR": cache}, "verify", "--full", url)
    assert out.returncode == 1 and "manifest is unsafe" in out.stdout, out.stdout + out.stderr
    manifest.symlinks = {"assets/moved": "vocab.txt"}
    os.unlink(os.path.join(path, "l1"))
    os.unlink(os.path.join(path, "assets", "l2"))
    write_manifest_json(cache, key, manifest.to_json())
    assert store.verify(key, full=True) == [f"symlink assets/moved points to {str(tmp_path)!r}, not 'vocab.txt' as recorded"]


def test_a_verified_download_replaces_an_unverified_entry_unless_it_is_in_use(cache, origin, model, evil):
    """LocalWriter.commit keeps an entry found in its way only if it vouches for the same digest."""
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    entry = write_like_tensorflow_hub(cache, url, evil)
    store = LocalStore(cache)
    assert store.lookup(key, url) is not None  # adopted: no digest
    verified = manifest_of(model, url, "ab" * 32)

    def commit() -> str:
        writer = store.writer(key, url)
        for d in verified.dirs:
            writer.add_dir(d)
        for record in verified.files:
            with open(os.path.join(model, record.path), "rb") as f:
                writer.add_file(record.path, [f.read()])
        return writer.commit(verified)

    user = hold_flock(entry, None, "-s")  # another process uses it
    try:
        with pytest.raises(CacheError, match="in use"):
            commit()
    finally:
        stop(user)
    assert tree_of(entry) == tree_of(evil)
    assert commit() == entry and tree_of(entry) == tree_of(model)
    assert store.read_manifest(key).archive["sha256"] == "ab" * 32

