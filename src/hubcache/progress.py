"""The progress display: a tqdm bar per download on stderr, built on the ``hubcache_event`` hook.

Shown when stderr is a terminal; ``TFHUB_DOWNLOAD_PROGRESS=1`` (tensorflow_hub's switch) forces it,
``HUBCACHE_NO_PROGRESS=1`` silences it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator

from .core.events import Event
from .plugins.markers import hookimpl

_bars: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()
_muted = 0


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """No per-download bars while the block runs (``hubcache prefetch`` draws one display)."""
    global _muted
    with _lock:
        _muted += 1
    try:
        yield
    finally:
        with _lock:
            _muted -= 1


def enabled() -> bool:
    """Whether progress output is on, by the settings and whether stderr is a terminal."""
    if os.environ.get("HUBCACHE_NO_PROGRESS", "").strip() not in ("", "0"):
        return False
    if os.environ.get("TFHUB_DOWNLOAD_PROGRESS", "").strip() not in ("", "0"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _label(handle: str) -> str:
    name = handle.rstrip("/").split("?", 1)[0]
    parts = name.split("/")
    return "/".join(parts[-3:]) if len(parts) > 3 else name


@hookimpl
def hubcache_event(event: Event) -> None:
    key = (event.handle, threading.get_ident())
    if event.kind == "download_started":
        if _muted or not enabled():
            return
        from tqdm import tqdm

        with _lock:
            _bars[key] = tqdm(total=event.data.get("total"), unit="B", unit_scale=True, unit_divisor=1024,
                              desc=_label(event.handle), file=sys.stderr, leave=True, dynamic_ncols=True,
                              mininterval=0.2)
    elif event.kind == "download_progress":
        bar = _bars.get(key)
        if bar is not None:
            bar.update(event.data["bytes"] - bar.n)
    elif event.kind == "download_finished":
        with _lock:
            bar = _bars.pop(key, None)
        if bar is not None:
            bar.update(event.data["bytes"] - bar.n)
            bar.close()
    elif event.kind == "waiting" and not _muted and enabled():
        print(f"hubcache: waiting for {event.data.get('holder') or 'another process'} "
              f"to finish downloading {event.handle}", file=sys.stderr)
