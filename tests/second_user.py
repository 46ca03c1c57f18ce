"""A second real user on this machine, for the shared-cache tests (``tests/test_shared_cache.py``
and ``tests/reliability/test_shared_default_cache.py``).

Tests run as root: the attacker's files are ``chown``-ed to ``nobody`` (65534) and the attacker's
processes run as ``nobody`` (``/usr/bin/flock`` holding a lock); the non-root victim is a child
that drops to uid 65533 before resolving (``tests/reliability/_child.py``). A hang is bounded by
the timeout of a subprocess. The fixtures are imported by the test modules that use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

import pytest

from hubcache.core import resolver
from hubcache.core.entry import descriptor_with_manifest
from hubcache.core.handles import cache_key
from hubcache.core.manifest import FileRecord, Manifest, crc_hex
from hubcache.stores import usage
from hubcache.stores.localstore import WRITER_TAG
from hubcache.testing import build_model_dir

NOBODY = 65534
VICTIM = 65533  # a uid with no files anywhere: the non-root victim
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability", "_child.py")

#: Mark a module that needs a second user with this (``pytestmark = needs_root``).
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="needs root to act as a second user (chown, setuid)")


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


def plant_shared_root(machine_tmp: str, handle: str, source: str, *, mode: int, owner: int) -> tuple[str, str]:
    """Another user (``owner``) made the default root ``<tmp>/tfhub_modules`` first, with ``mode``,
    and planted a committed-looking entry of ``handle`` in it. Returns (the root, the entry)."""
    shared = os.path.join(machine_tmp, "tfhub_modules")
    planted = plant_entry(shared, handle, source)
    os.chown(shared, owner, owner)
    os.chmod(shared, mode)
    return shared, planted


def plant_entry(root: str, handle: str, source: str, *, sha256: str = "0" * 64, uid: int = NOBODY,
                legacy: bool = False) -> str:
    """A committed-looking hubcache entry of ``handle`` holding ``source``'s files, owned by ``uid``:
    its manifest at the end of its descriptor, or (``legacy``) in ``<key>.manifest.json`` as an
    older hubcache wrote it."""
    os.makedirs(root, exist_ok=True)
    key = cache_key(handle)
    entry = os.path.join(root, key)
    shutil.copytree(source, entry)
    head = f"Module: {handle}\nDownload Time: now\nDownloader Hostname: evil (PID:1)\n{WRITER_TAG}\n"
    manifest = manifest_of(entry, handle, sha256).to_json()
    names = [key, f"{key}.descriptor.txt"]
    with open(os.path.join(root, f"{key}.descriptor.txt"), "wb") as f:
        f.write(head.encode() if legacy else descriptor_with_manifest(head, manifest))
    if legacy:
        with open(os.path.join(root, f"{key}.manifest.json"), "wb") as f:
            f.write(manifest)
        names.append(f"{key}.manifest.json")
    for name in names:
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


def content_of(path: str, st: os.stat_result) -> bytes:
    """What a snapshot records of ``path``'s content: a file's SHA-256, a link's target."""
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path).encode()
    return b""


def snapshot(root: str) -> dict[str, tuple]:
    """Everything under ``root``: kind, owner, mode, size, mtime and bytes of each file."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (stat.S_IFMT(st.st_mode), st.st_uid, stat.S_IMODE(st.st_mode),
                                                st.st_size, st.st_mtime_ns, content_of(full, st))
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


def resolve_code() -> str:
    """Python code resolving ``sys.argv[1]``: prints the path, or ``ERROR <message>``."""
    return """
        import sys, hubcache
        try:
            print(hubcache.resolve(sys.argv[1]))
        except hubcache.HubcacheError as error:
            print("ERROR", error)
    """
