"""The shared default cache, attacked by a second real user.

``<tmp>/tfhub_modules`` is shared by every user of a machine, and any of them can create it first
and fill it. These tests play that other user for real: tests run as root, the attacker's files
are ``chown``-ed to ``nobody`` (65534) and the attacker's processes run as ``nobody``
(``/usr/bin/flock`` holding a lock); the victim is this process (root) or a child that drops to
uid 65533 before resolving (``tests/reliability/_child.py``). A hang is bounded by the timeout of
a subprocess; every test asserts what the victim got and that nothing of theirs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

import pytest

import hubcache
from hubcache.core import resolver, usage
from hubcache.core.errors import CacheError, UnsafeArchiveError
from hubcache.core.handles import cache_key
from hubcache.core.localstore import WRITER_TAG, LocalStore
from hubcache.core.manifest import FileRecord, Manifest, crc_hex
from hubcache.testing import archive_of, build_model_dir, tree_of

NOBODY = 65534
VICTIM = 65533  # a uid with no files anywhere: the non-root victim
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability", "_child.py")

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root to act as a second user (chown, setuid)")


# -- helpers -------------------------------------------------------------------------------------


def chown_tree(path: str, uid: int = NOBODY) -> None:
    """Give ``path`` and everything under it to ``uid`` (links themselves, not their targets)."""
    os.chown(path, uid, uid, follow_symlinks=False)
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)


def manifest_of(directory: str, handle: str, sha256: str) -> Manifest:
    """A manifest describing ``directory`` exactly, as a committed hubcache entry has."""
    manifest = Manifest(handle=handle, source=handle, archive={"sha256": sha256, "bytes": 1, "format": "gz"},
                        creator="hubcache 1.0")
    for dirpath, dirnames, filenames in os.walk(directory):
        rel = os.path.relpath(dirpath, directory)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        manifest.dirs.extend(prefix + d for d in dirnames)
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                data = f.read()
            manifest.files.append(FileRecord(prefix + name, len(data), crc_hex(zlib.crc32(data))))
    manifest.files.sort(key=lambda r: r.path)
    manifest.dirs.sort()
    return manifest


def plant_entry(root: str, handle: str, source: str, *, sha256: str = "0" * 64, uid: int = NOBODY) -> str:
    """A committed-looking hubcache entry of ``handle`` holding ``source``'s files, owned by ``uid``."""
    os.makedirs(root, exist_ok=True)
    key = cache_key(handle)
    entry = os.path.join(root, key)
    shutil.copytree(source, entry)
    with open(os.path.join(root, f"{key}.manifest.json"), "wb") as f:
        f.write(manifest_of(entry, handle, sha256).to_json())
    with open(os.path.join(root, f"{key}.descriptor.txt"), "w") as f:
        f.write(f"Module: {handle}\nDownload Time: now\nDownloader Hostname: evil (PID:1)\n{WRITER_TAG}\n")
    for name in (key, f"{key}.manifest.json", f"{key}.descriptor.txt"):
        chown_tree(os.path.join(root, name), uid)
    return entry


def write_like_tensorflow_hub(root: str, handle: str, source: str) -> str:
    """An entry as tensorflow_hub leaves it: the directory and a descriptor without hubcache's line."""
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, cache_key(handle))
    shutil.copytree(source, entry)
    with open(entry + ".descriptor.txt", "w") as f:
        f.write(f"Module: {handle}\nDownload Time: now\nDownloader Hostname: here (PID:1)")
    return entry


