"""Two real processes resolving one cold handle at the same moment download it once.

The origin holds its answer to the first archive request for a while, so the first process is
still downloading when the second asks: the second must wait on the OS file lock (it reports a
``waiting`` event) and then find the committed entry, never sending a request of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from hubcache.core.handles import cache_key
from hubcache.testing import archive_of, tree_of

CHILD = """
    import json, os, sys, time
    import hubcache
    from hubcache.plugins.registry import get_registry

    kinds = []

    class Recorder:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            kinds.append(event.kind)

    get_registry().pm.register(Recorder(), name="recorder")
    handle, ready, go = sys.argv[1:]
    open(ready, "w").close()
    while not os.path.exists(go):  # start together: both are imported and waiting
        time.sleep(0.002)
    path = hubcache.resolve(handle)
    print(json.dumps({"path": path, "events": kinds}))
"""


def start_together(handle: str, workdir: str, count: int) -> list[dict]:
    go = os.path.join(workdir, "go")
    procs, ready = [], []
    for i in range(count):
        ready.append(os.path.join(workdir, f"ready-{i}"))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), handle, ready[-1], go],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 30
    while not all(os.path.exists(r) for r in ready):
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.005)
    open(go, "w").close()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


def test_two_processes_one_cold_handle_one_download(origin, model, tmp_path):
    archive = "/storage/google/race/1.tar.gz"
    handle = origin.add_tfhub_model("/google/race/1", archive_of(model, "zst"), fmt="gz")
    # The origin answers the first archive request only after 1.5 s; later ones at once.
    origin.fail(archive, ("delay", 1.5))

    first, second = start_together(handle, str(tmp_path), 2)

    expected = os.path.join(os.environ["TMPDIR"], "tfhub_modules", cache_key(handle))
    assert first["path"] == second["path"] == expected
    assert tree_of(expected) == tree_of(model)
    assert origin.count(archive) == 1, "the archive must be downloaded exactly once"
    downloaders = [r for r in (first, second) if "download_started" in r["events"]]
    waiters = [r for r in (first, second) if "waiting" in r["events"]]
    assert len(downloaders) == 1
    # The test is only meaningful if the two overlapped: the other one waited on the lock.
    assert len(waiters) == 1 and waiters[0] is not downloaders[0]
    assert "committed" not in waiters[0]["events"]
