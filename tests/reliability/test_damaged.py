"""Damaged entries: what a temp cleaner (or a user) does to a committed entry is detected and
rebuilt on the next resolve, never returned; ``hubcache verify`` reports and repairs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import hubcache
from hubcache.core.handles import cache_key
from hubcache.testing import OriginServer, tree_of

from local_layout import drop_manifest, write_manifest_json

from .helpers import child_results, leftovers, start_child, tree

SCENARIO = "3. Damaged entries"


def _delete(rel):
    return lambda entry: os.unlink(os.path.join(entry, rel))


def _truncate(rel):
    def damage(entry):
        with open(os.path.join(entry, rel), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(entry, rel)) // 2)
    return damage


def _empty_dir(entry):
    for name in os.listdir(entry):
        full = os.path.join(entry, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)


def _manifest(action):
    """The manifest (at the end of the descriptor) taken away, or cut short."""
    def damage(entry):
        root, key = os.path.split(entry)
        if action == "delete":
            drop_manifest(root, key)
        else:
            write_manifest_json(root, key, b'{"format": 1, "handle": "x", "files": [[')
    return damage


#: what a temp cleaner or a user does to an entry, by name
DAMAGE = {
    "shard deleted": _delete("variables/variables.data-00001-of-00002"),
    "saved_model.pb deleted": _delete("saved_model.pb"),
    "shard truncated": _truncate("variables/variables.data-00000-of-00002"),
    "saved_model.pb emptied": lambda e: open(os.path.join(e, "saved_model.pb"), "wb").close(),
    "variables dir removed": lambda e: shutil.rmtree(os.path.join(e, "variables")),
    "empty dir (assets.extra) removed": lambda e: os.rmdir(os.path.join(e, "assets.extra")),
    "manifest deleted": _manifest("delete"),
    "manifest corrupt": _manifest("corrupt"),
    "entry dir emptied": _empty_dir,
    "entry dir removed": lambda e: shutil.rmtree(e),
}


@pytest.fixture
def served(model):
    with OriginServer() as origin:
        from hubcache.testing import archive_of

        url = origin.add("/damaged/model.tar.gz", archive_of(model))
        yield origin, url


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_rebuilt_by_the_next_process(kind, served, model, cache_root, figures):
    """Damage a committed entry; a new process resolving it gets a rebuilt, complete entry."""
    origin, url = served
    path = hubcache.resolve(url)
    DAMAGE[kind](path)
    began = time.perf_counter()
    report = child_results(start_child({"handles": [url]}))
    seconds = time.perf_counter() - began
    result = report["results"][0]
    assert result.get("path") == path, result
    assert tree_of(path) == tree_of(model), "the damaged entry was returned"
    assert os.path.isdir(os.path.join(path, "assets.extra"))
    assert origin.count("/damaged/model.tar.gz") == 2, "the damage was not detected (no rebuild)"
    assert leftovers(cache_root) == []
    figures.update(run=f"damage: {kind}; then a new process resolves", rebuilt=True,
                   next_process_s=round(seconds, 3), archive_requests=2)


@pytest.mark.parametrize("kind", ["saved_model.pb deleted", "entry dir removed"])
def test_damage_detected_by_a_memoised_process(kind, served, model, figures):
    """Within one process, a memoised hit still notices the entry's model file vanished
    (the "SavedModel file does not exist" symptom) and rebuilds it."""
    origin, url = served
    path = hubcache.resolve(url)
    assert hubcache.resolve(url) == path  # memoised
    DAMAGE[kind](path)
    assert hubcache.resolve(url) == path
    assert tree_of(path) == tree_of(model)
    assert origin.count("/damaged/model.tar.gz") == 2
    figures.update(run=f"damage: {kind} between two resolves of one process", rebuilt=True)


def hubcache_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubcache", *args], capture_output=True, text=True,
                          timeout=120)


def test_verify_reports_and_repairs(model, cache_root, figures):
    """`hubcache verify` finds every kind of damage (sizes by default, CRC-32 with --full),
    reports it (text and --json, exit 1), and --repair rebuilds everything (exit 0)."""
    from hubcache.testing import archive_of

    with OriginServer() as origin:
        kinds = ["shard deleted", "shard truncated", "manifest deleted", "entry dir emptied"]
        urls = {k: origin.add(f"/verify/{i}.tar.gz", archive_of(model)) for i, k in enumerate(kinds)}
        urls["bit flip"] = origin.add("/verify/flip.tar.gz", archive_of(model))
        urls["intact"] = origin.add("/verify/intact.tar.gz", archive_of(model))
        urls["leftover"] = origin.add("/verify/leftover.tar.gz", archive_of(model))
        paths = {k: hubcache.resolve(u) for k, u in urls.items()}
        for k in kinds:
            DAMAGE[k](paths[k])
        flip = os.path.join(paths["bit flip"], "variables/variables.data-00000-of-00002")
        with open(flip, "r+b") as f:  # same size, one bit different: only --full sees it
            byte = f.read(1)
            f.seek(0)
            f.write(bytes([byte[0] ^ 1]))
        shutil.rmtree(paths["leftover"])  # and a dead writer's temp dir next to nothing
        os.unlink(paths["leftover"] + ".descriptor.txt")
        os.makedirs(paths["leftover"] + ".hc999999-deadbeef.tmp/variables")

        quick = hubcache_cli("verify", "--json")
        full = hubcache_cli("verify", "--full", "--json")
        text = hubcache_cli("verify", "--full", urls["shard truncated"], urls["intact"])
        requests_before = origin.count()
        began = time.perf_counter()
        repaired = hubcache_cli("verify", "--full", "--repair", "--json", *urls.values())
        repair_s = time.perf_counter() - began
        downloads = origin.count() - requests_before
        after = hubcache_cli("verify", "--full", "--json")

    by_key = lambda proc: {r["key"]: r for r in json.loads(proc.stdout)}  # noqa: E731
    q, f, r, a = by_key(quick), by_key(full), by_key(repaired), by_key(after)
    key = {k: cache_key(u) for k, u in urls.items()}
    assert quick.returncode == 1 and full.returncode == 1
    for k in kinds:
        assert q[key[k]]["status"] == "damaged" and q[key[k]]["problems"], (k, q[key[k]])
    assert q[key["bit flip"]]["status"] == "ok", "sizes alone cannot see a flipped bit"
    assert f[key["bit flip"]]["status"] == "damaged"
    assert "CRC-32" in f[key["bit flip"]]["problems"][0]
    assert f[key["intact"]]["status"] == "ok"
    assert q[key["leftover"]]["status"] == "leftover"
    assert text.returncode == 1
    assert "damaged" in text.stdout and "variables.data-00000-of-00002" in text.stdout
    assert any(line.startswith("ok") and urls["intact"] in line for line in text.stdout.splitlines())
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert {v["status"] for k, v in r.items() if k != key["intact"]} <= {"repaired", "cleaned"}
    assert r[key["leftover"]]["status"] == "cleaned"
    assert downloads == len(kinds) + 1, "each damaged entry is downloaded again, once"
    assert after.returncode == 0 and {v["status"] for v in a.values()} == {"ok"}
    for k in kinds + ["bit flip", "intact"]:
        assert tree(paths[k]) == tree_of(model)
    assert leftovers(cache_root) == []
    figures.update(run=f"{len(urls)} entries: {', '.join(kinds)}, a same-size bit flip, a leftover temp dir, "
                       "an intact one; verify, verify --full, verify --full --repair",
                   found_by_sizes=sum(v["status"] != "ok" for v in q.values()),
                   found_by_full=sum(v["status"] != "ok" for v in f.values()),
                   repaired=sum(v["status"] in ("repaired", "cleaned") for v in r.values()),
                   repair_downloads=downloads, repair_s=round(repair_s, 3))
