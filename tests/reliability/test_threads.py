"""Thread safety of ``resolve`` and of plugin loading, inside one process."""

from __future__ import annotations

import os
import random
import threading
import time

import hubcache
from hubcache.plugins import registry as plugins
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer

from .helpers import leftovers, make_archive, tree

SCENARIO = "9. Thread safety"
THREADS = 16


def files_of(seed: int, weights: int = 512 << 10) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [("saved_model.pb", b"\x08\x01" + rng.randbytes(1000)),
            ("variables/variables.index", rng.randbytes(200)),
            ("variables/variables.data-00000-of-00001", rng.randbytes(weights))]


def run_together(count: int, work) -> tuple[list, float]:
    """Run ``work(i)`` in ``count`` threads released by one barrier; (results, wall seconds)."""
    barrier = threading.Barrier(count + 1)
    results: list = [None] * count

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as error:  # collected and asserted on by the caller
            results[i] = error

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join(60)
    return results, time.perf_counter() - began


def test_16_threads_one_cold_handle(cache_root, figures):
    """16 threads of one process resolve one cold handle at once: one request, one path."""
    files = files_of(1, 2 << 20)
    with OriginServer() as origin:
        url = origin.add("/threads/model.tar.gz", make_archive(files))
        origin.throttle("/threads/model.tar.gz", 4 << 20)
        results, wall = run_together(THREADS, lambda i: hubcache.resolve(url))
        requests = origin.count("/threads/model.tar.gz")
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert set(results) == {os.path.join(cache_root, cache_key(url))}
    assert tree(results[0]) == dict(files)
    assert requests == 1
    assert leftovers(cache_root) == []
    figures.update(run=f"{THREADS} threads, one cold handle ({len(make_archive(files)) >> 10} KiB .tar.gz at 4 MiB/s)",
                   archive_requests=requests, distinct_paths=len(set(results)), wall_s=round(wall, 3))


def test_16_threads_16_handles(cache_root, figures):
    """16 threads resolve 16 different cold handles at once: each downloaded once, all correct."""
    with OriginServer() as origin:
        urls, contents = [], {}
        for i in range(THREADS):
            files = files_of(100 + i)
            urls.append(origin.add(f"/threads/m{i}.tar.gz", make_archive(files)))
            contents[urls[-1]] = dict(files)
        results, wall = run_together(THREADS, lambda i: hubcache.resolve(urls[i]))
        counts = [origin.count(f"/threads/m{i}.tar.gz") for i in range(THREADS)]
        # And once more, all hits: memoised answers with no request.
        again, _ = run_together(THREADS, lambda i: hubcache.resolve(urls[i]))
        requests_after = origin.count()
    assert not [r for r in results if isinstance(r, BaseException)], results
    for url, path in zip(urls, results):
        assert path == os.path.join(cache_root, cache_key(url))
        assert tree(path) == contents[url]
    assert counts == [1] * THREADS
    assert again == results and requests_after == THREADS
    figures.update(run=f"{THREADS} threads x {THREADS} different cold handles, then {THREADS} warm",
                   archive_requests=sum(counts), wall_s=round(wall, 3))


def test_plugin_loading_from_many_threads(cache_root, monkeypatch, figures):
    """32 threads hit a fresh (reset) plugin registry at once: entry points load exactly once,
    every thread sees the same complete registry and one backend instance."""
    with OriginServer() as origin:
        url = origin.add("/threads/plugins.tar.gz", make_archive(files_of(7)))
        hubcache.resolve(url)  # warm the cache: the threads race on loading, not downloading
        plugins.reset_registry()
        resolver.clear_memo()
        loads = []
        original = plugins.Registry.load_entry_points

        def counting(self):  # counts real loads; the real method still runs
            loads.append(threading.get_ident())
            time.sleep(0.05)  # widen the window in which a second loader could sneak in
            original(self)

        monkeypatch.setattr(plugins.Registry, "load_entry_points", counting)

        def work(i: int):
            registry = plugins.get_registry()
            path = hubcache.resolve(url)
            return registry, path, resolver.current_backend()[1]

        results, wall = run_together(32, work)
        requests = origin.count()
    assert not [r for r in results if isinstance(r, BaseException)], results
    registries = {id(r[0]) for r in results}
    backends = {id(r[2]) for r in results}
    assert len(loads) == 1, f"entry points loaded {len(loads)} times"
    assert len(registries) == 1 and len(backends) == 1
    registry = results[0][0]
    assert {"tmp", "home"} <= set(registry.backends)
    assert not [p for p in registry.plugins.values() if p.error], "a plugin failed to load"
    names = [registry.pm.get_name(p) for p in registry.pm.get_plugins()]
    assert len(names) == len(set(names))
    assert {r[1] for r in results} == {os.path.join(cache_root, cache_key(url))}
    assert requests == 1
    figures.update(run="32 threads: first plugin-registry use after a reset, each also resolving",
                   entry_point_loads=len(loads), registries=len(registries), backend_instances=len(backends),
                   plugins=len(names), wall_s=round(wall, 3))