def snapshot(root: str) -> dict[str, tuple]:
    """Everything under ``root``: kind, owner, mode, size, mtime and bytes of each file."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            data = b""
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    data = hashlib.sha256(f.read()).digest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full).encode()
            out[os.path.relpath(full, root)] = (stat.S_IFMT(st.st_mode), st.st_uid, stat.S_IMODE(st.st_mode),
                                                st.st_size, st.st_mtime_ns, data)
    return out


def run_as(uid: int, handles: list[str], env: dict[str, str], timeout: float = 60) -> list[dict]:
    """Resolve ``handles`` in a child that drops root for ``uid`` first (``_child.become``: the
    interpreter lives under /root, which other users cannot read, so it starts as root)."""
    code = f"""
        import json, sys
        import encodings.idna  # the download path needs it, and the stdlib is unreadable after setuid
        sys.path.insert(0, {os.path.dirname(CHILD)!r})
        from _child import become
        import hubcache
        become({uid})
        out = []
        for handle in sys.argv[1:]:
            try:
                out.append({{"path": hubcache.resolve(handle)}})
            except hubcache.HubcacheError as error:
                out.append({{"error": str(error)}})
        print(json.dumps(out))
    """
    out = run_python(code, dict(env, PYTHONDONTWRITEBYTECODE="1"), *handles, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_python(code: str, env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a hang fails the test after ``timeout`` seconds."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process hung for {timeout} s (blocked on a planted file)")


def cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "hubcache", *args], capture_output=True, text=True,
                              env=dict(os.environ, **env), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`hubcache {' '.join(args)}` hung for {timeout} s (blocked on a planted file)")


def hold_flock(path: str, uid: int | None = NOBODY, kind: str = "-x") -> subprocess.Popen:
    """A real process of ``uid`` holding a flock (``-x`` or ``-s``) on ``path`` until
    :func:`stop`-ped (``-o``: only flock itself holds it, not its ``sleep``)."""
    users = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    proc = subprocess.Popen(["flock", kind, "-o", path, "sleep", "600"], start_new_session=True, **users)
    deadline = time.monotonic() + 10
    while proc.pid not in usage.holders(path):
        assert proc.poll() is None, "flock exited"
        assert time.monotonic() < deadline, "flock did not take the lock"
        time.sleep(0.01)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """End a process started by :func:`hold_flock` and its ``sleep`` (its own session)."""
    os.killpg(proc.pid, 9)
    proc.wait()


@pytest.fixture
def machine_tmp(monkeypatch):
    """A temp dir like /tmp (mode 1777, root's) that every user can reach; TMPDIR points at it."""
    path = tempfile.mkdtemp(prefix="hubcache-shared-", dir="/tmp")
    os.chmod(path, 0o1777)
    monkeypatch.setenv("TMPDIR", path)
    monkeypatch.setattr(tempfile, "tempdir", None)
    resolver.clear_memo()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def evil(tmp_path):
    """The attacker's model: same layout and sizes as the real one, other bytes."""
    return build_model_dir(tmp_path / "evil", weights_bytes=200_000, shards=2, seed=666)


# -- 1. the default root, created first by another user ------------------------------------------


@pytest.mark.parametrize("mode, owner", [(0o777, NOBODY), (0o1777, NOBODY), (0o755, NOBODY), (0o777, 0)],
                         ids=["0777-nobody", "1777-nobody", "0755-nobody", "0777-root"])
def test_a_default_root_made_by_another_user_is_never_used(machine_tmp, origin, model, evil, mode, owner, caplog):
    url = origin.add("/m.tar.gz", archive_of(model))
    shared = os.path.join(machine_tmp, "tfhub_modules")
    planted = plant_entry(shared, url, evil)
    os.chown(shared, owner, owner)
    os.chmod(shared, mode)
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


@pytest.mark.parametrize("mode, owner", [(0o777, NOBODY), (0o1777, NOBODY), (0o755, NOBODY), (0o755, 0)],
                         ids=["0777-nobody", "1777-nobody", "0755-nobody", "0755-root"])
def test_a_non_root_victim_gets_its_own_root_too(machine_tmp, origin, model, evil, mode, owner):
    """The victim runs as uid 65533 (a real process that dropped root); the root was made first by
    nobody, or by root (who ran hubcache first: safe, but not the victim's to write)."""
    url = origin.add("/m.tar.gz", archive_of(model))
    shared = os.path.join(machine_tmp, "tfhub_modules")
    planted = plant_entry(shared, url, evil)
    os.chown(shared, owner, owner)
    os.chmod(shared, mode)
    result = run_as(VICTIM, [url], {"TMPDIR": machine_tmp, "HOME": "/tmp"})[0]
    fallback = os.path.join(machine_tmp, f"tfhub_modules-{VICTIM}")
    assert result.get("path") == os.path.join(fallback, cache_key(url)) != planted, result
    assert tree_of(result["path"]) == tree_of(model)
    st = os.stat(fallback)
    assert st.st_uid == VICTIM and stat.S_IMODE(st.st_mode) == 0o700


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


@pytest.mark.parametrize("mode, group", [(0o777, 0), (0o1777, 0), (0o775, NOBODY)],
                         ids=["0777", "1777", "0775-shared-group"])
def test_a_chosen_root_others_can_write_is_refused_with_the_fix(tmp_path, origin, model, evil, monkeypatch,
                                                                 mode, group):
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
    os.chmod(root, 0o755)  # the fix the message gives; the entry another user planted is still not served
    resolver.clear_memo()
    assert tree_of(hubcache.resolve(url)) == tree_of(model) and origin.count() == 1


def test_a_group_writable_root_of_a_private_group_is_fine(tmp_path, origin, model, monkeypatch):
    """umask 002 with user-private groups (Debian, Ubuntu): group-writable by the owner alone."""
    from hubcache.core import safefs

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


@pytest.fixture
def cache(monkeypatch):
    """Our own cache root (root's, 0755), where nobody's processes can reach its files."""
    base = tempfile.mkdtemp(prefix="hubcache-ours-", dir="/tmp")
    os.chmod(base, 0o755)
    root = os.path.join(base, "cache")
    os.mkdir(root, 0o755)
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    yield root
    shutil.rmtree(base, ignore_errors=True)


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


def test_a_forged_manifest_digest_never_satisfies_a_pin(cache, origin, model, evil):
    """Our entry's files and manifest replaced by nobody's, the manifest claiming the pinned digest:
    the pinned handle is downloaded again and checked."""
    data = archive_of(model)
    url = origin.add("/m.tar.gz", data)
    digest = hashlib.sha256(data).hexdigest()
    key = cache_key(url)
    path = hubcache.resolve(url)
    shutil.rmtree(path)
    os.unlink(os.path.join(cache, f"{key}.manifest.json"))
    plant_entry(cache, url, evil, sha256=digest)
    resolver.clear_memo()
    pinned = hubcache.resolve(f"{url}#sha256={digest}")
    assert pinned == path and tree_of(pinned) == tree_of(model) and origin.count() == 2


def _resolve_code() -> str:
    return """
        import sys, hubcache
        try:
            print(hubcache.resolve(sys.argv[1]))
        except hubcache.HubcacheError as error:
            print("ERROR", error)
    """


def test_a_fifo_as_manifest_never_blocks(cache, origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    manifest = os.path.join(cache, f"{cache_key(url)}.manifest.json")
    os.unlink(manifest)
    os.mkfifo(manifest)
    os.chown(manifest, NOBODY, NOBODY)
    out = run_python(_resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
    assert out.stdout.strip() == path, out.stderr[-2000:]
    assert tree_of(path) == tree_of(model) and stat.S_ISREG(os.lstat(manifest).st_mode)


@pytest.mark.parametrize("where", ["descriptor.txt", "variables/variables.data-00000-of-00002"])
def test_a_fifo_in_a_tensorflow_hub_entry_never_blocks_and_is_not_adopted(cache, origin, model, evil, where):
    url = origin.add("/m.tar.gz", archive_of(model))
    entry = write_like_tensorflow_hub(cache, url, evil)
    fifo = entry + ".descriptor.txt" if where == "descriptor.txt" else os.path.join(entry, where)
    os.unlink(fifo)
    os.mkfifo(fifo)
    out = run_python(_resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
    assert out.stdout.strip() == entry, out.stdout + out.stderr[-2000:]
    assert tree_of(entry) == tree_of(model) and origin.count() == 1


def test_fifos_as_use_and_lock_files_never_block_listing_or_pruning(cache, origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    hubcache.resolve(url)
    usage.release(os.path.join(cache, f"{key}.hubcache.use"))
    for suffix in (".hubcache.use", ".hubcache.lock", ".hubcache.owner"):
        name = os.path.join(cache, key + suffix)
        if os.path.lexists(name):
            os.unlink(name)
        os.mkfifo(name)
        os.chown(name, NOBODY, NOBODY)
    env = {"TFHUB_CACHE_DIR": cache}
    listing = cli(env, "ls")
    assert listing.returncode == 0 and url in listing.stdout, listing.stdout + listing.stderr
    dry = cli(env, "prune", "--dry-run", "--older-than", "1s")
    assert dry.returncode == 0, dry.stderr
    out = run_python(_resolve_code(), env, url)
    assert out.stdout.strip() == os.path.join(cache, key), out.stdout + out.stderr[-2000:]


def test_a_fifo_as_a_model_file_never_blocks_verify_full(cache, origin, model):
    (open(os.path.join(model, "assets", "empty.txt"), "wb")).close()
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    empty = os.path.join(path, "assets", "empty.txt")
    os.unlink(empty)
    os.mkfifo(empty)  # the same size as the recorded file: 0
    out = cli({"TFHUB_CACHE_DIR": cache}, "verify", "--full", url)
    assert out.returncode == 1 and "assets/empty.txt is not a regular file" in out.stdout, out.stdout + out.stderr


def test_lock_use_and_owner_links_are_never_written_through(cache, origin, model, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    key = cache_key(url)
    victims = {}
    for suffix in (".hubcache.lock", ".hubcache.use", ".hubcache.owner"):
        target = tmp_path / f"precious{suffix}"
        target.write_text("precious")
        os.chmod(target, 0o640)
        os.utime(target, (1_000_000_000, 1_000_000_000))
        link = os.path.join(cache, key + suffix)
        os.symlink(target, link)
        os.lchown(link, NOBODY, NOBODY)
        victims[str(target)] = os.stat(target)
    path = hubcache.resolve(url)
    assert tree_of(path) == tree_of(model)
    for target, before in victims.items():
        after = os.stat(target)
        assert open(target).read() == "precious"
        assert (after.st_mtime_ns, after.st_mode, after.st_size) == (before.st_mtime_ns, before.st_mode, before.st_size), target
    for suffix in (".hubcache.lock", ".hubcache.use"):
        st = os.lstat(os.path.join(cache, key + suffix))
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(os.lstat(os.path.join(cache, key + ".hubcache.lock")).st_mode) == 0o600


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
    lock = os.path.join(root, cache_key(url) + ".hubcache.lock")
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


@pytest.mark.parametrize("owner", [NOBODY, 0], ids=["nobody's lock file", "our lock file, 0644"])
def test_a_lock_held_by_another_users_process_is_not_waited_for(cache, origin, model, owner, monkeypatch):
    url = origin.add("/m.tar.gz", archive_of(model))
    lock = os.path.join(cache, cache_key(url) + ".hubcache.lock")
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
    st = os.lstat(lock)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600


def test_a_use_file_locked_by_another_users_process_does_not_stall_a_resolve(cache, origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    use = os.path.join(cache, cache_key(url) + ".hubcache.use")
    usage.release(use)
    holder = hold_flock(use)  # 0644, as it must be: readers of a shared cache lock it too
    try:
        began = time.monotonic()
        out = run_python(_resolve_code(), {"TFHUB_CACHE_DIR": cache}, url)
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
    with open(os.path.join(cache, f"{key}.manifest.json"), "wb") as f:
        f.write(manifest.to_json())
    out = cli({"TFHUB_CACHE_DIR": cache}, "verify", "--full", url)
    assert out.returncode == 1 and "manifest is unsafe" in out.stdout, out.stdout + out.stderr
    manifest.symlinks = {"assets/moved": "vocab.txt"}
    os.unlink(os.path.join(path, "l1"))
    os.unlink(os.path.join(path, "assets", "l2"))
    with open(os.path.join(cache, f"{key}.manifest.json"), "wb") as f:
        f.write(manifest.to_json())
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

    user = hold_flock(store.use_path(key), None, "-s")  # another process uses it
    try:
        with pytest.raises(CacheError, match="in use"):
            commit()
    finally:
        stop(user)
    assert tree_of(entry) == tree_of(evil)
    assert commit() == entry and tree_of(entry) == tree_of(model)
    assert store.read_manifest(key).archive["sha256"] == "ab" * 32


def test_a_pinned_handle_downloads_over_an_adopted_entry(cache, origin, model, evil):
    """An adopted entry has no verified digest: the pinned handle is downloaded and checked."""
    data = archive_of(model)
    url = origin.add("/m.tar.gz", data)
    entry = write_like_tensorflow_hub(cache, url, evil)
    assert hubcache.resolve(url) == entry and origin.count() == 0  # adopted for the unpinned handle
    resolver.clear_memo()
    usage.release(os.path.join(cache, cache_key(url) + ".hubcache.use"))
    pinned = hubcache.resolve(f"{url}#sha256={hashlib.sha256(data).hexdigest()}")
    assert pinned == entry and tree_of(entry) == tree_of(model) and origin.count() == 1
