"""Events: what hubcache reports while it works.

The vocabulary only: :func:`hubcache.plugins.registry.emit` sends an :class:`Event` to every
``hubcache_event`` implementation and to the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Event kinds and the keys of their ``data``.
KINDS = {
    "download_started": "url, total (bytes or None)",
    "download_progress": "url, bytes (so far), total",
    "download_retry": "url, attempt, error, offset",
    "download_finished": "url, bytes",
    "waiting": "path, holder (who holds the lock, if known)",
    "extracted": "files, bytes",
    "committed": "path",
    "evicted": "path, bytes, reason",
    "copied": "path (in this tier), source (the tier it came from), bytes",
    "copy_skipped": "path (in this tier), reason (e.g. who holds its lock: the copy is left to them)",
    "adopted": "path",
    "repaired": "path, problems",
}

#: Events that are only noise in a log.
QUIET = {"download_progress"}


def _size(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "unknown size"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def log_line(event: Event) -> str:
    """One line for the log: what happened, to which handle, with the numbers that matter."""
    d, h = event.data, event.handle
    where = f" [{event.backend}]" if event.backend else ""
    if event.kind == "download_started":
        source = f" from {d.get('url')}" if d.get("url") not in (None, h) else ""
        return f"downloading {h}{source} ({_size(d.get('total'))}){where}"
    if event.kind == "download_finished":
        seconds = float(d.get("seconds") or 0.0)
        rate = f", {_size(d.get('bytes', 0) / seconds)}/s" if seconds > 0 else ""
        return f"downloaded {_size(d.get('bytes'))} of {h} in {seconds:.1f} s{rate}{where}"
    if event.kind == "download_retry":
        return (f"retrying the download of {h} (attempt {d.get('attempt')}, from byte {d.get('offset')}) "
                f"after: {d.get('error')}{where}")
    if event.kind == "waiting":
        return (f"waiting for {d.get('holder') or 'another process'} to finish downloading {h} "
                f"into {d.get('path')}{where}")
    if event.kind == "extracted":
        return f"unpacked {d.get('files')} files ({_size(d.get('bytes'))}) of {h}{where}"
    if event.kind == "committed":
        return f"cached {h} at {d.get('path')}{where}"
    if event.kind == "evicted":
        reason = f" ({d['reason']})" if d.get("reason") else ""
        return f"removed {h}: {_size(d.get('bytes'))} at {d.get('path')}{reason}{where}"
    if event.kind == "copied":
        return f"copied {h} ({_size(d.get('bytes'))}) from {d.get('source')} to {d.get('path')}{where}"
    if event.kind == "copy_skipped":
        return f"not copying {h} to {d.get('path')}: {d.get('reason')} (left to the holder){where}"
    if event.kind == "adopted":
        return f"adopted the tensorflow_hub entry of {h} at {d.get('path')}{where}"
    if event.kind == "repaired":
        return f"rebuilding the damaged entry of {h} at {d.get('path')}: {d.get('problems')}{where}"
    return f"{event.kind} {h} {d}{where}"


@dataclass(frozen=True)
class Event:
    """One thing that happened during a resolve.

    Attributes:
        kind: one of :data:`KINDS`.
        handle: the handle being resolved.
        backend: the backend's name.
        data: details, as listed in :data:`KINDS`.
    """

    kind: str
    handle: str
    backend: str = ""
    data: dict[str, Any] = field(default_factory=dict)

