"""A local cache directory holds exactly what tensorflow_hub's holds (issue 14).

After resolves finish, ``os.listdir(cache)`` is ``<key>`` and ``<key>.descriptor.txt`` per model and
nothing else, for the ``tmp`` and ``home`` backends, whoever resolved (one process or several at
once); a hit in a new process changes nothing in the cache directory (every name's stat and
bytes compared), except the entry directory's mtime once a day (its last use); a downloader killed
with SIGKILL leaves a ``<key>.lock`` that blocks nobody; the manifest, in-use protection and last
use keep working without files of their own; an entry an older hubcache wrote (its manifest in
``<key>.manifest.json``) still resolves and is rewritten in this layout.

Every cache is a real directory, every download comes from the local origin server, and "another
process" is a real child process. (The test reads the manifest with its own few lines, not the
library's, so that it runs against any version.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from second_user import content_of

import hubcache
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.maintenance.prune import prune_store
from hubcache.stores.localstore import LocalStore
from hubcache.testing import archive_of, build_model_dir, tree_of

RESOLVE = "import sys, hubcache\nfor h in sys.argv[1:]:\n    print(hubcache.resolve(h), flush=True)\n"
HOLD = "import sys, hubcache\nprint(hubcache.resolve(sys.argv[1]), flush=True)\nsys.stdin.read()\n"
DAY = 86400


@pytest.fixture(params=["tmp", "home"])
def backend(request, monkeypatch):
    """The backend under test, selected by the environment (children inherit it); returns a
    function giving its store."""
    if request.param == "home":
        monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    resolver.clear_memo()

    def store() -> LocalStore:
        found = resolver.current_backend()[1].store
        assert isinstance(found, LocalStore)
        return found

    return store


@pytest.fixture
def models(tmp_path, origin):
    """Three archives of distinct models on the origin: a list of handles."""
    urls = []
    for i in range(3):
        model = build_model_dir(tmp_path / f"model-{i}", weights_bytes=40_000 + 5_000 * i, seed=i)
        urls.append(origin.add(f"/m{i}.tar.gz", archive_of(model)))
    return urls


def tfhub_listing(keys) -> set[str]:
    return {name for key in keys for name in (key, f"{key}.descriptor.txt")}


def run(*args: str, code: str = RESOLVE, timeout: float = 60) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def snapshot(root: str) -> dict[str, tuple]:
    """Every name under ``root`` (the root too): kind, owner, mode, size, inode, link count, mtime,
    ctime and the bytes of files (their digest) or the target of links. Not the access time: a
    read may move it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for full in [dirpath] + [os.path.join(dirpath, n) for n in filenames]:
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_mode, st.st_uid, st.st_size, st.st_ino, st.st_nlink,
                                                st.st_mtime_ns, st.st_ctime_ns, content_of(full, st))
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out[os.path.relpath(full, root)] = ("link", os.readlink(full))
    return out


def manifest_in_descriptor(root: str, key: str) -> dict | None:
    """The manifest at the end of ``<key>.descriptor.txt`` (after its ``Manifest:`` line), if any."""
    with open(os.path.join(root, f"{key}.descriptor.txt"), "rb") as f:
        text = f.read()
    head, mark, rest = text.partition(b"\nManifest:\n")
    return json.loads(rest) if mark and b"\nWriter: hubcache" in head else None


# -- the listing -----------------------------------------------------------------------------------


