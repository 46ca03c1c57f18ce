"""Events: what hubcache reports while it works (the ``hubcache_event`` hook carries them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("hubcache")

#: Event kinds and the keys of their ``data``.
KINDS = {
    "download_started": "url, total (bytes or None)",
    "download_progress": "url, bytes (so far), total",
    "download_retry": "url, attempt, error, offset",
    "download_finished": "url, bytes",
    "waiting": "path, holder (who holds the lock, if known)",
    "extracted": "files, bytes",
    "committed": "path",
    "evicted": "path, bytes",
    "adopted": "path",
    "repaired": "path, problems",
}

# Events that are only noise in a log.
_QUIET = {"download_progress"}


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


def emit(kind: str, handle: str, backend: str = "", **data: Any) -> None:
    """Send an event to every ``hubcache_event`` implementation and to the log."""
    from .plugins import get_registry

    event = Event(kind, handle, backend, data)
    if kind not in _QUIET:
        logger.info("%s %s %s", kind, handle, data)
    hook = get_registry().hook.hubcache_event
    for impl in hook.get_hookimpls():
        try:
            impl.function(event=event)
        except Exception:  # an observer must never break a resolve
            logger.exception("hubcache_event of plugin %r failed", impl.plugin_name)
