"""The shared default cache: ``<tmp>/tfhub_modules`` is shared by every user of a machine, and
any of them can create it first. Here another real user (``nobody``, uid 65534) does: it makes the
directory, plants a committed-looking entry (manifest, descriptor and files of its choosing) for
the victim's handle, puts symlinks to the victim's files where lock files go, FIFOs where a
manifest, a model file or a use file go, and holds a lock with a process of its own forever. The
victim (a real process of uid 65533 where users matter, root otherwise) must never be served the
planted files, never wait on them, never write through them: it falls back to a cache of its own,
``<tmp>/tfhub_modules-<uid>`` (mode 0700). A cache directory named in ``TFHUB_CACHE_DIR`` that
others can write is refused with the ``chmod`` that fixes it, and a pinned handle is only ever
checked against a digest hubcache computed itself.

Every hang is bounded by a subprocess timeout (30 s), so a blocking open fails the test instead of
stalling it; seconds measured for a new process include its interpreter start-up;
``origin_requests`` counts the victim's requests only (not those that populated the cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.stores import usage
from hubcache.core.errors import CacheError
from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, tree_of
from local_layout import drop_manifest, manifest_data
from second_user import (NOBODY, VICTIM, cache, cli, evil, hold_flock, machine_tmp, needs_root,  # noqa: F401
                         plant_entry, plant_shared_root, resolve_code, run_as, run_python, snapshot, stop, write_like_tensorflow_hub)

SCENARIO = "14. The shared default cache"
pytestmark = needs_root


# -- the default root, created first by another user -------------------------------------------------


@pytest.mark.parametrize("mode, owner", [(0o777, NOBODY), (0o1777, NOBODY), (0o755, NOBODY), (0o755, 0)],
                         ids=["0777-nobody", "1777-nobody", "0755-nobody", "0755-root"])
def test_a_non_root_victim_gets_its_own_root_too(machine_tmp, origin, model, evil, mode, owner, figures):
    """The victim runs as uid 65533 (a real process that dropped root); the root was made first by
    nobody, or by root (who ran hubcache first: safe, but not the victim's to write)."""
    url = origin.add("/m.tar.gz", archive_of(model))
    shared, planted = plant_shared_root(machine_tmp, url, evil, mode=mode, owner=owner)
    before = snapshot(shared)
    began = time.monotonic()
    result = run_as(VICTIM, [url], {"TMPDIR": machine_tmp, "HOME": "/tmp"})[0]
    seconds = time.monotonic() - began
    fallback = os.path.join(machine_tmp, f"tfhub_modules-{VICTIM}")
    assert result.get("path") == os.path.join(fallback, cache_key(url)) != planted, result
    assert tree_of(result["path"]) == tree_of(model)
    st = os.stat(fallback)
    assert st.st_uid == VICTIM and stat.S_IMODE(st.st_mode) == 0o700
    assert snapshot(shared) == before, "the other user's directory was changed"
    figures.update(run=f"{'root' if owner == 0 else 'nobody'} made <tmp>/tfhub_modules (mode {mode:o}) with an "
                       f"entry for the handle; uid {VICTIM} resolves it",
                   seconds_to_answer=round(seconds, 2), landed_in=f"<tmp>/tfhub_modules-{VICTIM} (0700, its own)",
                   planted_entry_served=False, planted_dir_changed=False, origin_requests=origin.count())


# -- an explicit root others can write -----------------------------------------------------------------


@pytest.mark.parametrize("mode, group", [(0o777, 0), (0o1777, 0), (0o775, NOBODY)],
                         ids=["0777", "1777", "0775-shared-group"])
def test_a_chosen_root_others_can_write_is_refused_with_the_fix(tmp_path, origin, model, evil, monkeypatch,
                                                                 mode, group, figures):
    """TFHUB_CACHE_DIR names a directory others can write, holding an entry nobody planted: a
    one-line CacheError that gives the fix (``chmod go-w DIR``), nothing written; after the
    chmod, the planted entry is still not served."""
    url = origin.add("/m.tar.gz", archive_of(model))
    root = str(tmp_path / "team-cache")
    plant_entry(root, url, evil)
    os.chown(root, 0, group)
    os.chmod(root, mode)
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    before = snapshot(root)
    with pytest.raises(CacheError) as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert message.startswith(repr(url)) and "\n" not in message
    assert f"chmod go-w {root}" in message and "TFHUB_CACHE_DIR" in message
    assert snapshot(root) == before and origin.count() == 0
    out = cli({"TFHUB_CACHE_DIR": root}, "resolve", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "chmod go-w" in out.stderr
    requests_refused = origin.count()
    os.chmod(root, 0o755)  # the fix the message gives; the entry another user planted is still not served
    resolver.clear_memo()
    assert tree_of(hubcache.resolve(url)) == tree_of(model) and origin.count() == 1
    figures.update(run=f"TFHUB_CACHE_DIR of mode {mode:o}{' (group nobody)' if group else ''} holding an entry "
                       "nobody planted; then `chmod go-w` as the error says",
                   error="CacheError", cli_exit_status=out.returncode, cli_stderr_lines=out.stderr.count("\n"),
                   origin_requests_while_refused=requests_refused, origin_requests_after_chmod=origin.count(),
                   message=message.replace(root, "DIR").replace(url, "URL"))


# -- what another user planted in a root we trust --------------------------------------------------------


@pytest.mark.parametrize("where", ["descriptor", "older manifest file"])
def test_a_fifo_as_manifest_never_blocks(cache, origin, model, figures, where):
    """Nobody's FIFO in place of an entry's manifest (its descriptor, or the ``.manifest.json`` an
    older hubcache kept): the resolve (a child process) returns at once and rebuilds the entry,
    with a regular descriptor holding the manifest and nothing else beside it."""
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    key = cache_key(url)
    descriptor = os.path.join(cache, f"{key}.descriptor.txt")
    if where == "descriptor":
        fifo = descriptor
        os.unlink(fifo)
    else:
        fifo = os.path.join(cache, f"{key}.manifest.json")
        drop_manifest(cache, key)  # as an older hubcache left it: no manifest in the descriptor
    os.mkfifo(fifo)
    os.chown(fifo, NOBODY, NOBODY)
    populated = origin.count()
    began = time.monotonic()
    out = run_python(resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
    seconds = time.monotonic() - began
    assert out.stdout.strip() == path, out.stderr[-2000:]
    assert tree_of(path) == tree_of(model) and stat.S_ISREG(os.lstat(descriptor).st_mode)
    assert manifest_data(cache, key)["handle"] == url
    assert sorted(os.listdir(cache)) == [key, f"{key}.descriptor.txt"]
    figures.update(run=f"a FIFO of nobody's as the {where} of a committed entry; resolve in a new process",
                   seconds_to_answer=round(seconds, 2), landed_in="the same entry, rebuilt",
                   origin_requests=origin.count() - populated)


@pytest.mark.parametrize("where", ["descriptor.txt", "variables/variables.data-00000-of-00002"])
def test_a_fifo_in_a_tensorflow_hub_entry_never_blocks_and_is_not_adopted(cache, origin, model, evil, where,
                                                                          figures):
    """An entry as tensorflow_hub leaves it, with a FIFO as its descriptor or as a weight shard:
    not adopted, never opened in a way that blocks; the model is downloaded."""
    url = origin.add("/m.tar.gz", archive_of(model))
    entry = write_like_tensorflow_hub(cache, url, evil)
    fifo = entry + ".descriptor.txt" if where == "descriptor.txt" else os.path.join(entry, where)
    os.unlink(fifo)
    os.mkfifo(fifo)
    began = time.monotonic()
    out = run_python(resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
    seconds = time.monotonic() - began
    assert out.stdout.strip() == entry, out.stdout + out.stderr[-2000:]
    assert tree_of(entry) == tree_of(model) and origin.count() == 1
    figures.update(run=f"a tensorflow_hub entry with a FIFO as {where}; resolve in a new process",
                   seconds_to_answer=round(seconds, 2), landed_in="the same entry, downloaded",
                   planted_entry_served=False, origin_requests=origin.count())


def test_fifos_as_use_and_lock_files_never_block_listing_or_pruning(cache, origin, model, figures):
    """FIFOs of nobody's as an entry's download lock ``.lock`` and as the ``.hubcache.use``,
    ``.hubcache.lock`` and ``.hubcache.owner`` an older hubcache kept (still read): ``hubcache
    ls``, ``hubcache prune --dry-run`` and a resolve all return."""
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    hubcache.resolve(url)
    usage.release(os.path.join(cache, key))
    for suffix in (".lock", ".hubcache.use", ".hubcache.lock", ".hubcache.owner"):
        name = os.path.join(cache, key + suffix)
        if os.path.lexists(name):
            os.unlink(name)
        os.mkfifo(name)
        os.chown(name, NOBODY, NOBODY)
    env = {"TFHUB_CACHE_DIR": cache}
    populated = origin.count()
    began = time.monotonic()
    listing = cli(env, "ls")
    ls_seconds = time.monotonic() - began
    assert listing.returncode == 0 and url in listing.stdout, listing.stdout + listing.stderr
    began = time.monotonic()
    dry = cli(env, "prune", "--dry-run", "--older-than", "1s")
    prune_seconds = time.monotonic() - began
    assert dry.returncode == 0, dry.stderr
    began = time.monotonic()
    out = run_python(resolve_code(), env, url)
    resolve_seconds = time.monotonic() - began
    assert out.stdout.strip() == os.path.join(cache, key), out.stdout + out.stderr[-2000:]
    figures.update(run="FIFOs as the download lock and an older hubcache's use, lock and owner files of a "
                       "committed entry; `hubcache ls`, "
                       "`hubcache prune --dry-run`, resolve, each a new process",
                   ls_seconds=round(ls_seconds, 2), prune_dry_run_seconds=round(prune_seconds, 2),
                   seconds_to_answer=round(resolve_seconds, 2), origin_requests=origin.count() - populated)


def test_lock_use_and_owner_links_are_never_written_through(cache, origin, model, tmp_path, figures):
    """Nobody's symlinks to the victim's files as the download lock of the handle's entry and as
    the use, lock and owner files an older hubcache kept: the victim's files keep their bytes, mode
    and mtime; the links are removed (never followed), and once the resolve is done the cache
    holds the entry and its descriptor only."""
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    victims = {}
    for suffix in (".lock", ".hubcache.lock", ".hubcache.use", ".hubcache.owner"):
        target = tmp_path / f"precious{suffix}"
        target.write_text("precious")
        os.chmod(target, 0o640)
        os.utime(target, (1_000_000_000, 1_000_000_000))
        link = os.path.join(cache, key + suffix)
        os.symlink(target, link)
        os.lchown(link, NOBODY, NOBODY)
        victims[str(target)] = os.stat(target)
    began = time.monotonic()
    path = hubcache.resolve(url)
    seconds = time.monotonic() - began
    assert tree_of(path) == tree_of(model)
    for target, before in victims.items():
        after = os.stat(target)
        assert open(target).read() == "precious"
        assert (after.st_mtime_ns, after.st_mode, after.st_size) == (before.st_mtime_ns, before.st_mode, before.st_size), target
    assert sorted(os.listdir(cache)) == [key, f"{key}.descriptor.txt"], "a planted link was left"
    figures.update(run="symlinks of nobody's to 4 files of the victim as the download lock and an older "
                       "hubcache's lock, use and owner files; resolve (in-process)",
                   seconds_to_answer=round(seconds, 2), victim_files_changed=0, links_left=0,
                   origin_requests=origin.count())


@pytest.mark.parametrize("owner", [NOBODY, 0], ids=["nobody's lock file", "our lock file, 0644"])
def test_a_lock_held_by_another_users_process_is_not_waited_for(cache, origin, model, owner, monkeypatch, figures):
    """A process of nobody's (``flock -x``) holds the entry's download lock forever, on nobody's
    lock file or on an old 0644 lock file of ours: the victim does not wait for it (the lock
    timeout is 20 s here), it replaces the lock file with a 0600 one of its own, downloads, and
    removes its lock file when done."""
    url = origin.add("/m.tar.gz", archive_of(model))
    lock = os.path.join(cache, cache_key(url) + ".lock")
    with open(lock, "w"):
        pass
    os.chown(lock, owner, owner)
    os.chmod(lock, 0o644)
    holder = hold_flock(lock)
    try:
        monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", "20")
        began = time.monotonic()
        path = hubcache.resolve(url)
        took = time.monotonic() - began
    finally:
        stop(holder)
    assert tree_of(path) == tree_of(model)
    assert took < 5, f"waited {took:.1f} s for a lock another user holds"
    assert not os.path.lexists(lock), "the lock file outlived the download"
    figures.update(run=f"`flock -x` as nobody on {'a lock file of nobody' if owner else 'our lock file (0644)'}, "
                       "held forever; HUBCACHE_LOCK_TIMEOUT=20; resolve (in-process)",
                   seconds_to_answer=round(took, 2), lock_timeout_seconds=20, lock_file_left=False,
                   origin_requests=origin.count())


# -- pins: only a digest hubcache computed ---------------------------------------------------------------


def test_a_forged_manifest_digest_never_satisfies_a_pin(cache, origin, model, evil, figures):
    """Our entry's files and manifest replaced by nobody's, the manifest claiming the pinned digest:
    the pinned handle is downloaded again and checked."""
    data = archive_of(model)
    url = origin.add("/m.tar.gz", data)
    digest = hashlib.sha256(data).hexdigest()
    key = cache_key(url)
    path = hubcache.resolve(url)
    shutil.rmtree(path)
    os.unlink(os.path.join(cache, f"{key}.descriptor.txt"))
    plant_entry(cache, url, evil, sha256=digest)
    resolver.clear_memo()
    populated = origin.count()
    pinned = hubcache.resolve(f"{url}#sha256={digest}")
    assert pinned == path and tree_of(pinned) == tree_of(model) and origin.count() == 2
    figures.update(run="nobody's entry and manifest claiming the pinned sha256, over other bytes; "
                       "resolve URL#sha256=…",
                   planted_entry_served=False, origin_requests=origin.count() - populated,
                   pin_checked_against="the download")


def test_a_pinned_handle_downloads_over_an_adopted_entry(cache, origin, model, evil, figures):
    """An adopted entry (tensorflow_hub's, other bytes) has no verified digest: served for the
    unpinned handle, it is downloaded and checked for the pinned one."""
    data = archive_of(model)
    url = origin.add("/m.tar.gz", data)
    entry = write_like_tensorflow_hub(cache, url, evil)
    assert hubcache.resolve(url) == entry and origin.count() == 0  # adopted for the unpinned handle
    resolver.clear_memo()
    usage.release(entry)
    pinned = hubcache.resolve(f"{url}#sha256={hashlib.sha256(data).hexdigest()}")
    assert pinned == entry and tree_of(entry) == tree_of(model) and origin.count() == 1
    figures.update(run="a tensorflow_hub entry with other bytes, adopted for the unpinned handle; "
                       "then resolve URL#sha256=…",
                   origin_requests_unpinned=0, origin_requests=origin.count(), pin_checked_against="the download")