def test_a_cache_holds_exactly_what_tensorflow_hub_leaves(backend, models, origin):
    paths = [hubcache.resolve(url) for url in models]
    root = backend().root
    keys = [cache_key(url) for url in models]
    assert paths == [os.path.join(root, key) for key in keys]
    assert set(os.listdir(root)) == tfhub_listing(keys)
    # The manifest is in the descriptor, after tensorflow_hub's three lines and hubcache's own.
    for url, key in zip(models, keys):
        with open(os.path.join(root, f"{key}.descriptor.txt")) as f:
            lines = f.read().splitlines()
        assert lines[0] == f"Module: {url}" and lines[1].startswith("Download Time: ")
        assert lines[2].startswith("Downloader Hostname: ") and lines[3].startswith("Writer: hubcache ")
        manifest = manifest_in_descriptor(root, key)
        assert manifest is not None and manifest["handle"] == url
        assert sorted(p for p, _, _ in manifest["files"]) == sorted(tree_of(os.path.join(root, key)))
    # Listing, verifying and resolving again in new processes leave it so.
    run(*models)
    assert subprocess.run([sys.executable, "-m", "hubcache", "verify", "--full"], capture_output=True).returncode == 0
    assert {e.key: e.state for e in backend().entries()} == dict.fromkeys(keys, "committed")
    assert set(os.listdir(root)) == tfhub_listing(keys)
    assert origin.count() == len(models)


