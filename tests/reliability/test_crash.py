"""Crash safety: a downloading process SIGKILLed at 20 points never leaves a committed partial
entry, and the next resolve succeeds at once and cleans what the dead process left.

Kill points in the download and extraction are found from outside, as a crash would happen: the
origin sends slowly (``OriginServer.throttle``) and the parent polls the origin and the private
temp dir (``<key>.hc<pid>-<rand>.tmp``) until it holds N files, then SIGKILLs the child. Points in
the commit protocol last microseconds, so the child stops itself there with SIGSTOP (see
``_child.py``: it wraps ``os.rename``/``os.replace`` in the child only); the parent inspects the
disk in that state and SIGKILLs it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import random
import signal
import time

import pytest

import hubcache
from hubcache.core import entry as entry_layout
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import OriginServer

from ._child import STOP_POINTS
from .helpers import EventLog, count_files, leftovers, make_archive, proc_state, start_child, tree, wait_for

SCENARIO = "2. Crash safety"
pytestmark = pytest.mark.slow

SHARDS = 11
SHARD_BYTES = (1 << 20) + (40 << 10)  # over 1 MiB: each shard starts in a different read of the stream
RATE = 24 << 20  # bytes/s while a kill point is being waited for (about half a second per download)

# 2 kill points before any file, 11 while extracting (temp dir holds N files), 7 in the commit.
FS_POINTS = ["request-sent", "body-flowing"] + [f"files-{n}" for n in range(1, SHARDS + 1)]
KILL_POINTS = FS_POINTS + list(STOP_POINTS)
assert len(KILL_POINTS) == 20


def model_files() -> list[tuple[str, bytes]]:
    rng = random.Random(6)
    shards = [(f"variables/variables.data-{i:05d}-of-{SHARDS:05d}", rng.randbytes(SHARD_BYTES))
              for i in range(SHARDS)]
    # Small files last, so that each new file in the temp dir marks a new MiB of the stream.
    return shards + [("variables/variables.index", rng.randbytes(900)),
                     ("saved_model.pb", b"\x08\x01\x12" + rng.randbytes(3000)),
                     ("fingerprint.pb", rng.randbytes(64))]


@pytest.fixture(scope="module")
def served():
    """One origin for the module, serving the ~12 MiB model archive."""
    files = model_files()
    archive = make_archive(files)
    with OriginServer() as origin:
        url = origin.add("/crash/model.tar.gz", archive)
        yield origin, url, dict(files), len(archive)


#: What is on disk right after the kill, per kill point: (temp dir, descriptor .part, descriptor,
#: entry dir, manifest in the descriptor, the download lock ``<key>.lock``). Proves each kill
#: landed where it says; the lock file a killed holder leaves blocks nobody (see below).
EXPECTED_AT = {
    "request-sent": (True, False, False, False, False, True),
    "downloading": (True, False, False, False, False, True),
    "lock-held": (False, False, False, False, False, True),
    "download-done": (True, False, False, False, False, True),
    "descriptor-part": (True, True, False, False, False, True),
    "descriptor-written": (True, False, True, False, False, True),
    "renamed": (False, False, True, True, False, True),
    "manifest-part": (False, True, True, True, False, True),
    "manifest-written": (False, False, True, True, True, True),
}


def disk_facts(root: str, key: str) -> tuple[bool, ...]:
    names = os.listdir(root)

    def has(pattern: str) -> bool:
        return any(fnmatch.fnmatch(n, pattern) for n in names)

    descriptor = os.path.join(root, f"{key}.descriptor.txt")
    with_manifest = False
    if os.path.exists(descriptor):
        with open(descriptor, "rb") as f:
            with_manifest = entry_layout.descriptor_manifest(f.read()) is not None
    return (has(f"{key}.hc*.tmp"), has(f"{key}.descriptor.txt.*.part"), f"{key}.descriptor.txt" in names,
            key in names, with_manifest, f"{key}.lock" in names)


def check_not_partially_committed(root: str, key: str, expected: dict[str, bytes]) -> str:
    """Assert what readers could see after the kill is all or nothing; returns the state seen."""
    store = LocalStore(root)
    entry = store.entry_path(key)
    manifest = store.read_manifest(key)
    if manifest is not None:
        assert os.path.isdir(entry), "a manifest without its entry"
        assert store.check(entry, manifest, full=True) == [], "a committed entry differs from its manifest"
        assert tree(entry) == expected
        return "committed (complete)"
    if os.path.isdir(entry):
        # No manifest: hubcache does not trust it; tensorflow_hub would, so it must be whole too.
        assert tree(entry) == expected, "a visible entry dir (tensorflow_hub's view) is partial"
        assert store.lookup(key, "") is None
        return "entry dir without manifest (complete, not trusted)"
    assert store.lookup(key, "") is None
    return "nothing visible"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_never_commits_a_partial_entry(point, served, cache_root, figures):
    """A child process resolving a 12 MiB archive is SIGKILLed at one point of the download,
    the extraction or the commit; then the parent resolves the handle at once."""
    origin, url, expected, archive_bytes = served
    key = cache_key(url)
    path = "/crash/model.tar.gz"
    origin.reset_counts()
    stop_at = point if point in STOP_POINTS else None
    origin.throttle(path, RATE if point in FS_POINTS else None)
    if point == "request-sent":
        origin.fail(path, ("delay", 3.0))  # the request is in, not one body byte has left
    child = start_child({"handles": [url], "stop_at": stop_at})
    temp_glob = os.path.join(glob.escape(cache_root), f"{key}.hc*.tmp")

    def temp_files() -> int:
        return sum(count_files(d) for d in glob.glob(temp_glob))

    try:
        if point == "request-sent":
            wait_for(lambda: origin.count(path) >= 1, what="the child's request")
        elif point == "body-flowing":
            wait_for(lambda: origin.requests and origin.requests[0].sent >= 256 << 10, what="body bytes")
        elif point.startswith("files-"):
            n = int(point.split("-")[1])
            wait_for(lambda: temp_files() >= n, what=f"{n} files in the temp dir")
        else:
            wait_for(lambda: proc_state(child.pid) == "T", what=f"the child to stop at {point}")
        sent_at_kill = sum(r.sent for r in origin.requests)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        origin.throttle(path, None)
        origin.routes[path].faults.clear()
    assert child.returncode == -signal.SIGKILL
    assert disk_facts(cache_root, key) == EXPECTED_AT.get(point, EXPECTED_AT["downloading"]), \
        "the child was not killed where the kill point says"
    left = leftovers(cache_root)
    in_temp = temp_files()
    state = check_not_partially_committed(cache_root, key, expected)
    if point.startswith("files-"):
        assert in_temp >= int(point.split("-")[1]) and left, "the kill point was not reached"

    # The next resolve: no lock wait (the kernel released the dead holder's lock), no timeout.
    requests_before = len(origin.requests)
    with EventLog() as log:
        began = time.perf_counter()
        resolved = hubcache.resolve(url)
        recovery = time.perf_counter() - began
    assert resolved == os.path.join(cache_root, key)
    assert tree(resolved) == expected
    assert not log.kinds("waiting"), "the next resolve waited for a lock"
    assert leftovers(cache_root) == [], "the later resolve left the dead writer's temp files"
    # The dead holder's lock file is gone too (taken over, or dropped by the hit): tensorflow_hub's listing.
    assert sorted(os.listdir(cache_root)) == [key, f"{key}.descriptor.txt"]
    # Downloads are the plain GETs: a parallel download's range requests are part of one (on a
    # loaded machine loopback can be slow enough for the probe to go parallel).
    downloaded = sum(1 for r in origin.requests[requests_before:]
                     if r.path == path and "Range" not in r.headers)
    assert downloaded == (0 if point == "manifest-written" else 1)
    assert recovery < 10.0

    figures.update(
        run=f"1 child process resolving a {archive_bytes / 2**20:.1f} MiB archive ({SHARDS + 3} files), "
            f"SIGKILL at '{point}'",
        kill_point=point,
        where=STOP_POINTS.get(point, "found by polling the origin and the temp dir"),
        body_bytes_sent_at_kill=sent_at_kill,
        temp_files_at_kill=in_temp,
        leftovers_at_kill=len(left),
        state_after_kill=state,
        next_resolve_s=round(recovery, 3),
        next_resolve_downloads=downloaded,
        lock_waits=0,
    )
