#!/usr/bin/env python3
"""Run the reliability scenarios (``tests/reliability``) and write ``docs/reliability.md``.

Every scenario test records what it ran and what it measured (see
``tests/reliability/conftest.py``); this script runs them all with pytest, collects the records
and renders one summary table (one row per test, parametrized cases folded together) and one
detail table per scenario (one row per case). Nothing in the document is typed by hand: rerun the
script to regenerate it.

Usage::

    python scripts/reliability_report.py                 # run everything, write docs/reliability.md
    python scripts/reliability_report.py -o /tmp/r.md -- -k crash   # extra args go to pytest

Exits with pytest's status, so a failing scenario fails the script (the document still shows it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_ENV = "HUBCACHE_RELIABILITY_FIGURES"
SKIP_IN_SUMMARY = {"run", "message", "where"}


def run_scenarios(pytest_args: list[str]) -> tuple[int, dict, float]:
    """Run pytest on the reliability package; (exit status, records by node id, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "figures.json")
        env = dict(os.environ, **{FIGURES_ENV: out})
        cmd = [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider", *pytest_args]
        began = time.monotonic()
        status = subprocess.call(cmd, cwd=ROOT, env=env)
        seconds = time.monotonic() - began
        if not os.path.exists(out):
            raise SystemExit(f"pytest wrote no figures (exit {status}); is tests/reliability/conftest.py intact?")
        with open(out, encoding="utf-8") as f:
            return status, json.load(f), seconds


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _aggregate(cases: list[dict]) -> str:
    """Figures of several cases: numbers as min–max, identical values once, the rest omitted."""
    keys: list[str] = []
    for case in cases:
        keys += [k for k in case["figures"] if k not in keys and k not in SKIP_IN_SUMMARY]
    parts = []
    for key in keys:
        values = [c["figures"][key] for c in cases if key in c["figures"]]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) and numbers:
            low, high = min(numbers), max(numbers)
            parts.append(f"{key}={_fmt(low)}" if low == high else f"{key}={_fmt(low)}–{_fmt(high)}")
        elif len({json.dumps(v, sort_keys=True, default=str) for v in values}) == 1:
            parts.append(f"{key}={_fmt(values[0])}")
        elif key in ("error", "state_after_kill"):
            counts = OrderedDict()
            for v in values:
                counts[str(v)] = counts.get(str(v), 0) + 1
            parts.append(f"{key}: " + ", ".join(f"{v} ×{n}" for v, n in counts.items()))
    return "; ".join(parts)


def _result(cases: list[dict]) -> str:
    outcomes = [c["outcome"] for c in cases]
    passed = outcomes.count("passed")
    if passed == len(outcomes):
        return f"**pass** ({passed}/{len(outcomes)})" if len(outcomes) > 1 else "**pass**"
    others = ", ".join(f"{o} {outcomes.count(o)}" for o in sorted(set(outcomes)) if o != "passed")
    return f"**{'FAIL' if 'failed' in outcomes else 'incomplete'}** ({passed}/{len(outcomes)} passed; {others})"


def group(records: dict) -> "OrderedDict[str, OrderedDict[str, list[dict]]]":
    """scenario -> test function -> cases (each with its node id and parameter)."""
    scenarios: OrderedDict = OrderedDict()

    def scenario_of(nodeid: str, record: dict) -> str:
        return record.get("scenario") or nodeid.split("::")[0]

    def order(item):
        scenario = scenario_of(*item)
        number = re.match(r"(\d+)\.", scenario)
        return (int(number.group(1)) if number else 99, scenario, item[1].get("order", 0), item[0])

    for nodeid, record in sorted(records.items(), key=order):
        scenario = scenario_of(nodeid, record)
        test = nodeid.split("::")[-1]
        name, _, param = test.partition("[")
        case = dict(record, nodeid=nodeid, param=param.rstrip("]"))
        scenarios.setdefault(scenario, OrderedDict()).setdefault(name, []).append(case)
    return scenarios


def render(records: dict, status: int, seconds: float, pytest_args: list[str]) -> str:
    scenarios = group(records)
    all_cases = [c for tests in scenarios.values() for cases in tests.values() for c in cases]
    passed = sum(c["outcome"] == "passed" for c in all_cases)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.system()} {platform.release()}, {platform.machine()}, {os.cpu_count()} CPUs, " \
              f"Python {platform.python_version()}"
    lines = [
        "# Reliability: what was tried, and what happened",
        "",
        "Generated by `python scripts/reliability_report.py` from the scenario tests in",
        "`tests/reliability/` — do not edit by hand; rerun the script to regenerate.",
        "Every scenario runs real processes, signals, servers and filesystems: a local HTTP origin on",
        "127.0.0.1, child processes killed with SIGKILL or stopped with SIGSTOP, a read-only bind mount,",
        "a size-limited tmpfs, a second real user's files, FIFOs and locks, GNU tar, and the GCS emulator.",
        "The same tests run in `.ci/run` (the slow ones are marked `slow`, which CI still runs).",
        "",
        f"- **When**: {now}; **machine**: {machine}",
        f"- **Result**: {passed} of {len(all_cases)} cases passed"
        + ("" if status == 0 else f" — **pytest exited {status}**")
        + f", in {seconds:.0f} s" + (f" (pytest args: `{' '.join(pytest_args)}`)" if pytest_args else ""),
        "",
        "## Summary",
        "",
        "| Scenario | Test | What was run | Result | Measured |",
        "|---|---|---|---|---|",
    ]
    for scenario, tests in scenarios.items():
        for name, cases in tests.items():
            if len(cases) == 1:
                run = cases[0]["figures"].get("run") or cases[0].get("doc", "")
            else:
                params = [c["param"] for c in cases]
                shown = ", ".join(params) if len(params) <= 12 else ", ".join(params[:6]) + ", …, " + params[-1]
                run = f"{cases[0].get('doc', '')} **{len(cases)} cases**: {shown}"
            lines.append(f"| {_cell(scenario)} | `{name}` | {_cell(run)} | {_result(cases)} | "
                         f"{_cell(_aggregate(cases))} |")
    lines += ["", "## Details", "",
              "One row per case; `run` says what that case did, the other columns what it measured.", ""]
    for scenario, tests in scenarios.items():
        lines += [f"### {scenario}", ""]
        intro = next((c.get("scenario_doc") for cases in tests.values() for c in cases if c.get("scenario_doc")), "")
        if intro:
            lines += [intro, ""]
        for name, cases in tests.items():
            doc = cases[0].get("doc", "")
            lines += [f"**`{name}`** — {doc}" if doc else f"**`{name}`**", ""]
            keys: list[str] = []
            for case in cases:
                keys += [k for k in case["figures"] if k not in keys and k != "run"]
            header = ["case", "what was run", "result", "s"] + keys
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            for case in cases:
                result = case["outcome"] + (f": {case['reason']}" if case.get("reason") and case["outcome"] != "passed" else "")
                row = [case["param"] or "-", case["figures"].get("run", ""), result, f"{case['duration']:.2f}"]
                row += [_fmt(case["figures"].get(k, "")) for k in keys]
                lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default=os.path.join(ROOT, "docs", "reliability.md"),
                        help="where to write the document (default: docs/reliability.md)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    status, records, seconds = run_scenarios(args.pytest_args)
    text = render(records, status, seconds, args.pytest_args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.output}: {sum(len(c) for t in group(records).values() for c in t.values())} cases, "
          f"pytest exit {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