def test_processes_racing_for_the_same_models_leave_the_same_listing(backend, models, origin, tmp_path):
    go = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, sys, time, hubcache
        while not os.path.exists({str(go)!r}):
            time.sleep(0.002)
        for h in sys.argv[1:]:
            print(hubcache.resolve(h), flush=True)
    """)
    children = [subprocess.Popen([sys.executable, "-c", code, *models[i:], *models[:i]], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(3)]
    time.sleep(1.0)  # let them import
    go.touch()
    outs = [child.communicate(timeout=60) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-2000:] for _, err in outs]
    root = backend().root
    keys = [cache_key(url) for url in models]
    assert set(os.listdir(root)) == tfhub_listing(keys)
    assert [origin.count(f"/m{i}.tar.gz") for i in range(3)] == [1, 1, 1], "each model downloaded once"
    assert all(sorted(out.split()) == sorted(os.path.join(root, k) for k in keys) for out, _ in outs)


# -- a hit writes nothing --------------------------------------------------------------------------


def test_a_hit_in_a_new_process_changes_nothing_in_the_cache(backend, models, origin):
    run(*models)
    root = backend().root
    before = snapshot(root)
    assert run(*models) == [os.path.join(root, cache_key(url)) for url in models]
    assert snapshot(root) == before, "a hit changed the cache directory"
    assert origin.count() == len(models)


def test_a_hit_on_an_entry_used_over_a_day_ago_records_its_use_once(backend, models):
    url = models[0]
    run(url)
    root = backend().root
    entry = os.path.join(root, cache_key(url))
    old = time.time() - 3 * DAY
    os.utime(entry, (old, old))
    before = snapshot(root)
    assert backend().entry(cache_key(url)).last_used == pytest.approx(old, abs=1)
    began = time.time()
    run(url)
    after = snapshot(root)
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
    assert changed == [cache_key(url)], "only the entry directory's times change"
    assert after[cache_key(url)][:5] == before[cache_key(url)][:5]
    last = backend().entry(cache_key(url)).last_used
    assert began - 1 <= last <= time.time() + 1
    # Used now: the next hits (new processes) write nothing again.
    run(url, url)
    assert snapshot(root) == after


def test_last_use_orders_the_size_budget(backend, models, origin, monkeypatch):
    """LRU eviction reads last use from the entry directories: the oldest goes first."""
    run(*models)
    keys = [cache_key(url) for url in models]
    for key, days in zip(keys, (5, 40, 20)):  # least recently used: models[1], then models[2]
        when = time.time() - days * DAY
        os.utime(os.path.join(backend().root, key), (when, when))
    sizes = {e.key: e.size for e in backend().entries()}
    report = prune_store(backend(), max_size=sizes[keys[0]] + sizes[keys[2]])
    assert [(a.entry.key, a.outcome) for a in report.actions] == [(keys[1], "removed")]
    report = prune_store(backend(), max_size=sizes[keys[0]])
    assert [(a.entry.key, a.outcome) for a in report.actions] == [(keys[2], "removed")]
    assert set(os.listdir(backend().root)) == tfhub_listing(keys[:1])


# -- in use, without a use file ----------------------------------------------------------------------


def test_an_entry_a_live_process_downloaded_and_uses_is_never_removed(backend, models):
    """The child's resolve is a miss (it downloads): its in-use lock is taken on the directory it
    committed, before it let go of the download lock. prune and rm keep it; they remove it once
    the child is gone (killed: the kernel drops its lock)."""
    url = models[0]
    child = subprocess.Popen([sys.executable, "-c", HOLD, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        path = child.stdout.readline().strip()
        assert path, child.stderr.read()
        store = backend()
        assert store.busy(cache_key(url)) == f"in use by pid {child.pid}"
        report = prune_store(store, max_size=0)
        assert [(a.outcome, a.kept_because) for a in report.actions] == [("kept", f"in use by pid {child.pid}")]
        rm = subprocess.run([sys.executable, "-m", "hubcache", "rm", url], capture_output=True, text=True)
        assert rm.returncode == 1 and f"in use by pid {child.pid}" in rm.stderr, rm.stdout + rm.stderr
        assert tree_of(path) and set(os.listdir(store.root)) == tfhub_listing([cache_key(url)])
    finally:
        child.kill()
        child.wait()
    assert backend().busy(cache_key(url)) is None
    report = prune_store(backend(), max_size=0)
    assert [a.outcome for a in report.actions] == ["removed"]
    assert os.listdir(backend().root) == []


# -- the download lock ---------------------------------------------------------------------------------


def test_the_lock_exists_only_while_a_download_runs_and_says_what_tensorflow_hub_reads(backend, origin, tmp_path):
    model = build_model_dir(tmp_path / "slow", weights_bytes=300_000, seed=7)
    url = origin.add("/slow.tar.gz", archive_of(model))
    origin.throttle("/slow.tar.gz", 150_000)  # about 2 s
    child = subprocess.Popen([sys.executable, "-c", RESOLVE, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    root = backend().root
    key = cache_key(url)
    lock = os.path.join(root, f"{key}.lock")
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(lock) and os.path.getsize(lock)):
            assert time.monotonic() < deadline and child.poll() is None, child.stderr.read()
            time.sleep(0.01)
        with open(lock) as f:
            text = f.read()
        st = os.lstat(lock)
        # tensorflow_hub's format (resolver._lock_file_contents): <host>.<pid>.<task>; it watches
        # <key>.<task>.tmp grow (resolver._locked_tmp_dir_size), which is where hubcache writes.
        match = re.fullmatch(rf"{re.escape(socket.gethostname())}\.{child.pid}\.(hc\d+-[0-9a-f]{{8}})", text)
        assert match, text
        assert os.path.isdir(os.path.join(root, f"{key}.{match.group(1)}.tmp"))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        busy = backend().busy(key)
        assert busy == f"being downloaded ({socket.gethostname()} pid {child.pid})", busy
    finally:
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert set(os.listdir(root)) == tfhub_listing([key])


def test_a_downloader_killed_mid_download_blocks_nobody(backend, origin, tmp_path, events, monkeypatch):
    model = build_model_dir(tmp_path / "slow", weights_bytes=400_000, seed=8)
    url = origin.add("/killed.tar.gz", archive_of(model))
    origin.throttle("/killed.tar.gz", 100_000)
    monkeypatch.setenv("HUBCACHE_LOCK_TIMEOUT", "600")
    root = backend().root
    key = cache_key(url)
    child = subprocess.Popen([sys.executable, "-c", RESOLVE, url], stderr=subprocess.PIPE)

    def downloading() -> bool:  # the child holds the lock, has its temp dir, and bytes are flowing
        names = os.listdir(root) if os.path.isdir(root) else []
        sent = sum(r.sent for r in origin.requests if r.path == "/killed.tar.gz")
        return f"{key}.lock" in names and any(n.endswith(".tmp") for n in names) and sent >= 128 << 10

    try:
        deadline = time.monotonic() + 30
        while not downloading():
            assert time.monotonic() < deadline and child.poll() is None, "the download never started"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert os.path.exists(os.path.join(root, f"{key}.lock")), "the killed holder's lock file is there"
    store = backend()
    assert store.lookup(key, url) is None, "a killed download looks committed"
    assert [e.state for e in store.entries()] == ["in progress"] and store.busy(key) is None
    origin.throttle("/killed.tar.gz", None)
    resolver.clear_memo()
    began = time.monotonic()
    path = hubcache.resolve(url)
    took = time.monotonic() - began
    assert tree_of(path) == tree_of(model)
    assert not [e for e in events if e.kind == "waiting"], "waited for a dead holder's lock"
    assert took < 10, f"took {took:.1f} s"
    assert set(os.listdir(root)) == tfhub_listing([key])


LOCKER = textwrap.dedent("""
    import os, sys, time
    from hubcache.stores.localstore import LocalStore
    root, key, log, go, rounds = sys.argv[1:6]
    store = LocalStore(root)
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    while not os.path.exists(go):
        time.sleep(0.001)
    me = os.getpid()
    for _ in range(int(rounds)):
        with store.lock(key, lambda holder: None):
            os.write(out, b"+%d\\n" % me)
            time.sleep(0.002)
            os.write(out, b"-%d\\n" % me)
