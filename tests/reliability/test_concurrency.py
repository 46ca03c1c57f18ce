"""Concurrency: many processes and threads resolving cold handles at the same instant download
each archive exactly once, and every caller gets the same complete path.

The callers are released together by a file barrier (each child writes ``ready-<id>`` and spins
until ``go`` exists), and the origin sends slowly, so every caller arrives while the first
download is still in flight and must wait for it rather than start its own.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

import hubcache
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import FORMATS, SUFFIX, OriginServer

from .helpers import EventLog, child_results, leftovers, make_archive, start_child, tree, wait_for

SCENARIO = "1. Concurrency"
pytestmark = pytest.mark.slow

PROCESSES = 16
THREADS = 16


def model_files(seed: int, weights: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [("saved_model.pb", b"\x08\x01\x12" + rng.randbytes(2000)),
            ("variables/variables.index", rng.randbytes(300)),
            ("variables/variables.data-00000-of-00002", rng.randbytes(weights // 2)),
            ("variables/variables.data-00001-of-00002", rng.randbytes(weights // 2)),
            ("assets/vocab.txt", "\n".join(f"token{i}" for i in range(500)).encode())]


def release(barrier: str, count: int) -> float:
    """Wait until ``count`` children are ready, then let them all go; returns the release time."""
    wait_for(lambda: len([n for n in os.listdir(barrier) if n.startswith("ready-")]) >= count,
             timeout=60, interval=0.01, what=f"{count} children to be ready")
    released = time.time()
    with open(os.path.join(barrier, "go"), "w"):
        pass
    return released


def test_16_processes_and_16_threads_one_cold_handle(tmp_path, cache_root, figures):
    """16 processes and 16 threads resolve one cold handle at once: one archive request."""
    files = model_files(1, 4 << 20)
    archive = make_archive(files, "zst")
    barrier = str(tmp_path / "barrier")
    os.makedirs(barrier)
    with OriginServer() as origin:
        # Baseline: one caller alone, same bytes at the same rate (another URL, so another key).
        alone = origin.add("/alone/model.tar.zst", archive)
        origin.throttle("/alone/model.tar.zst", 4 << 20)
        baseline = child_results(start_child({"handles": [alone]}))["results"][0]["seconds"]
        url = origin.add("/shared/model.tar.zst", archive)
        origin.throttle("/shared/model.tar.zst", 4 << 20)  # about one second in flight
        children = [start_child({"handles": [url], "barrier": barrier, "id": i}) for i in range(PROCESSES)]
        thread_results: list[tuple[str, float]] = []
        go = threading.Event()

        def work() -> None:
            go.wait()
            began = time.perf_counter()
            path = hubcache.resolve(url)
            thread_results.append((path, time.perf_counter() - began))

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        with EventLog() as log:
            for t in threads:
                t.start()
            released = release(barrier, PROCESSES)
            go.set()
            reports = [child_results(c) for c in children]
            for t in threads:
                t.join(60)
        wall = max(r["results"][0]["finished"] for r in reports) - released
        requests = origin.count("/shared/model.tar.zst")

    results = [r["results"][0] for r in reports]
    errors = [r for r in results if "error" in r]
    assert not errors, errors
    paths = {r["path"] for r in results} | {p for p, _ in thread_results}
    expected_path = os.path.join(cache_root, cache_key(url))
    assert len(thread_results) == THREADS
    assert paths == {expected_path}, "every caller must get the same path"
    assert tree(expected_path) == {name: data for name, data in files}
    store = LocalStore(cache_root)
    assert store.verify(cache_key(url), full=True) == []
    assert leftovers(cache_root) == []
    assert requests == 1, f"{requests} archive requests for one handle"
    process_starts = [r["released"] - released for r in reports]
    figures.update(
        run=f"{PROCESSES} processes + {THREADS} threads, one cold handle, "
            f"{len(archive) / 2**20:.1f} MiB .tar.zst sent at 4 MiB/s",
        callers=PROCESSES + THREADS,
        archive_requests=requests,
        distinct_paths=len(paths),
        one_caller_alone_s=round(baseline, 3),
        wall_s=round(wall, 3),
        slowest_caller_s=round(max([r["seconds"] for r in results] + [s for _, s in thread_results]), 3),
        release_spread_ms=round(1000 * (max(process_starts) - min(process_starts)), 1),
        lock_waits_reported=sum(r["waits"] for r in reports) + len(log.kinds("waiting")),
    )


def test_mixed_handles_each_downloaded_once(tmp_path, cache_root, figures):
    """16 processes each resolve 6 handles (every format, one tfhub-style) in 6 threads at once."""
    barrier = str(tmp_path / "barrier")
    os.makedirs(barrier)
    with OriginServer() as origin:
        handles, archive_paths, contents = [], [], {}
        for i, fmt in enumerate(FORMATS):
            files = model_files(10 + i, 600 << 10)
            path = f"/mixed/m{i}{SUFFIX[fmt]}"
            handles.append(origin.add(path, make_archive(files, fmt)))
            archive_paths.append(path)
            contents[handles[-1]] = dict(files)
        files = model_files(20, 600 << 10)
        handle = origin.add_tfhub_model("/google/mixed/1", make_archive(files, "gz"))
        handles.append(handle)
        archive_paths.append("/storage/google/mixed/1.tar.gz")
        contents[handle] = dict(files)
        for path in archive_paths:
            origin.throttle(path, 2 << 20)
        children = []
        for i in range(PROCESSES):
            order = list(handles)
            random.Random(i).shuffle(order)
            children.append(start_child({"handles": order, "barrier": barrier, "id": i}))
        released = release(barrier, PROCESSES)
        reports = [child_results(c) for c in children]
        wall = max(r["finished"] for rep in reports for r in rep["results"]) - released
        counts = {p: origin.count(p) for p in archive_paths}

    results = [r for rep in reports for r in rep["results"]]
    assert not [r for r in results if "error" in r]
    assert len(results) == PROCESSES * len(handles)
    for handle in handles:
        paths = {r["path"] for r in results if r["handle"] == handle}
        assert paths == {os.path.join(cache_root, cache_key(handle))}
        assert tree(paths.pop()) == contents[handle]
    assert counts == {p: 1 for p in archive_paths}, counts
    assert leftovers(cache_root) == []
    figures.update(
        run=f"{PROCESSES} processes x {len(handles)} threads (one per handle, shuffled order): "
            f"{', '.join(FORMATS)} archives and a tfhub-style handle",
        callers=len(results),
        handles=len(handles),
        archive_requests=sum(counts.values()),
        wall_s=round(wall, 3),
        lock_waits_reported=sum(r["waits"] for r in reports),
    )
