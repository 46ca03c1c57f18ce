"""Cache management in the library: last-use records, the in-use guard, LRU eviction under
``HUBCACHE_MAX_SIZE``, and pruning (``hubcache.stores.usage``, ``.prune``, ``.manage``).

Every cache is a real directory, every download comes from a real local origin server, and
"another process" is a real child process (killed with SIGKILL where the test needs the kernel
to drop its locks).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import pytest

import hubcache
from hubcache.core import resolver
from hubcache.stores import usage
from hubcache.core.handles import cache_key
from hubcache.maintenance.manage import cache_backends, list_entries, remove
from hubcache.plugins.registry import get_registry
from hubcache.maintenance.prune import prune_store
from hubcache.testing import archive_of, build_model_dir, tree_of

HOLD = textwrap.dedent("""
    import sys, time, hubcache
    print(hubcache.resolve(sys.argv[1]), flush=True)
    time.sleep(120)
""")


@pytest.fixture
def home(monkeypatch):
    """The `home` backend selected; returns a function giving its (fresh) store."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")

    def store():
        return resolver.current_backend()[1].store

    return store


@pytest.fixture
def models(tmp_path, origin):
    """Four archives of incompressible models of distinct sizes on the origin: {name: url}."""
    urls = {}
    for i, name in enumerate("abcd"):
        model = build_model_dir(tmp_path / f"model-{name}", weights_bytes=60_000 + 10_000 * i, seed=i)
        urls[name] = origin.add(f"/{name}.tar.gz", archive_of(model))
    return urls


@pytest.fixture
def events():
    """Every event emitted during the test, as (kind, handle, data)."""
    seen = []

    class Recorder:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            seen.append((event.kind, event.handle, dict(event.data)))

    registry = get_registry()
    registry.pm.register(Recorder(), name="test-recorder")
    yield seen
    registry.pm.unregister(name="test-recorder")


def fetch(url: str, store) -> str:
    """Resolve like a short-lived process would: the entry is not left marked in use by us."""
    path = hubcache.resolve(url)
    store().release(cache_key(url))
    return path


def set_last_use(store, url: str, seconds_ago: float) -> None:
    """The last use on record: the entry directory's mtime (hubcache.stores.usage)."""
    when = time.time() - seconds_ago
    os.utime(store().entry_path(cache_key(url)), (when, when))


def committed(store) -> set[str]:
    return {e.key for e in store().entries() if e.state == "committed"}


def size_of(store, url: str) -> int:
    return store().entry(cache_key(url)).size


