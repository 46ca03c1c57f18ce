#!/usr/bin/env python3
"""The performance harness: hubcache against tensorflow_hub and against the limit of this machine.

One run builds a model-like archive (a SavedModel-shaped directory whose bulk is float32
random-normal weights, which barely compress, as real weights do) as ``.tar``, ``.tar.gz`` and
``.tar.zst``, serves it from a loopback HTTP server that streams files with ``sendfile``, and
measures, each several times (medians reported):

- cold resolve of each format, in a fresh process, timed around ``resolve()`` alone;
- warm resolve, per call, in-process;
- a whole fresh process doing ``import hubcache; hubcache.resolve(h)`` on a warm cache;
- peak RSS of the process during a cold resolve;
- N processes (16) cold-resolving one handle at once: wall time and origin downloads (GETs
  without a Range: a parallel download is one, its ranged GETs are not counted);

for hubcache, for tensorflow_hub (``tensorflow_hub.resolve`` with ``TFHUB_CACHE_DIR`` per run)
and for the limit: GNU ``tar -xf`` of the plain ``.tar`` from the page cache, ``curl | tar -xz``,
``curl | zstd -d | tar -x``, a bare interpreter, one ``os.stat``.

It prints one table (absolute medians, ratios hubcache/tensorflow_hub and hubcache/limit, each
target of issue 8 with its verdict) and writes ``results.json``, ``results.md`` and
``results.png`` into ``--out`` (default ``benchmarks/out/``); ``--publish`` also refreshes
``docs/benchmarks.md`` and ``docs/benchmarks.png``.

Run it from the repository root::

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/run.py            # 1 GiB of weights, about 6 minutes (+2 the first time)
    .venv/bin/python benchmarks/run.py --quick    # 64 MiB, fewer repeats, 4 processes

Generated archives are kept in ``--workdir`` (default ``$TMPDIR/hubcache-bench``) and reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from server import FileServer  # noqa: E402

CHILD = os.path.join(HERE, "child.py")
LIBS = ("hubcache", "tensorflow_hub", "limit")
SUFFIX = {"tar": ".tar", "gz": ".tar.gz", "zst": ".tar.zst"}
MIB = 1 << 20


class BenchError(Exception):
    """A measurement could not be taken (a tool failed or produced the wrong files)."""


# -- the model --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64M, 1G)")
    return int(float(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()])


def build_model(path: str, weights: int, seed: int) -> None:
    """A SavedModel-shaped directory: graph, fingerprint, variables index and shards, vocab."""
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(path, "variables"))
    os.makedirs(os.path.join(path, "assets"))
    for name, size in (("saved_model.pb", 512 << 10), ("fingerprint.pb", 64), ("keras_metadata.pb", 16 << 10),
                       (os.path.join("variables", "variables.index"), 8 << 10)):
        with open(os.path.join(path, name), "wb") as f:
            f.write(rng.bytes(size))
    with open(os.path.join(path, "assets", "vocab.txt"), "w") as f:
        f.write("\n".join(f"token{i}" for i in range(30000)))
    shards = max(1, weights // (256 * MIB))
    per_shard = weights // shards // 4 * 4
    for i in range(shards):
        with open(os.path.join(path, "variables", f"variables.data-{i:05d}-of-{shards:05d}"), "wb") as f:
            left = per_shard
            while left:
                n = min(left, 64 * MIB)
                f.write(rng.standard_normal(n // 4, dtype=np.float32).tobytes())
                left -= n


def _compress(src: str, dst: str, fmt: str) -> None:
    part = dst + ".part"
    with open(src, "rb") as fin, open(part, "wb") as fout:
        if fmt == "gz":  # level 6: what `tar czf` (and tfhub.dev's archives) use
            enc = zlib.compressobj(6, zlib.DEFLATED, 31)
            while chunk := fin.read(4 * MIB):
                fout.write(enc.compress(chunk))
            fout.write(enc.flush())
        else:
            import zstandard

            zstandard.ZstdCompressor(level=3, write_checksum=True).copy_stream(fin, fout, read_size=4 * MIB)
    os.replace(part, dst)


def build_archives(workdir: str, weights: int, seed: int) -> tuple[dict[str, str], int]:
    """Build (or reuse) the archives; returns ``({format: path}, bytes of files in the model)``."""
    base = os.path.join(workdir, f"model-{weights}-{seed}")
    done = os.path.join(base, "done.json")
    paths = {fmt: os.path.join(base, "model" + suffix) for fmt, suffix in SUFFIX.items()}
    if os.path.exists(done):
        with open(done) as f:
            return paths, json.load(f)["model_bytes"]
    shutil.rmtree(base, ignore_errors=True)
    model = os.path.join(base, "model")
    print(f"building a {weights / MIB:.0f} MiB model and its archives in {base} (once) ...", flush=True)
    build_model(model, weights, seed)
    with tarfile.open(paths["tar"], "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(model)):  # members relative to the model, as tfhub's are
            tar.add(os.path.join(model, name), arcname=name)
    threads = [threading.Thread(target=_compress, args=(paths["tar"], paths[fmt], fmt)) for fmt in ("gz", "zst")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model_bytes = tree_bytes(model)
    shutil.rmtree(model)
    with open(done, "w") as f:
        json.dump({"model_bytes": model_bytes, **{fmt: os.path.getsize(p) for fmt, p in paths.items()}}, f)
    return paths, model_bytes


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


# -- running things ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, archives: dict[str, str], model_bytes: int, server: FileServer):
        self.args = args
        self.archives = archives
        self.model_bytes = model_bytes
        self.server = server
        self.runs = os.path.join(args.workdir, "runs")
        shutil.rmtree(self.runs, ignore_errors=True)  # what an interrupted run left (gigabytes)
        os.makedirs(self.runs)
        self.python = args.python
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TFHUB_", "HUBCACHE_"))}
        self.env.update(TF_CPP_MIN_LOG_LEVEL="3", HUBCACHE_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.extra: dict[str, object] = {}

    def url(self, fmt: str) -> str:
        return self.server.url("/models/bench" + SUFFIX[fmt])

    def record(self, measure: str, lib: str, value: float) -> None:
        self.samples.setdefault(measure, {}).setdefault(lib, []).append(value)

    def fresh_dir(self) -> str:
        path = os.path.join(self.runs, uuid.uuid4().hex[:12])
        os.makedirs(path)
        return path

    def forget(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()  # so the next run does not pay for this one's writeback

    def check_tree(self, what: str, path: str) -> None:
        got = tree_bytes(path)
        if got != self.model_bytes:
            raise BenchError(f"{what} produced {got} bytes of files in {path}, expected {self.model_bytes}")

    def child(self, args: list[str], cache: str, stdin: bool = False,
              env_extra: dict[str, str] | None = None) -> subprocess.Popen:
        env = dict(self.env, TFHUB_CACHE_DIR=cache, **(env_extra or {}))
        return subprocess.Popen([self.python, CHILD, *args], env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)

    @staticmethod
    def result(proc: subprocess.Popen, what: str) -> dict:
        out, err = proc.communicate()
        if proc.returncode != 0 or not out.strip():
            raise BenchError(f"{what} failed (exit {proc.returncode}): {err.strip()[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    # -- cold --------------------------------------------------------------------------------------

    def cold(self, lib: str, fmt: str) -> None:
        cache = self.fresh_dir()
        try:
            res = self.result(self.child(["cold", lib, self.url(fmt)], cache), f"{lib} cold resolve of .{fmt}")
            self.check_tree(f"{lib} cold resolve of .{fmt}", res["path"])
        finally:
            self.forget(cache)
        self.record(f"cold_{fmt}", lib, res["seconds"])
        self.record(f"cpu_{fmt}", lib, res["cpu"])
        self.record(f"peak_rss_{fmt}", lib, res["peak_rss"])
        self.record(f"rss_before_{fmt}", lib, res["rss_before"])

    def pipeline(self, name: str, command: str, measure: str) -> None:
        dest = self.fresh_dir()
        try:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=dest, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise BenchError(f"`{command}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            self.check_tree(name, dest)
        finally:
            self.forget(dest)
        self.record(measure, "limit", seconds)
        if measure == "cold_gz":  # every process of the pipeline, as for the resolves
            self.record("cpu_gz", "limit", after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        self.extra.setdefault("limit_commands", {})[measure] = command

    # -- warm --------------------------------------------------------------------------------------

    def warm_calls(self, lib: str) -> tuple[str, str]:
        """Warm resolves in one process (its first resolve fills a new cache, which is kept for
        the fresh-process runs); returns ``(cache dir, entry path)``."""
        cache = self.fresh_dir()
        res = self.result(self.child(["warm", lib, self.url("gz"), str(self.args.calls), str(self.args.repeat)],
                                     cache), f"{lib} warm resolve")
        self.check_tree(f"{lib} warm resolve", res["path"])
        for value in res["per_call"]:
            self.record("warm_call", lib, value)
        return cache, res["path"]

    def warm_stat_limit(self, entry: str) -> None:
        probe = os.path.join(entry, "saved_model.pb")
        for _ in range(self.args.repeat):
            started = time.perf_counter()
            for _ in range(self.args.calls):
                os.stat(probe)
            self.record("warm_call", "limit", (time.perf_counter() - started) / self.args.calls)

    def fresh_process(self, lib: str, cache: str, code: str) -> None:
        env = dict(self.env, TFHUB_CACHE_DIR=cache)
        started = time.perf_counter()
        proc = subprocess.run([self.python, "-c", code], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise BenchError(f"fresh {lib} process failed: {proc.stderr.strip()[-2000:]}")
        self.record("fresh_process", lib, seconds)

    # -- many processes ------------------------------------------------------------------------------

    def concurrent(self, lib: str, fmt: str, procs: int) -> None:
        cache = self.fresh_dir()
        try:
            children = [self.child(["cold", lib, self.url(fmt), "--wait"], cache, stdin=True) for _ in range(procs)]
            for child in children:  # all imported and waiting: the race starts at one instant
                if child.stdout.readline().strip() != "ready":
                    raise BenchError(f"{lib} child failed to start: {self.result(child, 'child')}")
            self.server.reset_counts()
            started = time.monotonic()
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            results = [self.result(child, f"{lib} concurrent resolve") for child in children]
            wall = max(r["ended"] for r in results) - started
            if len({r["path"] for r in results}) != 1:
                raise BenchError(f"{lib}: concurrent resolves returned different paths")
            self.check_tree(f"{lib} concurrent resolve", results[0]["path"])
            # Downloads, not GETs: one parallel download sends a ranged GET per chunk.
            requests = self.server.downloads("/models/bench" + SUFFIX[fmt])
        finally:
            self.forget(cache)
        self.record("concurrent_wall", lib, wall)
        # How long the waiters took to notice the committed entry, after the downloader finished.
        self.record("concurrent_spread", lib, max(r["ended"] for r in results) - min(r["ended"] for r in results))
        self.record("concurrent_first", lib, min(r["ended"] for r in results) - started)
        self.record("concurrent_requests", lib, requests)


# -- the table --------------------------------------------------------------------------------------


ROWS = (
    # key, label, unit, scale, limit label
    ("cold_gz", "cold resolve .tar.gz", "s", 1.0, "curl | tar -xz"),
    ("cold_zst", "cold resolve .tar.zst", "s", 1.0, "curl | zstd -d | tar -x"),
    ("cold_tar", "cold resolve .tar", "s", 1.0, "curl | tar -x"),
    ("tar_xf", "plain .tar from the page cache", "s", 1.0, "tar -xf"),
    ("cpu_gz", "CPU time of a cold .tar.gz resolve", "s", 1.0, "curl | tar -xz"),
    ("warm_call", "warm resolve, per call in-process", "µs", 1e6, "one os.stat"),
    ("fresh_process", "fresh process: import + warm resolve", "ms", 1e3, "python -c 'import os; os.stat(p)'"),
    ("peak_rss", "peak RSS during a cold resolve", "MiB", 1 / MIB, "—"),
    ("concurrent_wall", "{procs} processes, one cold .tar.gz: wall", "s", 1.0, "—"),
    ("concurrent_requests", "{procs} processes: origin downloads", "", 1.0, "—"),
)


def summarize(bench: Bench) -> dict:
    samples = bench.samples
    med = {key: {lib: statistics.median(vals) for lib, vals in libs.items()} for key, libs in samples.items()}
    # Peak RSS: the worse of the gz and zst cold resolves (tensorflow_hub reads no zstd).
    med["peak_rss"] = {lib: max(med.get(f"peak_rss_{fmt}", {}).get(lib, 0) for fmt in ("gz", "zst"))
                       for lib in ("hubcache", "tensorflow_hub") if lib in med.get("peak_rss_gz", {})}
    samples["peak_rss"] = {lib: samples["peak_rss_gz"][lib] + samples.get("peak_rss_zst", {}).get(lib, [])
                           for lib in med["peak_rss"]}
    rows = []
    for key, label, unit, scale, limit_label in ROWS:
        values = {lib: (med.get(key, {}).get(lib)) for lib in LIBS}
        hub, tfh, lim = values["hubcache"], values["tensorflow_hub"], values["limit"]
        rows.append({
            "key": key, "label": label.format(procs=bench.args.procs), "unit": unit, "limit_label": limit_label,
            "median": {lib: (v * scale if v is not None else None) for lib, v in values.items()},
            "samples": {lib: [v * scale for v in vals] for lib, vals in samples.get(key, {}).items()},
            "hub_over_tfhub": hub / tfh if hub is not None and tfh else None,
            "hub_over_limit": hub / lim if hub is not None and lim else None,
        })
    by_key = {r["key"]: r for r in rows}

    def m(key: str, lib: str) -> float | None:
        return by_key[key]["median"][lib]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    targets = [
        ("cold_gz", "≤ 0.4 × tensorflow_hub", ratio(m("cold_gz", "hubcache"), m("cold_gz", "tensorflow_hub")), 0.4, "×"),
        ("cold_zst", "≤ 1.5 × tar -xf of the .tar", ratio(m("cold_zst", "hubcache"), m("tar_xf", "limit")), 1.5, "×"),
        ("warm_call", "≤ 10 µs", m("warm_call", "hubcache"), 10.0, "µs"),
        ("fresh_process", "≤ 0.1 × tensorflow_hub", ratio(m("fresh_process", "hubcache"),
                                                          m("fresh_process", "tensorflow_hub")), 0.1, "×"),
        ("peak_rss", "≤ 150 MiB", m("peak_rss", "hubcache"), 150.0, "MiB"),
        ("concurrent_wall", "≤ 1.3 × one cold resolve", ratio(m("concurrent_wall", "hubcache"),
                                                              m("cold_gz", "hubcache")), 1.3, "×"),
        ("concurrent_requests", "= 1", m("concurrent_requests", "hubcache"), 1.0, ""),
    ]
    for key, text, value, bound, unit in targets:
        by_key[key]["target"] = {"text": text, "value": value, "bound": bound, "unit": unit,
                                 "met": None if value is None else value <= bound}
    return {"rows": rows, "medians": med}


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "":
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _target_text(row: dict) -> str:
    t = row.get("target")
    if not t:
        return ""
    if t["value"] is None:
        return f"{t['text']}: not measured"
    unit = t["unit"]
    shown = f"{t['value']:.3g}{unit}" if unit == "×" else f"{_fmt(t['value'], unit)} {unit}".strip()
    return f"{t['text']}: {shown} {'met' if t['met'] else 'MISSED'}"


def table_lines(summary: dict, markdown: bool) -> list[str]:
    head = ["measure", "hubcache", "tensorflow_hub", "limit", "limit is", "hub/tfhub", "hub/limit", "target (issue 8)"]
    body = []
    for r in summary["rows"]:
        unit = f" ({r['unit']})" if r["unit"] else ""
        med = r["median"]
        body.append([r["label"] + unit, _fmt(med["hubcache"], r["unit"]), _fmt(med["tensorflow_hub"], r["unit"]),
                     _fmt(med["limit"], r["unit"]), r["limit_label"] if med["limit"] is not None else "—",
                     f"{r['hub_over_tfhub']:.2f}" if r["hub_over_tfhub"] is not None else "—",
                     f"{r['hub_over_limit']:.2f}" if r["hub_over_limit"] is not None else "—", _target_text(r)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for row in body:
            cells = [c.replace("|", "\\|") for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        return lines
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 4, 7) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in body]


def draw(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    cols = 3
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(13, 10))
    colors = {"hubcache": "#2b7bba", "tensorflow_hub": "#f28e2b", "limit": "#8c8c8c"}
    for ax, row in zip(axes.flat, rows):
        libs = [lib for lib in LIBS if row["median"][lib] is not None]
        values = [row["median"][lib] for lib in libs]
        names = [lib if lib != "limit" else row["limit_label"] for lib in libs]
        bars = ax.bar(range(len(libs)), values, color=[colors[lib] for lib in libs])
        ax.set_xticks(range(len(libs)), [n if len(n) < 22 else n[:20] + "…" for n in names], fontsize=7)
        ax.set_title(f"{row['label']}" + (f" ({row['unit']})" if row["unit"] else ""), fontsize=9)
        ax.bar_label(bars, [_fmt(v, row["unit"]) for v in values], fontsize=7)
        if max(values, default=0) / max(min(values, default=1), 1e-12) > 50:
            ax.set_yscale("log")
        target = row.get("target")
        if target and target["value"] is not None:
            ax.set_xlabel(_target_text(row), fontsize=7, color="#2a7f2a" if target["met"] else "#c0392b")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the machine --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    mem = 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("hubcache", "tensorflow-hub", "tensorflow", "zstandard", "isal"):
        try:
            versions[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / (1 << 30), 1),
            "os": platform.platform(), "python": platform.python_version(), "versions": versions}


def tools() -> dict[str, str | None]:
    """Each external tool, or the reason it is missing (printed, and its rows left empty)."""
    found: dict[str, str | None] = {}
    for name, package in (("curl", "curl"), ("zstd", "zstd"), ("tar", "tar")):
        found[name] = None if shutil.which(name) else f"{name} is not installed (apt-get install {package})"
    if found["tar"] is None:
        version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
        if "GNU tar" not in version:
            found["tar"] = "tar is not GNU tar (apt-get install tar)"
    return found


_COMPILE = """
import compileall, importlib.metadata as md, importlib.util, os
names = {"hubcache"} | {ep.value.split(":")[0].split(".")[0] for ep in md.entry_points(group="hubcache")}
for name in sorted(names):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        continue
    if spec.submodule_search_locations:
        compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)
    else:
        compileall.compile_file(spec.origin, quiet=1)
