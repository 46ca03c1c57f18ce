"""Reliability scenarios of issue 6: each test proves one claim with real processes, signals,
servers and filesystems, and records what it measured (``scripts/reliability_report.py`` turns
the records into ``docs/reliability.md``)."""