@contextmanager
def holder(url: str):
    """A child process that resolved ``url`` and keeps using it until killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip(), child.stderr.read()
        yield child
    finally:
        child.kill()
        child.wait()


def with_budget(monkeypatch, max_size: int) -> None:
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", str(max_size))
    resolver.clear_memo()  # the budget is read when the backend is built


# -- last use ------------------------------------------------------------------------------------


def test_hot_loop_of_hits_writes_last_use_at_most_once(home, models):
    url = models["a"]
    hubcache.resolve(url)
    use = home().entry_path(cache_key(url))  # its mtime is the last use
    past = time.time() - 2 * 86400
    os.utime(use, (past, past))
    started = time.perf_counter()
    for _ in range(20_000):
        hubcache.resolve(url)
    per_hit = (time.perf_counter() - started) / 20_000
    assert os.stat(use).st_mtime == past, "a memoised hit must not write"
    assert per_hit < 200e-6, f"a hit took {per_hit * 1e6:.1f} µs"
    print(f"memoised hit with last-use bookkeeping: {per_hit * 1e6:.2f} µs")
    # Once the refresh interval has passed, the next hit looks again: a day old, it records the use.
    usage._looked[use] -= usage.REFRESH_SECONDS + 1
    hubcache.resolve(url)
    assert os.stat(use).st_mtime > past + 86400
    # A use within the day is not recorded again, however often the process looks.
    recent = os.stat(use).st_mtime - 3600
    os.utime(use, (recent, recent))
    usage._looked[use] -= usage.REFRESH_SECONDS + 1
    hubcache.resolve(url)
    assert os.stat(use).st_mtime == recent


def test_a_new_process_hitting_the_entry_records_its_use(home, models):
    url = models["a"]
    fetch(url, home)
    set_last_use(home, url, 2 * 86400)  # a use is recorded when the one on record is a day old
    before = home().entry(cache_key(url)).last_used
    out = subprocess.run([sys.executable, "-c", "import sys, hubcache; print(hubcache.resolve(sys.argv[1]))", url],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == home().entry_path(cache_key(url))
    after = home().entry(cache_key(url)).last_used
    assert after > before + 86400 and abs(after - time.time()) < 60


def test_listing_reports_handle_size_and_use(home, models):
    path = fetch(models["b"], home)
    [item] = list_entries(cache_backends(resolver.load_config()))
    assert item.backend == "home" and item.entry.path == path and item.entry.handle == models["b"]
    assert item.entry.size == sum(len(v) for v in tree_of(path).values())
    assert item.busy is None
    hubcache.resolve(models["b"])  # now this process uses it
    [item] = list_entries(cache_backends(resolver.load_config()))
    assert item.busy == "in use by this process"


# -- the size budget -----------------------------------------------------------------------------


def test_budget_evicts_least_recently_used_first(home, models, monkeypatch, origin, events):
    for name in "abc":
        fetch(models[name], home)
    for name, ago in zip("abc", (100, 300, 200)):  # LRU order: b, c, a
        set_last_use(home, models[name], ago)
    sizes = {n: size_of(home, models[n]) for n in "abc"}
    d = models["d"]
    with_budget(monkeypatch, sizes["a"] + sizes["c"] + 100_000)  # d (~93 kB) fits once b goes
    fetch(d, home)
    assert committed(home) == {cache_key(models[n]) for n in "acd"}
    assert [(k, h) for k, h, _ in events if k == "evicted"] == [("evicted", models["b"])]
    # A tighter budget takes the next least recently used (c) and keeps a; never d, just resolved.
    with_budget(monkeypatch, size_of(home, d) + sizes["a"])
    home().remove(cache_key(d))
    fetch(d, home)
    assert committed(home) == {cache_key(models["a"]), cache_key(d)}
    assert origin.count("/b.tar.gz") == 1 and origin.count("/d.tar.gz") == 2


def test_budget_never_evicts_entries_in_use_by_another_process(home, models, monkeypatch):
    for name in "abc":
        fetch(models[name], home)
    with holder(models["a"]) as child:
        for name, ago in zip("abc", (300, 200, 100)):  # LRU order: a, b, c
            set_last_use(home, models[name], ago)
        assert home().busy(cache_key(models["a"])) == f"in use by pid {child.pid}"
        with_budget(monkeypatch, size_of(home, models["a"]) + size_of(home, models["c"]) + 100_000)
        fetch(models["d"], home)
        # a is the least recently used but in use: b went instead.
        assert committed(home) == {cache_key(models[n]) for n in "acd"}
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The kernel dropped the dead process's lock: a is evictable again.
    assert home().busy(cache_key(models["a"])) is None
    report = prune_store(home(), backend="home", max_size=size_of(home, models["d"]) + 1)
    assert [a.outcome for a in report.actions] == ["removed", "removed"]
    assert committed(home) == {cache_key(models["d"])}


def test_budget_keeps_the_entry_just_resolved_even_when_it_alone_is_over(home, models, monkeypatch, caplog):
    fetch(models["a"], home)
    with_budget(monkeypatch, 1000)
    with caplog.at_level(logging.WARNING, logger="hubcache"):
        path = hubcache.resolve(models["b"])
    assert committed(home) == {cache_key(models["b"])}
    assert tree_of(path) == tree_of(home().entry_path(cache_key(models["b"])))
    assert any("over its budget" in r.getMessage() for r in caplog.records)


def test_no_budget_no_eviction_and_tmp_ignores_the_budget(models, monkeypatch):
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", "1000")  # only the home backend has a budget
    for name in "abc":
        hubcache.resolve(models[name])
    store = resolver.current_backend()[1].store
    assert resolver.current_backend()[1].name == "tmp"
    assert len([e for e in store.entries() if e.state == "committed"]) == 3


# -- the in-use guard ------------------------------------------------------------------------------


def test_rm_keeps_an_entry_this_process_uses_until_released(home, models, origin):
    url = models["a"]
    path = hubcache.resolve(url)
    backends = cache_backends(resolver.load_config())
    [result] = remove([url], backends)
    assert result["outcome"] == "kept" and result["reason"] == "in use by this process"
    assert os.path.isdir(path)
    home().release(cache_key(url))
    [result] = remove([url], backends)
    assert result["outcome"] == "removed" and not os.path.exists(path)
    assert not [n for n in os.listdir(home().root) if n.startswith(cache_key(url))], "nothing of it is left"
    assert hubcache.resolve(url) == path and origin.count("/a.tar.gz") == 2


def test_rm_refuses_a_download_in_progress_and_prune_clears_a_crashed_one(home, origin, tmp_path):
    model = build_model_dir(tmp_path / "slow", weights_bytes=400_000)
    url = origin.add("/slow.tar.gz", archive_of(model))
    origin.throttle("/slow.tar.gz", 100_000)  # ~4 s: long enough to look at it mid-download
    key = cache_key(url)
    child = subprocess.Popen([sys.executable, "-c", "import sys, hubcache; hubcache.resolve(sys.argv[1])", url],
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not any(e.state == "in progress" for e in home().entries()):
            assert time.monotonic() < deadline and child.poll() is None, "the download never started"
            time.sleep(0.05)
        [result] = remove([url], cache_backends(resolver.load_config()))
        assert result["outcome"] == "kept"
        assert result["reason"].startswith("being downloaded") and f"pid {child.pid}" in result["reason"]
        report = prune_store(home(), backend="home")
        assert [a.outcome for a in report.actions] == ["kept"]
        assert any(name.endswith(".tmp") for name in os.listdir(home().root))
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
    [entry] = home().entries()
    assert entry.state == "in progress" and home().busy(key) is None
    report = prune_store(home(), backend="home")
    assert [(a.outcome, a.reason) for a in report.actions] == [("removed", "left over by an interrupted download")]
    assert list(home().entries()) == []
    assert not any(name.endswith(".tmp") for name in os.listdir(home().root))


RACER = textwrap.dedent("""
    import os, sys, time, hubcache
    from hubcache.core import resolver
    url, seconds = sys.argv[1], float(sys.argv[2])
    resolves = broken = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        resolver.clear_memo()
        path = hubcache.resolve(url)
        # While we hold it, the entry must stay complete, whatever the other process does.
        for _ in range(20):
            if not os.path.exists(os.path.join(path, "saved_model.pb")):
                broken += 1
        resolver.current_backend()[1].store.release(os.path.basename(path))
        resolves += 1
    print(resolves, broken)
