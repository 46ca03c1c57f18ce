"""Fixtures of the reliability scenarios, and the recorder of their figures.

Every test module names its scenario (``SCENARIO = "2. Crash safety"``); every test may fill the
``figures`` dict with what it ran and measured (``figures["run"]`` says what was run). When
``HUBCACHE_RELIABILITY_FIGURES`` names a file, the outcome, duration and figures of every test
are written there as JSON at the end of the session; ``scripts/reliability_report.py`` builds
``docs/reliability.md`` from it.
"""

from __future__ import annotations

import json
import os

import pytest

FIGURES_ENV = "HUBCACHE_RELIABILITY_FIGURES"
_records: dict[str, dict] = {}


def _record(nodeid: str) -> dict:
    return _records.setdefault(nodeid, {"outcome": "not run", "duration": 0.0, "figures": {},
                                        "order": len(_records)})


@pytest.fixture
def figures(request) -> dict:
    """What this test ran and measured; keys become columns of the reliability table."""
    record = _record(request.node.nodeid)
    record["scenario"] = getattr(request.module, "SCENARIO", request.module.__name__)
    record["doc"] = " ".join((request.function.__doc__ or "").strip().split("\n\n")[0].split())
    # The module's first paragraph says what the scenario tries and why (the section's intro).
    record["scenario_doc"] = " ".join((request.module.__doc__ or "").strip().split("\n\n")[0].split())
    return record["figures"]


def pytest_runtest_logreport(report) -> None:
    if not report.nodeid.startswith(("tests/reliability/", "reliability/")) and "reliability" not in report.nodeid:
        return
    record = _record(report.nodeid)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        record["outcome"] = report.outcome
        record["duration"] = round(report.duration, 3)
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            record["reason"] = str(report.longrepr[2])
        elif report.outcome == "failed":
            record["reason"] = str(report.longreprtext).strip().splitlines()[-1][:300] if report.longreprtext else ""


def pytest_sessionfinish(session) -> None:
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_records, f, indent=1, default=str, sort_keys=True)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> str:
    """A fresh cache directory selected through ``TFHUB_CACHE_DIR`` (inherited by children)."""
    root = str(tmp_path / "cache")
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    return root