""")


def test_the_lock_file_unlinked_by_its_holder_never_admits_two_holders(tmp_path):
    """Four processes take one key's lock 25 times each. Every holder unlinks the file before it
    lets go, so waiters blocked on the old inode must notice (fstat against lstat) and lock the new
    file: the log of who held it never shows two holders at once, and no lock file is left."""
    root = str(tmp_path / "cache")
    os.mkdir(root)
    key = "0" * 40
    log, go = str(tmp_path / "log"), str(tmp_path / "go")
    children = [subprocess.Popen([sys.executable, "-c", LOCKER, root, key, log, go, "25"], stderr=subprocess.PIPE,
                                 text=True) for _ in range(4)]
    time.sleep(0.5)
    began = time.monotonic()
    open(go, "w").close()
    for child in children:
        assert child.wait(timeout=120) == 0, child.stderr.read()
    seconds = time.monotonic() - began
    with open(log) as f:
        lines = f.read().split()
    assert len(lines) == 4 * 25 * 2
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter.startswith("+") and leave == "-" + enter[1:], (enter, leave)
    assert os.listdir(root) == [], "a lock file was left"
    print(f"100 lock hand-overs between 4 processes in {seconds:.2f} s")


def test_a_tensorflow_hub_lock_of_a_dead_process_is_taken_over_at_once(backend, models, events):
    """tensorflow_hub waits up to twenty minutes for a lock its dead owner left; hubcache knows
    the owner is gone (this host, no such pid) and goes ahead."""
    url = models[0]
    root = backend().root
    os.makedirs(root, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = os.path.join(root, f"{cache_key(url)}.lock")
    with open(lock, "w") as f:  # as tensorflow_hub writes it (resolver._lock_file_contents)
        f.write(f"{socket.gethostname()}.{dead.pid}.{uuid.uuid4().hex}")
    began = time.monotonic()
    hubcache.resolve(url)
    assert time.monotonic() - began < 5
    assert not [e for e in events if e.kind == "waiting"]
    assert set(os.listdir(root)) == tfhub_listing([cache_key(url)])


def test_a_live_tensorflow_hub_download_is_waited_for_then_adopted(backend, models, origin, model, events):
    """A ``.lock`` tensorflow_hub wrote for a live process: hubcache waits (a ``waiting`` event
    naming tensorflow_hub), and when tensorflow_hub has renamed its temp dir into place and removed
    its lock, hubcache adopts the entry without a download."""
    import threading

    url = models[0]
    key = cache_key(url)
    root = backend().root
    os.makedirs(root, exist_ok=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = os.path.join(root, f"{key}.lock")
    task = uuid.uuid4().hex
    with open(lock, "w") as f:
        f.write(f"{socket.gethostname()}.{sleeper.pid}.{task}")
    result: list[str] = []
    resolving = threading.Thread(target=lambda: result.append(hubcache.resolve(url)))
    resolving.start()
    try:
        deadline = time.monotonic() + 10
        while not [e for e in events if e.kind == "waiting"]:
            assert time.monotonic() < deadline, "hubcache did not wait for tensorflow_hub's lock"
            time.sleep(0.01)
        [waiting] = [e for e in events if e.kind == "waiting"]
        assert f"pid {sleeper.pid}" in waiting.data["holder"] and "tensorflow_hub" in waiting.data["holder"]
        # tensorflow_hub finishes: descriptor, rename of its temp dir, lock removed (atomic_download).
        tmp = os.path.join(root, f"{key}.{task}.tmp")
        import shutil

        shutil.copytree(model, tmp)
        with open(os.path.join(root, f"{key}.descriptor.txt"), "w") as f:
            f.write(f"Module: {url}\nDownload Time: now\nDownloader Hostname: {socket.gethostname()} "
                    f"(PID:{sleeper.pid})")
        os.rename(tmp, os.path.join(root, key))
        os.unlink(lock)
        resolving.join(timeout=30)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result == [os.path.join(root, key)]
    assert origin.count("/m0.tar.gz") == 0, "tensorflow_hub's download was not waited for"
    assert tree_of(result[0]) == tree_of(model)
    assert set(os.listdir(root)) == tfhub_listing([key])


# -- an older hubcache's cache -------------------------------------------------------------------------


def make_legacy(root: str, key: str) -> None:
    """Rewrite a committed entry as an older hubcache left it: the manifest in
    ``<key>.manifest.json``, the descriptor without it, and its three bookkeeping files."""
    manifest = manifest_in_descriptor(root, key)
    assert manifest is not None
    path = os.path.join(root, f"{key}.descriptor.txt")
    with open(path, "rb") as f:
        head = f.read().partition(b"\nManifest:\n")[0] + b"\n"
    with open(path, "wb") as f:
        f.write(head)
    with open(os.path.join(root, f"{key}.manifest.json"), "w") as f:
        json.dump(manifest, f)
    for suffix in (".hubcache.lock", ".hubcache.use", ".hubcache.owner"):
        with open(os.path.join(root, key + suffix), "w") as f:
            f.write("host pid 1" if suffix.endswith("owner") else "")


def test_an_older_hubcaches_entry_resolves_and_is_rewritten_in_this_layout(backend, models, origin):
    run(*models)
    root = backend().root
    keys = [cache_key(url) for url in models]
    for key in keys:
        make_legacy(root, key)
    old_use = time.time() - 10 * DAY
    os.utime(os.path.join(root, f"{keys[1]}.hubcache.use"), (old_use, old_use))
    os.utime(os.path.join(root, keys[1]), (old_use - DAY, old_use - DAY))
    assert {e.key: e.state for e in backend().entries()} == dict.fromkeys(keys, "committed")
    assert backend().verify(keys[0], full=True) == []
    assert backend().entry(keys[1]).last_used == pytest.approx(old_use, abs=1), "the older use file's time"
    assert run(*models) == [os.path.join(root, key) for key in keys]
    assert origin.count() == len(models), "an older hubcache's entry was downloaded again"
    assert set(os.listdir(root)) == tfhub_listing(keys)
    for url, key in zip(models, keys):
        assert manifest_in_descriptor(root, key)["handle"] == url
    # These hits were uses, recorded on the entry directories (the older use files are gone).
    assert backend().entry(keys[1]).last_used == pytest.approx(time.time(), abs=60)
    before = snapshot(root)
    run(*models)
    assert snapshot(root) == before


def test_an_older_hubcaches_entry_in_use_by_an_older_process_is_kept(backend, models):
    """An older hubcache process keeps a shared lock on ``<key>.hubcache.use`` while it uses the
    entry: prune leaves that entry (and its use file) alone."""
    url = models[0]
    run(url)
    root = backend().root
    key = cache_key(url)
    make_legacy(root, key)
    use = os.path.join(root, f"{key}.hubcache.use")
    holder = subprocess.Popen(["flock", "-s", use, "sleep", "60"], start_new_session=True)
    try:
        from hubcache.stores import usage

        deadline = time.monotonic() + 10
        while holder.pid not in usage.holders(use):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        report = prune_store(backend(), max_size=0)
        assert [(a.outcome, a.kept_because) for a in report.actions] == [("kept", f"in use by pid {holder.pid}")]
        assert os.path.exists(use) and os.path.isdir(os.path.join(root, key))
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    report = prune_store(backend(), max_size=0)
    assert [a.outcome for a in report.actions] == ["removed"]
    assert os.listdir(root) == []


# -- untrusted descriptors ---------------------------------------------------------------------------


def test_a_huge_descriptor_is_not_read_and_the_entry_is_rebuilt(backend, models, origin):
    """A descriptor is untrusted input: one larger than the cap (a sparse 300 MB file here) is not
    read; the entry is a miss, downloaded again, and its descriptor replaced."""
    url = models[0]
    path = hubcache.resolve(url)
    descriptor = path + ".descriptor.txt"
    with open(descriptor, "r+b") as f:
        f.truncate(300 << 20)
    resolver.clear_memo()
    began = time.monotonic()
    assert run(url) == [path]
    assert time.monotonic() - began < 20
    assert origin.count() == 2 and os.path.getsize(descriptor) < 1 << 20
    assert manifest_in_descriptor(os.path.dirname(path), cache_key(url))["handle"] == url


def test_a_manifest_after_a_descriptor_without_hubcaches_line_is_not_trusted(backend, models, origin, model):
    """``Manifest:`` counts only after hubcache's ``Writer:`` line: a tensorflow_hub descriptor
    carrying one (whatever put it there) is still tensorflow_hub's, and its entry is adopted by
    scanning the files, not by believing the text."""
    url = models[0]
    path = hubcache.resolve(url)
    with open(path + ".descriptor.txt", "rb") as f:
        text = f.read()
    lines = text.split(b"\n")
    forged = b"\n".join(line for line in lines if not line.startswith(b"Writer: hubcache"))
    with open(path + ".descriptor.txt", "wb") as f:
        f.write(forged)
    assert {e.key: e.state for e in LocalStore(backend().root).entries()} == {cache_key(url): "foreign"}
    resolver.clear_memo()
    assert run(url) == [path] and origin.count() == 1
    adopted = manifest_in_descriptor(backend().root, cache_key(url))
    assert adopted is not None and adopted["creator"] == "adopted from tensorflow_hub"


def test_where_directories_cannot_be_locked_a_recent_use_counts_as_in_use(backend, models, monkeypatch):
    """An NFS mount without ``local_lock=flock`` refuses an exclusive flock on a directory (EBADF:
    it maps flock to a write lock, which needs a file open for writing). No such mount here, so
    the refusal is simulated (the only mock in this module): an entry used within the day is kept,
    an older one may go."""
    import errno
    import fcntl

    from hubcache.stores import usage

    url = models[0]
    run(url)
    store = backend()
    key = cache_key(url)
    real = fcntl.flock

    def nfs_flock(fd, operation):
        if operation & fcntl.LOCK_EX and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, operation)

    monkeypatch.setattr(usage.fcntl, "flock", nfs_flock)
    assert store.busy(key) == "used within a day (this file system cannot lock directories)"
    report = prune_store(store, max_size=0)
    assert [(a.outcome, a.kept_because) for a in report.actions] == [("kept", store.busy(key))]
    old = time.time() - 2 * DAY
    os.utime(store.entry_path(key), (old, old))
    assert store.busy(key) is None
    assert [a.outcome for a in prune_store(store, max_size=0).actions] == ["removed"]
