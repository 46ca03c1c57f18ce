#!/usr/bin/env python3
"""A fleet resolving one cold handle at once: N hosts, one origin download, one bucket.

Each host is a process of its own (``fleet_host.py``) with its own local tier (``home``, in its
own ``XDG_CACHE_HOME``) in front of one shared ``gcs`` tier (``HUBCACHE_BACKEND=home,gcs``,
``TFHUB_CACHE_DIR=gs://bucket/prefix``) on one fake-gcs-server bucket; the origin is
``server.FileServer`` shaped as the network profile (``--rate`` per connection, ``--latency``).
Each host reaches the emulator through its own port of ``gcs_proxy.py``, which counts what
each host read from and wrote to the bucket.

Two runs, each on a fresh bucket prefix and fresh local tiers:

- **one host alone**: the time of its resolve (download, unpack, copy up into the bucket);
- **the fleet**: ``--hosts`` (16) hosts import everything, wait at a barrier, and are released at
  once; the wall time runs from the release until the last resolve returns.

It reports the origin's requests and bytes, which hosts downloaded, when the bucket entry was
committed (the downloader's ``copied`` event into ``gcs``), and per host: its resolve time, what
it read from the bucket (entry files: bytes, GETs, and whether any object was read more than
once), what it uploaded, how long after the commit it started reading the entry, and its peak
RSS. ``--publish`` refreshes the ``fleet`` section of ``docs/benchmarks.md``.

Run it from the repository root (needs the ``test`` extra: gcsfs and fake-gcs-server)::

    .venv/bin/python benchmarks/fleet.py              # 1 GiB of weights, 16 hosts
    .venv/bin/python benchmarks/fleet.py --size 16M --hosts 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from run import MIB, SUFFIX, BenchError, build_archives, machine, parse_size, publish, tree_bytes  # noqa: E402
from server import FileServer  # noqa: E402

HOST = os.path.join(HERE, "fleet_host.py")


def _kind(name: str) -> str:
    """What a bucket object is, by the layout of ``hubcache.stores.objectstore``."""
    for suffix, kind in ((".lock", "lease"), (".manifest.json", "manifest"), (".descriptor.txt", "descriptor")):
        if name.endswith(suffix):
            return kind
    return "file"


class Fleet:
    def __init__(self, args: argparse.Namespace, archive: str, model_bytes: int, origin: FileServer,
                 proxy_ports: list[int], bucket: str):
        self.args = args
        self.archive = archive
        self.model_bytes = model_bytes
        self.origin = origin
        self.proxy = proxy_ports
        self.bucket = bucket
        self.url = origin.url("/models/fleet" + SUFFIX[args.format])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TFHUB_", "HUBCACHE_"))}
        self.env.update(HUBCACHE_NO_PROGRESS="1", PYTHONUNBUFFERED="1", HUBCACHE_BACKEND="home,gcs",
                        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", NO_PROXY="127.0.0.1,localhost")
        if args.connections:
            self.env["HUBCACHE_CONNECTIONS"] = str(args.connections)

    def stats(self, reset: bool = False) -> list[dict]:
        port = self.proxy[0]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/__bench__/{'reset' if reset else 'stats'}",
                                     method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=30) as answer:
            return json.loads(answer.read())

    def run(self, hosts: int, workdir: str) -> dict:
        """``hosts`` hosts on a fresh prefix, released at once; every figure of the run."""
        prefix = f"gs://{self.bucket}/{uuid.uuid4().hex[:12]}"
        procs = []
        for i in range(hosts):
            home = os.path.join(workdir, f"host-{i:02d}")
            os.makedirs(home)
            env = dict(self.env, XDG_CACHE_HOME=home, TFHUB_CACHE_DIR=prefix,
                       STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{self.proxy[i]}")
            procs.append(subprocess.Popen([self.args.python, HOST, self.url], env=env, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise BenchError(f"a host failed to start: {proc.communicate()[1][-2000:]}")
        self.origin.reset_counts()
        self.stats(reset=True)
        released = time.monotonic()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for i, proc in enumerate(procs):
            out, err = proc.communicate()
            if proc.returncode != 0 or not out.strip():
                raise BenchError(f"host {i} failed (exit {proc.returncode}): {err.strip()[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        self.origin.wait_idle()  # every answer counted
        origin = self.origin.stats()
        bucket = self.stats()
        for i, res in enumerate(results):
            got = tree_bytes(res["path"])
            if got != self.model_bytes:
                raise BenchError(f"host {i}: {got} bytes of files at {res['path']}, expected {self.model_bytes}")
        if len({r["path"] for r in results}) != hosts:
            raise BenchError("two hosts returned the same path: their local tiers are not their own")
        return self.figures(released, results, origin, bucket[:hosts])

    def figures(self, released: float, results: list[dict], origin: dict, bucket: list[dict]) -> dict:
        downloaders = [i for i, r in enumerate(results) if any(e["kind"] == "download_started" for e in r["events"])]
        commits = [e["t"] for r in results for e in r["events"] if e["kind"] == "copied" and e["backend"] == "gcs"]
        commit = min(commits) if commits else None
        hosts = []
        for i, (res, seen) in enumerate(zip(results, bucket)):
            files = {name: read for name, read in seen["reads"].items() if _kind(name) == "file"}
            first = min((read["first"] for read in files.values()), default=None)
            hosts.append({
                "host": i,
                "seconds": res["ended"] - released,
                "downloaded": i in downloaders,
                "bucket_file_bytes": sum(r["bytes"] for r in files.values()),
                "bucket_file_gets": sum(r["gets"] for r in files.values()),
                "bucket_objects_read": len(files),
                "max_gets_per_object": max((r["gets"] for r in files.values()), default=0),
                # reads the host hung up on before their end (their bytes are in bucket_file_bytes)
                "bucket_aborted_gets": sum(r.get("aborted", 0) for r in files.values()),
                "bucket_other_bytes": sum(r["bytes"] for n, r in seen["reads"].items() if _kind(n) != "file"),
                "bucket_requests": seen["requests"],
                "upload_bytes": seen["upload_bytes"],
                "first_read_after_commit": first - commit if first is not None and commit is not None else None,
                "peak_rss_mib": res["peak_rss"] / MIB,
                "waited": any(e["kind"] == "waiting" for e in res["events"]),
            })
        return {"wall": max(r["ended"] for r in results) - released, "origin": origin, "downloaders": downloaders,
                "commit_after_release": commit - released if commit is not None else None, "hosts": hosts}


#: Bytes beyond the archive the origin may send in one download: the first answer's socket
#: buffers at the moment it is cut (a parallel download reads only chunk 0 of it).
CUT_SLACK = 8 << 20


def summarize(alone: dict, fleet: dict, archive_bytes: int, model_bytes: int) -> dict:
    readers = [h for h in fleet["hosts"] if not h["downloaded"]]
    delays = [h["first_read_after_commit"] for h in readers if h["first_read_after_commit"] is not None]
    checks = [
        # The bytes: the archive once, and what the origin had handed the socket of the first
        # answer (a plain GET of the whole archive) when it was cut after chunk 0.
        ("one origin download", len(fleet["downloaders"]) == 1
         and fleet["origin"]["bytes"] <= archive_bytes * 1.01 + CUT_SLACK,
         f"{len(fleet['downloaders'])} host(s) downloaded; the origin sent {fleet['origin']['bytes'] / MIB:.1f} MiB "
         f"in {fleet['origin']['gets']} GETs for a {archive_bytes / MIB:.1f} MiB archive"),
        ("one bucket commit", fleet["commit_after_release"] is not None,
         f"committed {fleet['commit_after_release']:.2f} s after the release" if fleet["commit_after_release"]
         else "no commit seen"),
        ("every other host served from the bucket, reading each object once",
         bool(readers) and all(h["bucket_file_bytes"] == model_bytes for h in readers),
         f"entry bytes read per host: {_span([h['bucket_file_bytes'] / MIB for h in readers], 'MiB')} "
         f"(the model's files: {model_bytes / MIB:.2f} MiB, so each byte once); GETs per object (ranged reads) "
         f"at most {max((h['max_gets_per_object'] for h in readers), default=0)}"),
        ("waiting hosts start copying within 1 s of the commit", bool(delays) and max(delays) <= 1.0,
         f"first read of the entry {_span(delays, 's')} after the commit"),
    ]
    return {"checks": [{"text": t, "met": bool(m), "detail": d} for t, m, d in checks],
            "wall_over_alone": fleet["wall"] / alone["wall"]}


def _span(values: list[float], unit: str) -> str:
    if not values:
        return "—"
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:.2f}–{hi:.2f} {unit} (median {mid:.2f})" if hi - lo > 0.005 else f"{mid:.2f} {unit}"


def table_lines(alone: dict, fleet: dict, summary: dict) -> list[str]:
    def host_row(name: str, h: dict) -> str:
        after = h["first_read_after_commit"]
        return (f"| {name} | {h['seconds']:.2f} | {'yes' if h['downloaded'] else '—'} | "
                f"{h['bucket_file_bytes'] / MIB:.1f} | {h['bucket_file_gets']} ({h['bucket_aborted_gets']}) | "
                f"{h['max_gets_per_object']} | "
                f"{h['bucket_other_bytes'] / 1024:.1f} | {h['upload_bytes'] / MIB:.1f} | "
                f"{'—' if after is None or h['downloaded'] else f'{after:.2f}'} | {h['peak_rss_mib']:.0f} |")

    lines = [
        "| run | wall (s) | origin GETs | origin MiB | hosts that downloaded | bucket commit after start (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("one host alone", alone), (f"{len(fleet['hosts'])} hosts at once", fleet)):
        commit = run["commit_after_release"]
        lines.append(f"| {name} | {run['wall']:.2f} | {run['origin']['gets']} | {run['origin']['bytes'] / MIB:.1f} | "
                     f"{len(run['downloaders'])} | {'—' if commit is None else f'{commit:.2f}'} |")
    lines += ["", f"Fleet wall ÷ one host alone: **{summary['wall_over_alone']:.2f}×**", "",
              "| host | resolve (s) | downloaded | entry MiB read from bucket | entry GETs (hung up early) | "
              "GETs per object (max) | "
              "manifest/lease/descriptor KiB read | MiB uploaded | first entry read after commit (s) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(host_row("alone", alone["hosts"][0]))
    lines += [host_row(str(h["host"]), h) for h in fleet["hosts"]]
    lines.append("")
    for check in summary["checks"]:
        lines.append(f"- {check['text']}: {'met' if check['met'] else 'MISSED'} — {check['detail']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bytes of weights (default 1G)")
    parser.add_argument("--hosts", type=int, default=16, help="hosts racing for the handle (default 16)")
    parser.add_argument("--format", choices=("gz", "zst", "tar"), default="gz", help="the archive (default gz)")
    parser.add_argument("--rate", type=float, default=32e6, help="origin: bytes/s per connection (default 32e6)")
    parser.add_argument("--latency", type=float, default=0.030, help="origin: seconds before each answer")
    parser.add_argument("--connections", type=int, default=0, help="HUBCACHE_CONNECTIONS (default: hubcache's)")
    parser.add_argument("--bucket-latency", type=float, default=0.0,
                        help="the bucket: seconds before each object read's answer (default 0: the emulator's own)")
    parser.add_argument("--bucket-rate", type=float, default=0.0,
                        help="the bucket: bytes/s of each object read's answer (default 0: unshaped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hubcache-bench"))
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument("--publish", action="store_true", help="also refresh the fleet section of docs/benchmarks.md")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    import gcs_emulator  # tests/gcs_emulator.py: starts fake-gcs-server, sets GCSFS_* and metadata env

    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    started_at = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    archives, model_bytes = build_archives(args.workdir, args.size, args.seed)
    archive = archives[args.format]
    emulator = gcs_emulator.emulator_url()
    bucket = gcs_emulator.bucket("hubcache-fleet")
    runs = os.path.join(args.workdir, "fleet-runs")
    shutil.rmtree(runs, ignore_errors=True)
    proxy = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_proxy.py"), emulator, str(args.hosts),
                              "--latency", str(args.bucket_latency), "--rate", str(args.bucket_rate)],
                             stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proxy.stdout.readline())["ports"]
        with FileServer({"/models/fleet" + SUFFIX[args.format]: archive}, rate=args.rate,
                        latency=args.latency) as origin:
            fleet = Fleet(args, archive, model_bytes, origin, ports, bucket)
            clock = time.monotonic()
            print(f"[{time.monotonic() - clock:5.0f} s] one host alone", flush=True)
            alone = fleet.run(1, os.path.join(runs, "alone"))
            shutil.rmtree(runs, ignore_errors=True)
            os.sync()
            print(f"[{time.monotonic() - clock:5.0f} s] {args.hosts} hosts at once", flush=True)
            many = fleet.run(args.hosts, os.path.join(runs, "fleet"))
            print(f"[{time.monotonic() - clock:5.0f} s] done", flush=True)
            shutil.rmtree(runs, ignore_errors=True)
    finally:
        proxy.kill()
        proxy.wait()
    load_after = os.getloadavg()
    summary = summarize(alone, many, os.path.getsize(archive), model_bytes)
    info = machine()
    title = (f"fleet: {args.hosts} hosts (home,gcs on one fake-gcs-server bucket), one cold handle — "
             f"{args.size / MIB:.0f} MiB of weights (.tar.{args.format} {os.path.getsize(archive) / MIB:.0f} MiB), "
             f"origin {args.rate / 1e6:g} MB/s per connection, {args.latency * 1000:g} ms; "
             f"{started_at:%Y-%m-%d}, {info['cores']} cores")
    lines = table_lines(alone, many, summary)
    print()
    print(title)
    print("\n".join(lines))
    result = {"date": started_at.isoformat(timespec="seconds"), "machine": info,
              "load_average": {"before": load_before, "after": load_after},
              "settings": {"weights_bytes": args.size, "model_bytes": model_bytes, "hosts": args.hosts,
                           "format": args.format, "archive_bytes": os.path.getsize(archive), "rate": args.rate,
                           "latency": args.latency, "connections": args.connections or "default",
                           "bucket_latency": args.bucket_latency, "bucket_rate": args.bucket_rate},
              "alone": alone, "fleet": many, **summary}
    with open(os.path.join(args.out, "results-fleet.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = "\n".join([
        f"**{title}**", "",
        f"Taken {result['date']} on {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['os']}, "
        f"Python {info['python']}; hubcache {info['versions']['hubcache']}. One run each; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. All hosts share this machine's cores, its "
        f"disk and one emulator, and every bucket request passes the counting proxy.", "", *lines, ""])
    with open(os.path.join(args.out, "results-fleet.md"), "w") as f:
        f.write(markdown)
    print(f"wrote {args.out}/results-fleet.json, results-fleet.md")
    if args.publish:
        publish(markdown, None, section="fleet")
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("fleet", sys.modules[__name__])
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        sys.exit(1)
