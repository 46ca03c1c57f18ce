"""Cache management behind ``hubcache ls``, ``info`` and ``rm``: which caches, what is in them.

Commands work on the *selected* backend (``HUBCACHE_BACKEND`` and the tensorflow_hub settings,
as ``hubcache config`` shows) unless ``--backend`` names others. A comma-separated chain of tiers
(``home,gcs``) stands for each of its tiers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..core.backend import CacheBackend
from ..core.config import Config
from ..core.entry import USABLE_STATES, is_key
from ..core.errors import ConfigError, HubcacheError
from ..core.handles import parse_handle
from ..core.resolver import make_backend
from ..core.store import EntryInfo
from .prune import Action, remove_entry
from .prune import timestamp as _when


def backend_names(config: Config, names: Iterable[str] | None = None) -> list[str]:
    """The backend names a command works on: ``names`` (comma-separated allowed), else the
    selected backend's tiers."""
    from ..core.resolver import select_backend_name

    if not names:
        names = [select_backend_name(config)[0]]
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def cache_backends(config: Config, names: Iterable[str] | None = None) -> list[CacheBackend]:
    """The cache backends a management command works on.

    Raises:
        ConfigError: if a named backend is not installed or keeps no cache (``remote``).
    """
    backends = []
    for name in backend_names(config, names):
        backend = make_backend(name, config)
        if not isinstance(backend, CacheBackend):
            raise ConfigError(f"backend {name!r} keeps no cache, so it has nothing to list or remove",
                              hint="name a cache backend with --backend, e.g. --backend home")
        backends.append(backend)
    return backends


@dataclass
class Listed:
    """One entry of one backend, as ``hubcache ls`` shows it.

    Attributes:
        backend: the backend's name.
        root: the cache root.
        entry: the entry.
        busy: why it could not be removed now (in use, being downloaded), if so.
    """

    backend: str
    root: str
    entry: EntryInfo
    busy: str | None = None

    def to_json(self) -> dict[str, object]:
        e = self.entry
        return {
            "backend": self.backend, "handle": e.handle, "key": e.key, "path": e.path, "state": e.state,
            "bytes": e.size, "files": len(e.manifest.files) if e.manifest else None,
            "last_used": _iso(e.last_used), "last_used_unix": _when(e.last_used),
            "in_use": self.busy is not None, "busy": self.busy,
        }


def list_entries(backends: Sequence[CacheBackend]) -> list[Listed]:
    """Every entry of every backend, most recently used first within each backend."""
    out: list[Listed] = []
    for backend in backends:
        store = backend.store
        entries = sorted(store.entries(), key=lambda e: -(e.last_used or 0.0))
        out.extend(Listed(backend.name, store.root, e, store.busy(e.key)) for e in entries)
    return out


def key_of(text: str) -> str:
    """The cache key of a handle, or the text itself if it already is a key (40 hex digits)."""
    if is_key(text):
        return text
    return parse_handle(text).key


def remove(targets: Sequence[str], backends: Sequence[CacheBackend]) -> list[dict[str, object]]:
    """Remove the entries of handles (or keys) from every given backend.

    Entries in use or being downloaded are left alone (outcome ``kept``, with the reason).

    Returns:
        One record per (target, backend): handle, backend, key, outcome (``removed``, ``kept``,
        ``not cached``), reason, bytes.
    """
    results = []
    for target in targets:
        key = key_of(target)
        for backend in backends:
            entry = backend.store.entry(key)
            record: dict[str, object] = {"handle": target, "backend": backend.name, "key": key,
                                         "outcome": "not cached", "reason": None, "bytes": 0}
            if entry is not None:
                action: Action = remove_entry(backend.store, entry, reason="removed by hubcache rm",
                                              backend=backend.name)
                record.update(outcome="removed" if action.outcome in ("removed", "gone") else "kept",
                              reason=action.kept_because, bytes=entry.size, path=entry.path)
            results.append(record)
    return results


def handle_info(handle: str, config: Config) -> dict[str, object]:
    """Where ``handle`` would resolve and what the caches hold for it; downloads nothing.

    Raises:
        HubcacheError: for a malformed handle or settings that select no backend.
    """
    from ..core.resolver import locate_handle, select_backend_name

    parsed = parse_handle(handle)
    name, why = select_backend_name(config)
    info: dict[str, object] = {"handle": handle, "url": parsed.url, "key": parsed.key,
                               "pin": "=".join(parsed.pin) if parsed.pin else None,
                               "backend": name, "backend_reason": why, "offline": config.offline}
    try:
        location = locate_handle(parsed, config)
        info["location"] = {"url": location.url, "kind": location.kind}
    except HubcacheError as error:
        info["location"] = {"error": str(error)}
        location = None
    tiers = []
    for tier_name in backend_names(config, [name]):
        backend = make_backend(tier_name, config)
        tier: dict[str, object] = {"backend": tier_name}
        tiers.append(tier)
        if not isinstance(backend, CacheBackend):
            tier["note"] = "passthrough: nothing is cached, the model is read where it is"
            continue
        if location is not None and location.kind == "directory":
            tier["note"] = "a directory: resolves to itself, nothing is cached"
        store = backend.store
        tier["root"] = store.root
        tier["path"] = store.entry_path(parsed.key)
        entry = store.entry(parsed.key)
        tier["cached"] = entry is not None and entry.state in USABLE_STATES
        if entry is None:
            tier["state"] = "not cached"
            continue
        tier.update(state=entry.state, bytes=entry.size, last_used=_iso(entry.last_used),
                    last_used_unix=_when(entry.last_used), busy=store.busy(parsed.key))
        m = entry.manifest
        if m is not None:
            tier["manifest"] = {
                "source": m.source, "created": _iso(m.created), "creator": m.creator,
                "files": len(m.files), "dirs": len(m.dirs), "symlinks": len(m.symlinks),
                "bytes": m.total_bytes, "archive": _archive(m.archive),
            }
            if parsed.pin is not None:
                tier["pin_matches"] = m.archive.get(parsed.pin[0]) == parsed.pin[1]
    info["tiers"] = tiers
    return info


def _iso(when: float | None) -> str | None:
    when = _when(when)
    if when is None:
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    except (OverflowError, OSError, ValueError):  # beyond this platform's time_t
        return None


def _archive(archive: object) -> dict[str, object]:
    """The archive record of a manifest read from a cache, keeping only what it may hold: text
    digests and format, a byte count (a forged manifest may put anything there)."""
    if not isinstance(archive, dict):
        return {}
    out: dict[str, object] = {}
    for name, value in archive.items():
        if not isinstance(name, str):
            continue
        if name == "bytes":
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                out[name] = value
        elif isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[name] = value
    return out


def ago(when: float | None, now: float | None = None) -> str:
    """``5m ago``, ``3d ago``, or ``-`` for unknown."""
    from .prune import format_duration

    when = _when(when)
    if when is None:
        return "-"
    return format_duration((time.time() if now is None else now) - when) + " ago"
