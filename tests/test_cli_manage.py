"""The cache-management commands: ``hubcache ls``, ``info``, ``rm``, ``prune``, ``prefetch``.

Commands run through ``hubcache.cli.main`` in this process (fast, output captured) against real
caches filled from a real local origin server; a few run as real child processes where another
process is the point (a holder of an entry) or where the installed entry point is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import hubcache
from hubcache.cli import main
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.plugins.registry import get_registry
from hubcache.testing import archive_of, build_model_dir, tree_of
from local_layout import manifest_data, write_manifest_json

COMMANDS = ("ls", "info", "rm", "prune", "prefetch")


@pytest.fixture
def urls(tmp_path, origin, monkeypatch):
    """Three models on the origin and the home backend selected."""
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    out = []
    for i in range(3):
        model = build_model_dir(tmp_path / f"m{i}", weights_bytes=50_000 + 20_000 * i, seed=i)
        out.append(origin.add(f"/models/m{i}.tar.gz", archive_of(model)))
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def store():
    return resolver.current_backend()[1].store


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: hubcache {command}" in out
    assert "examples:" in out and f"hubcache {command} " in out.split("examples:")[1]


def test_ls_of_an_empty_cache(urls, capsys):
    code, out, _ = run(capsys, "ls")
    assert code == 0 and out.startswith("home: 0 entries, 0 B in ")
    assert run_json(capsys, "ls") == {"entries": [], "backends": {"home": {
        "root": store().root, "entries": 0, "bytes": 0, "states": {}}}, "total": {"entries": 0, "bytes": 0}}


def test_ls_shows_every_entry_state_and_totals(urls, capsys):
    assert run(capsys, "prefetch", *urls)[0] == 0
    # Damage one entry, and add one tensorflow_hub wrote (directory + descriptor, no manifest).
    os.unlink(os.path.join(store().entry_path(cache_key(urls[1])), "variables", "variables.index"))
    foreign = "https://tfhub.dev/google/foreign/1"
    model_dir = os.path.join(store().root, cache_key(foreign))
    build_model_dir(model_dir, weights_bytes=1000)
    with open(store().descriptor_path(cache_key(foreign)), "w") as f:
        f.write(f"Module: {foreign}\nDownload Time: now\nDownloader Hostname: elsewhere (PID:1)\n")
    data = run_json(capsys, "ls")
    states = {e["handle"]: e["state"] for e in data["entries"]}
    assert states == {urls[0]: "committed", urls[1]: "damaged", urls[2]: "committed", foreign: "foreign"}
    by_handle = {e["handle"]: e for e in data["entries"]}
    path = by_handle[urls[0]]["path"]
    assert by_handle[urls[0]]["bytes"] == sum(len(v) for v in tree_of(path).values())
    assert by_handle[urls[0]]["files"] == len(tree_of(path)) and by_handle[urls[0]]["backend"] == "home"
    assert by_handle[urls[0]]["in_use"] is False and by_handle[urls[0]]["last_used_unix"] > time.time() - 60
    assert data["total"] == {"entries": 4, "bytes": sum(e["bytes"] for e in data["entries"])}
    assert data["backends"]["home"]["states"] == {"committed": 2, "damaged": 1, "foreign": 1}

    hubcache.resolve(urls[0])  # this process now uses it
    code, out, _ = run(capsys, "ls")
    lines = out.splitlines()
    assert lines[0].split() == ["SIZE", "FILES", "LAST", "USED", "STATE", "BACKEND", "HANDLE"]
    row = next(line for line in lines if line.endswith(urls[0]))
    assert "committed, in use" in row and " 0s ago " in row and " home " in row
    assert "home: 4 entries" in out and "(2 committed, 1 damaged, 1 foreign)" in out
    assert "`hubcache prune` removes them" in out


def test_ls_of_several_backends_and_a_backend_without_cache(urls, capsys):
    run(capsys, "prefetch", urls[0])
    data = run_json(capsys, "ls", "--backend", "tmp,home")
    assert set(data["backends"]) == {"tmp", "home"}
    assert [(e["backend"], e["handle"]) for e in data["entries"]] == [("home", urls[0])]
    code, _, err = run(capsys, "ls", "--backend", "nosuch")
    assert code == 1 and "no backend named 'nosuch'" in err and "installed backends:" in err


def test_info_of_a_cached_and_an_uncached_handle(urls, origin, capsys):
    code, out, _ = run(capsys, "info", urls[0])
    assert code == 0 and "not cached: would be at " + store().entry_path(cache_key(urls[0])) in out
    assert f"run `hubcache prefetch {urls[0]}`" in out
    run(capsys, "prefetch", urls[0])
    origin.reset_counts()
    info = run_json(capsys, "info", urls[0])
    import hashlib

    archive = origin.routes["/models/m0.tar.gz"].body
    [tier] = info["tiers"]
    assert info["key"] == cache_key(urls[0]) and info["backend"] == "home"
    assert info["backend_reason"] == "HUBCACHE_BACKEND"
    assert info["location"] == {"url": urls[0], "kind": "archive"}
    assert tier["cached"] and tier["state"] == "committed" and tier["path"] == store().entry_path(cache_key(urls[0]))
    assert tier["manifest"]["archive"]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert tier["manifest"]["archive"]["bytes"] == len(archive)
    assert tier["manifest"]["files"] == len(tree_of(tier["path"])) and tier["manifest"]["source"] == urls[0]
    code, out, _ = run(capsys, "info", urls[0])
    assert f"cached at {tier['path']}" in out and hashlib.sha256(archive).hexdigest() in out
    assert origin.count() == 0, "info never downloads"
    wrong_pin = urls[0] + "#sha256=" + "0" * 64
    assert run_json(capsys, "info", wrong_pin)["tiers"][0]["pin_matches"] is False


def test_info_of_a_directory_and_of_a_remote_backend(tmp_path, capsys, monkeypatch):
    model = build_model_dir(tmp_path / "dir")
    code, out, _ = run(capsys, "info", model)
    assert code == 0 and f"source    directory {model}" in out and "resolves to itself" in out
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "UNCOMPRESSED")
    if "remote" in get_registry().backends:
        info = run_json(capsys, "info", "https://tfhub.dev/google/x/1")
        assert info["backend"] == "remote" and "passthrough" in info["tiers"][0]["note"]


def test_rm_removes_reports_and_refuses_entries_in_use(urls, origin, capsys):
    run(capsys, "prefetch", *urls)
    code, out, err = run(capsys, "rm", urls[0], cache_key(urls[1]), "https://example.invalid/none.tar.gz")
    assert code == 0
    assert out.startswith("removed  ") and urls[0] in out and cache_key(urls[1]) in out
    assert "not cached: https://example.invalid/none.tar.gz [home]" in err
    assert {e.key for e in store().entries()} == {cache_key(urls[2])}

    hold = textwrap.dedent("""
        import sys, hubcache
        print(hubcache.resolve(sys.argv[1]), flush=True)
        sys.stdin.read()
    """)
    child = subprocess.Popen([sys.executable, "-c", hold, urls[2]], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip()
        code, out, _ = run(capsys, "rm", "--json", urls[2])
        [result] = json.loads(out)
        assert code == 1 and result["outcome"] == "kept" and result["reason"] == f"in use by pid {child.pid}"
        code, _, err = run(capsys, "rm", urls[2])
        assert code == 1 and f"in use by pid {child.pid}; try again when it is done" in err
    finally:
        child.stdin.close()  # the holder exits normally
        child.wait()
    [result] = run_json(capsys, "rm", urls[2])
    assert result["outcome"] == "removed"
    assert list(store().entries()) == []


def test_prune_dry_run_then_for_real(urls, capsys):
    run(capsys, "prefetch", *urls)
    sizes = {e.handle: e.size for e in store().entries()}
    for url, days in zip(urls, (45, 2, 1)):  # least recently used first: urls[0], then urls[1]
        when = time.time() - days * 86400
        os.utime(store().entry_path(cache_key(url)), (when, when))  # the last use on record
    listing = sorted(os.listdir(store().root))
    [report] = run_json(capsys, "prune", "--dry-run", "--older-than", "30d", "--max-size", str(sizes[urls[2]]))
    assert sorted(os.listdir(store().root)) == listing
    assert [(a["handle"], a["outcome"]) for a in report["actions"]] == [
        (urls[0], "would remove"), (urls[1], "would remove")]
    assert report["actions"][0]["reason"] == "not used for 45d"
    assert report["actions"][1]["reason"] == "over the size budget"
    assert report["bytes_after"] == sizes[urls[2]] and report["dry_run"]
    code, out, _ = run(capsys, "prune", "-n", "--older-than", "30d")
    assert code == 0 and out.startswith("would remove ") and "(dry run: nothing was removed)" in out
    code, out, _ = run(capsys, "prune", "--older-than", "30d")
    assert code == 0 and out.startswith("removed ") and "not used for 45d" in out and "home: freed" in out
    assert {e.handle for e in store().entries()} == {urls[1], urls[2]}


def test_prune_without_options_applies_the_configured_budget(urls, capsys, monkeypatch):
    run(capsys, "prefetch", *urls)
    # Parallel downloads can finish within one tick of the kernel's coarse file clock: give each
    # entry its own last-use time, so "least recently used" has one answer.
    entries = sorted(store().entries(), key=lambda e: e.key)
    for age, entry in enumerate(entries):
        stamp = time.time() - 3600 * (age + 1)
        os.utime(store().entry_path(entry.key), (stamp, stamp))
    newest = max(store().entries(), key=lambda e: e.last_used)
    assert newest.key == entries[0].key
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", str(newest.size))
    [report] = run_json(capsys, "prune")
    assert report["max_size"] == newest.size and report["bytes_after"] <= newest.size
    assert [e.key for e in store().entries()] == [newest.key]


@pytest.mark.parametrize("argv, message", [
    (["prune", "--max-size", "ten"], "is not a size"),
    (["prune", "--older-than", "soon"], "is not a duration"),
])
def test_prune_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_prefetch_from_arguments_and_a_list_file(urls, origin, tmp_path, capsys):
    listing = tmp_path / "models.txt"
    listing.write_text(f"# models for the fleet\n{urls[1]}\n\n{urls[2]}  # the big one\n{urls[0]}\n")
    code, out, err = run(capsys, "prefetch", urls[0], "-f", str(listing))
    assert code == 0
    lines = out.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["fetched"] * 3
    assert {line.split()[-1] for line in lines} == set(urls)
    assert "3 handles in " in err and "3 downloaded" in err and "0 failed" in err
    assert origin.count() == 3, "a handle listed twice is fetched once"
    results = run_json(capsys, "prefetch", "-f", str(listing))
    assert [(r["handle"], r["status"], r["downloaded_bytes"]) for r in results] == [
        (urls[1], "cached", 0), (urls[2], "cached", 0), (urls[0], "cached", 0)]
    assert [r["path"] for r in results] == [store().entry_path(cache_key(u)) for u in (urls[1], urls[2], urls[0])]
    assert origin.count() == 3
    # prefetched entries are not left marked in use by the prefetching process
    assert all(store().busy(cache_key(u)) is None for u in urls)


def test_prefetch_reads_stdin_and_reports_failures(urls, origin, capsys, monkeypatch):
    import io

    missing = origin.url("/models/missing.tar.gz")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{urls[0]}\n{missing}\n"))
    code, out, err = run(capsys, "prefetch", "-f", "-")
    assert code == 1
    assert out.split()[0] == "fetched" and urls[0] in out
    assert f"hubcache: error: {missing!r}: " in err and "404" in err and "1 failed" in err
    code, _, err = run(capsys, "prefetch")
    assert code == 2 and "no handles to prefetch" in err
    code, _, err = run(capsys, "prefetch", "-f", "/nonexistent/list.txt")
    assert code == 2 and "cannot read /nonexistent/list.txt" in err


def test_prefetch_downloads_in_parallel(urls, origin, capsys):
    for i in range(3):
        origin.throttle(f"/models/m{i}.tar.gz", 150_000)  # each takes ~0.4-0.6 s alone
    spans = {}
    lock = threading.Lock()

    class Timer:
        @hubcache.hookimpl
        def hubcache_event(self, event):
            with lock:
                if event.kind == "download_started":
                    spans[event.handle] = [time.monotonic(), None]
                elif event.kind == "download_finished":
                    spans[event.handle][1] = time.monotonic()

    get_registry().pm.register(Timer(), name="test-timer")
    try:
        code, _, _ = run(capsys, "prefetch", "--jobs", "3", *urls)
    finally:
        get_registry().pm.unregister(name="test-timer")
    assert code == 0
    starts = sorted(s for s, _ in spans.values())
    first_end = min(e for _, e in spans.values())
    assert len(spans) == 3 and starts[-1] < first_end, f"downloads did not overlap: {spans}"


def test_verbose_logs_what_happens(urls):
    out = subprocess.run([sys.executable, "-m", "hubcache", "-v", "resolve", urls[0]],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = out.stdout.strip()
    lines = out.stderr.splitlines()
    assert lines[0].startswith(f"hubcache: downloading {urls[0]} (") and lines[0].endswith(" KiB) [home]")
    assert any(line.startswith("hubcache: downloaded ") and line.endswith("/s [home]") for line in lines)
    assert any(line.startswith(f"hubcache: unpacked {len(tree_of(path))} files (") for line in lines)
    assert lines[-1] == f"hubcache: cached {urls[0]} at {path} [home]"


def test_the_installed_command(urls, capsys):
    exe = shutil.which("hubcache", path=os.path.dirname(sys.executable))
    assert exe, "the hubcache console script is installed"
    out = subprocess.run([exe, "prefetch", "--json", urls[0]], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[0]["status"] == "fetched"
    out = subprocess.run([exe, "ls", "--json"], capture_output=True, text=True, check=True)
    assert [e["handle"] for e in json.loads(out.stdout)["entries"]] == [urls[0]]


def test_manifests_with_nonsense_fields_break_no_command(urls, capsys):
    """A manifest is read from a cache others may write: times out of range or not numbers and
    archive records of the wrong types are shown as unknown, never a traceback (real processes)."""
    assert run(capsys, "prefetch", *urls)[0] == 0
    forged = [{"created": 1e300, "archive": {"sha256": "ab", "bytes": "lots"}},
              {"created": float("nan"), "archive": {"sha256": ["x"], "bytes": [1], "format": {"a": 1}}},
              {"created": -1e20, "archive": {"bytes": -5, "sha256": 7}}]
    for url, fields in zip(urls, forged):
        key = cache_key(url)
        data = manifest_data(store().root, key)
        data.update(fields)
        write_manifest_json(store().root, key, json.dumps(data))  # NaN is written as NaN, which json.loads reads back
        os.utime(store().entry_path(key), (0, 0))  # no recorded use: the manifest's time is all there is
    env = dict(os.environ)
    for argv in (["ls"], ["ls", "--json"], ["verify"], ["prune", "--dry-run"],
                 ["prune", "--older-than", "1d", "--dry-run"], ["prune", "--max-size", "1", "--dry-run"],
                 ["prune", "--json", "--max-size", "1", "--dry-run"],
                 *[["info", url] for url in urls], *[["info", "--json", url] for url in urls]):
        done = subprocess.run([sys.executable, "-m", "hubcache", *argv], capture_output=True, text=True, env=env)
        assert "Traceback" not in done.stderr and done.returncode == 0, (argv, done.stderr[-2000:])
        if argv[0] == "ls" and "--json" in argv:
            entries = json.loads(done.stdout)["entries"]
            assert {e["last_used"] for e in entries} == {None} and {e["last_used_unix"] for e in entries} == {None}
        if "--json" in argv:  # strict JSON: a forged time must not come out as NaN or Infinity
            json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{argv}: {name} in the JSON"))
        if argv[0] == "info" and "--json" in argv:
            manifest = json.loads(done.stdout)["tiers"][0]["manifest"]
            assert manifest["created"] is None and "bytes" not in manifest["archive"]
    # Nonsense times count as oldest: a forged time in the far future cannot keep an entry forever.
    [report] = run_json(capsys, "prune", "--older-than", "1d", "--dry-run")
    assert sorted(a["key"] for a in report["actions"] if a["outcome"] == "would remove") == sorted(
        cache_key(url) for url in urls)