"""


def compile_plugins(python: str) -> None:
    """Byte-compile hubcache and its installed plugins, as ``pip install`` does for site-packages
    (where tensorflow_hub's modules are compiled). An editable checkout used with
    ``PYTHONDONTWRITEBYTECODE`` would otherwise recompile hubcache in every measured process."""
    subprocess.run([python, "-c", _COMPILE], check=True, capture_output=True)


def _have_tfhub(python: str) -> str | None:
    proc = subprocess.run([python, "-c", "import tensorflow_hub"], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    return None if proc.returncode == 0 else "tensorflow_hub is not installed (pip install -e '.[bench]')"


# -- main -----------------------------------------------------------------------------------------------


def missing_tools(args: argparse.Namespace, extra: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """What is missing of the shell tools, tensorflow_hub (unless skipped) and ``extra`` (name ->
    reason or None), each reason printed once: the measures that need it are left out."""
    missing = tools()
    if "tensorflow_hub" not in args.skip:
        missing["tensorflow_hub"] = _have_tfhub(args.python)
    missing.update(extra or {})
    for reason in filter(None, missing.values()):
        print(f"NOTE: {reason}; the measures that need it are left out.", flush=True)
    return missing


def prepare(args: argparse.Namespace) -> tuple[tuple[float, float, float], datetime.datetime, float, dict[str, str], int]:
    """Start a run: the output folders, the load average and times at its start, the archives
    (built once and kept in ``--workdir``) read into the page cache, where every run reads them
    from. Returns ``(load_before, started_at, clock, archives, model_bytes)``."""
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    load_before = os.getloadavg()
    started_at = datetime.datetime.now().astimezone()
    clock = time.monotonic()
    archives, model_bytes = build_archives(args.workdir, args.size, args.seed)
    compile_plugins(args.python)
    for path in archives.values():
        with open(path, "rb") as f:
            while f.read(8 * MIB):
                pass
    return load_before, started_at, clock, archives, model_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="64 MiB of weights, 3 repeats (1 for tensorflow_hub), 4 processes: the smoke test")
    parser.add_argument("--size", type=parse_size, help="bytes of weights (default 1G; --quick: 64M)")
    parser.add_argument("--repeat", type=int, help="runs of each measure, medians reported (default 3)")
    parser.add_argument("--tfhub-repeat", type=int, help="runs of each tensorflow_hub measure (default --repeat; --quick: 1)")
    parser.add_argument("--procs", type=int, help="processes racing for one cold handle (default 16; --quick: 4)")
    parser.add_argument("--calls", type=int, default=20000, help="warm resolves per timed batch (default 20000)")
    parser.add_argument("--skip", action="append", default=[], choices=["tensorflow_hub", "limit"],
                        help="leave out a column (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "hubcache-bench"),
                        help="where archives are built (and kept) and runs unpack")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="results.json/.md/.png go here")
    parser.add_argument("--publish", action="store_true", help="also refresh docs/benchmarks.md and its PNG")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the measured processes")
    parser.add_argument("--profile", choices=("loopback", "network"), default="loopback",
                        help="loopback: the origin as fast as the machine (the table above, default); network: "
                             "every connection capped at --rate, every answer --latency late, hubcache against "
                             "tensorflow_hub, curl, aria2 and hf_transfer at --connections")
    parser.add_argument("--rate", type=float, default=32e6,
                        help="network profile: bytes per second per connection (default 32e6)")
    parser.add_argument("--latency", type=float, default=0.030,
                        help="network profile: seconds before each answer (default 0.030)")
    parser.add_argument("--connections", default="1,8,16",
                        help="network profile: connection counts to measure (default 1,8,16)")
    args = parser.parse_args(argv)
    if args.profile == "network":
        import network

        return network.main(args)
    args.size = args.size or (64 * MIB if args.quick else 1 << 30)
    args.repeat = args.repeat or 3
    args.tfhub_repeat = args.tfhub_repeat or (1 if args.quick else args.repeat)
    args.procs = args.procs or (4 if args.quick else 16)

    missing = missing_tools(args)
    use_tfhub = "tensorflow_hub" not in args.skip and missing["tensorflow_hub"] is None
    use_limit = "limit" not in args.skip
    load_before, started_at, clock, archives, model_bytes = prepare(args)
    files = {"/models/bench" + SUFFIX[fmt]: path for fmt, path in archives.items()}
    with FileServer(files) as server:
        bench = Bench(args, archives, model_bytes, server)
        url = {fmt: bench.url(fmt) for fmt in SUFFIX}
        curl = "curl -sSf --noproxy '*'"
        pipelines = {
            "cold_gz": (("curl", "tar"), f"{curl} {url['gz']} | tar -xzf -"),
            "cold_zst": (("curl", "zstd", "tar"), f"{curl} {url['zst']} | zstd -dcq | tar -xf -"),
            "cold_tar": (("curl", "tar"), f"{curl} {url['tar']} | tar -xf -"),
            "tar_xf": (("tar",), f"tar -xf {archives['tar']}"),
        }

        def step(text: str) -> None:
            print(f"[{time.monotonic() - clock:6.0f} s] {text}", flush=True)

        for i in range(args.repeat):  # interleaved, so drifting load hits every column alike
            step(f"cold resolves, round {i + 1}/{args.repeat}")
            for fmt in ("gz", "zst", "tar"):
                bench.cold("hubcache", fmt)
                if use_tfhub and fmt != "zst" and i < args.tfhub_repeat:  # tensorflow_hub reads no zstd
                    bench.cold("tensorflow_hub", fmt)
            if use_limit:
                for measure, (needs, command) in pipelines.items():
                    if not any(missing[t] for t in needs):
                        bench.pipeline(measure, command, measure)

        step("warm resolves")
        warm = {"hubcache": bench.warm_calls("hubcache")}
        if use_tfhub:
            warm["tensorflow_hub"] = bench.warm_calls("tensorflow_hub")
        if use_limit:
            bench.warm_stat_limit(warm["hubcache"][1])

        step("fresh processes on a warm cache")
        code = {"hubcache": f"import hubcache; hubcache.resolve({url['gz']!r})",
                "tensorflow_hub": f"import tensorflow_hub; tensorflow_hub.resolve({url['gz']!r})"}
        for i in range(args.repeat):
            bench.fresh_process("hubcache", warm["hubcache"][0], code["hubcache"])
            if use_tfhub and i < args.tfhub_repeat:
                bench.fresh_process("tensorflow_hub", warm["tensorflow_hub"][0], code["tensorflow_hub"])
            if use_limit:
                probe = os.path.join(warm["hubcache"][1], "saved_model.pb")
                bench.fresh_process("limit", warm["hubcache"][0], f"import os; os.stat({probe!r})")
        for cache, _ in warm.values():
            bench.forget(cache)

        for i in range(args.repeat):
            step(f"{args.procs} processes racing for one cold handle, round {i + 1}/{args.repeat}")
            bench.concurrent("hubcache", "gz", args.procs)
            if use_tfhub and i < args.tfhub_repeat:
                bench.concurrent("tensorflow_hub", "gz", args.procs)
    step("done")

    summary = summarize(bench)
    load_after = os.getloadavg()
    info = machine()
    sizes = {fmt: os.path.getsize(p) for fmt, p in archives.items()}
    title = (f"hubcache vs tensorflow_hub vs the limit — {args.size / MIB:.0f} MiB of float32 weights "
             f"(.tar.gz {sizes['gz'] / MIB:.0f} MiB, .tar.zst {sizes['zst'] / MIB:.0f} MiB), "
             f"{started_at:%Y-%m-%d}, {info['cores']} cores")
    result = {
        "date": started_at.isoformat(timespec="seconds"), "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "settings": {"weights_bytes": args.size, "model_bytes": model_bytes, "archive_bytes": sizes,
                     "repeat": args.repeat, "tfhub_repeat": args.tfhub_repeat, "procs": args.procs,
                     "calls": args.calls, "quick": args.quick},
        "missing": {k: v for k, v in missing.items() if v},
        "limit_commands": bench.extra.get("limit_commands", {}),
        "rows": summary["rows"],
        # Every measure's medians, including those the table leaves out (CPU seconds of each
        # format's cold resolve, RSS before the resolve started).
        "medians": summary["medians"],
    }
    text = table_lines(summary, markdown=False)
    print()
    print(title)
    print("\n".join(text))
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = markdown_section(result, summary, title)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown)
    draw(summary, os.path.join(args.out, "results.png"), title)
    print(f"wrote {args.out}/results.json, results.md, results.png")
    if args.publish:
        publish(markdown, os.path.join(args.out, "results.png"))
    return 0


def markdown_section(result: dict, summary: dict, title: str) -> str:
    info, s = result["machine"], result["settings"]
    lines = [f"**{title}**", "",
             f"Taken {result['date']} on {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
             f"{info['os']}, Python {info['python']}; hubcache {info['versions']['hubcache']}, "
             f"tensorflow_hub {info['versions']['tensorflow_hub'] or '(not installed)'}. Medians of "
             f"{s['repeat']} runs ({s['tfhub_repeat']} for tensorflow_hub); load average (1 min) "
             f"{result['load_average']['before'][0]:.2f} before, {result['load_average']['after'][0]:.2f} after.",
             "", *table_lines(summary, markdown=True), ""]
    if result["missing"]:
        lines += ["Left out: " + "; ".join(result["missing"].values()) + ".", ""]
    return "\n".join(lines)


def publish(markdown: str, png: str | None, section: str = "results", png_name: str = "benchmarks.png") -> None:
    """Replace the generated section ``section`` of docs/benchmarks.md (the prose around it is
    kept; a section not there yet is appended) and copy its chart, if any, to ``docs/<png_name>``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    doc = os.path.join(ROOT, "docs", "benchmarks.md")
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    chart = ""
    if png is not None:
        shutil.copyfile(png, os.path.join(ROOT, "docs", png_name))
        chart = f"![benchmark chart]({png_name})\n"
    block = f"{start}\n{markdown}\n{chart}{end}"
    text = open(doc, encoding="utf-8").read() if os.path.exists(doc) else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    with open(doc, "w", encoding="utf-8") as f:
        f.write(head + block + tail)
    print(f"published {doc}")


if __name__ == "__main__":
    # network.py imports this module as `run`: one module, so one BenchError class, not two.
    sys.modules.setdefault("run", sys.modules[__name__])
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        sys.exit(1)