""")


def test_rm_racing_resolves_never_deletes_a_returned_path(home, models, origin):
    url = models["a"]
    fetch(url, home)
    child = subprocess.Popen([sys.executable, "-c", RACER, url, "3"], stdout=subprocess.PIPE, text=True)
    outcomes = {"removed": 0, "kept": 0, "not cached": 0}
    backends = cache_backends(resolver.load_config())
    while child.poll() is None:
        outcomes[remove([url], backends)[0]["outcome"]] += 1
    resolves, broken = map(int, child.stdout.read().split())
    assert broken == 0, f"{broken} checks saw a returned path deleted under the resolver"
    assert resolves > 10 and outcomes["removed"] > 0 and outcomes["kept"] > 0, (resolves, outcomes)
    assert origin.count("/a.tar.gz") >= 2, "removed entries are downloaded again"


# -- prune ----------------------------------------------------------------------------------------


def snapshot(root: str) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def test_prune_dry_run_changes_nothing(home, models):
    for name in "abc":
        fetch(models[name], home)
    set_last_use(home, models["a"], 40 * 86400)
    damaged = home().entry_path(cache_key(models["b"]))
    os.unlink(os.path.join(damaged, "saved_model.pb"))
    before = snapshot(home().root)
    report = prune_store(home(), backend="home", older_than=30 * 86400, max_size=1, dry_run=True)
    assert snapshot(home().root) == before
    assert {(a.entry.handle, a.outcome, a.reason.split(" ")[0]) for a in report.actions} == {
        (models["b"], "would remove", "damaged"),
        (models["a"], "would remove", "not"),
        (models["c"], "would remove", "over"),
    }
    assert report.total_after == 0 and report.freed == report.total_before


def test_prune_older_than_and_debris(home, models):
    for name in "abc":
        fetch(models[name], home)
    set_last_use(home, models["a"], 40 * 86400)
    set_last_use(home, models["b"], 10 * 86400)
    os.unlink(os.path.join(home().entry_path(cache_key(models["c"])), "saved_model.pb"))
    report = prune_store(home(), backend="home", older_than=30 * 86400)
    assert [(a.entry.handle, a.outcome, a.reason) for a in report.actions] == [
        (models["c"], "removed", "damaged"),
        (models["a"], "removed", "not used for 40d"),
    ]
    assert committed(home) == {cache_key(models["b"])}


def test_prune_leaves_an_entry_used_since_it_was_listed(home, models):
    fetch(models["a"], home)
    set_last_use(home, models["a"], 40 * 86400)
    [entry] = home().entries()
    set_last_use(home, models["a"], 0)  # another process used it between listing and removal
    from hubcache.maintenance.prune import remove_entry

    action = remove_entry(home(), entry, reason="test")
    assert action.outcome == "kept" and "used since it was listed" in action.kept_because
    assert committed(home) == {cache_key(models["a"])}


def test_verify_applies_a_pins_line_that_names_the_handle_with_its_credentials(home, models, tmp_path, monkeypatch):
    """``HUBCACHE_PINS`` may name a handle as the user writes it, credentials included (resolve
    applies such a line); ``verify`` must apply it too, not only lines matching the handle with
    its credentials hidden."""
    from hubcache.maintenance.verify import verify

    handle = models["a"].replace("http://", "http://user:s3cret@", 1)
    hubcache.resolve(handle)
    pins = tmp_path / "pins.txt"
    pins.write_text(f"{handle} sha256={'0' * 64}\n")
    monkeypatch.setenv("HUBCACHE_PINS", str(pins))
    resolver.clear_memo()
    [result] = verify(cache_backends(resolver.load_config()), [handle])
    assert result.status == "pin mismatch", (result.status, result.problems)
