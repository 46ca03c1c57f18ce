"""Removing entries: ``hubcache rm``, ``hubcache prune`` and the size budget (LRU eviction).

Every removal goes through :meth:`Store.guard`, which refuses entries another process is using
or downloading (see :mod:`hubcache.stores.usage`), and re-reads the entry under the guard so that
one used or rebuilt since it was listed is left alone. A dry run asks :meth:`Store.busy` instead,
which changes nothing on disk.

Order of a prune: debris first (damaged entries, leftovers of interrupted downloads), then entries
not used for ``older_than``, then least recently used entries until the total is at most
``max_size``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

from ..core.entry import USABLE_STATES
from ..core.store import EntryInfo, Store
from ..plugins.registry import emit

logger = logging.getLogger("hubcache")

#: States whose entries are worth keeping (the others are debris).
USABLE = USABLE_STATES


@dataclass
class Action:
    """What a prune did (or, in a dry run, would do) to one entry.

    Attributes:
        entry: the entry as listed.
        reason: why it was chosen (``damaged``, ``not used for 30d``, ``over the size budget``...).
        outcome: ``removed``, ``would remove``, ``kept`` (see ``kept_because``) or ``gone``
            (someone else removed it meanwhile).
        kept_because: why it was left alone (in use, being downloaded, used meanwhile).
    """

    entry: EntryInfo
    reason: str
    outcome: str = ""
    kept_because: str | None = None


@dataclass
class PruneReport:
    """The result of one prune of one store.

    Attributes:
        backend: the backend's name.
        root: the store's root.
        dry_run: whether anything was actually removed.
        total_before: bytes of every entry before.
        total_after: bytes after (or after the planned removals, in a dry run).
        max_size: the budget applied, if any.
        actions: one per entry chosen.
    """

    backend: str
    root: str
    dry_run: bool
    total_before: int = 0
    total_after: int = 0
    max_size: int | None = None
    actions: list[Action] = field(default_factory=list)

    @property
    def removed(self) -> list[Action]:
        """The entries removed (or that would be, in a dry run)."""
        return [a for a in self.actions if a.outcome in ("removed", "would remove")]

    @property
    def kept(self) -> list[Action]:
        """The entries chosen but left alone."""
        return [a for a in self.actions if a.outcome == "kept"]

    @property
    def freed(self) -> int:
        return sum(a.entry.size for a in self.removed)

    @property
    def over_budget(self) -> bool:
        return self.max_size is not None and self.total_after > self.max_size


def timestamp(value: object) -> float | None:
    """A time read from a cache (a manifest's ``created``, a file's mtime) if it is a usable
    Unix time, else ``None``: a forged manifest may say ``1e300`` or ``NaN``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if -(1 << 40) < value < (1 << 40) else None


def real_size(store: Store, entry: EntryInfo) -> int:
    """The bytes ``entry`` really occupies, not what its manifest says.

    A local entry is measured on disk (:func:`hubcache.stores.treewalk.disk_usage`, links not
    followed); an object store entry by listing its objects. Other stores: the listed size.
    Neither a claim too small (bytes hidden from the budget) nor too large (a forged ``1e18``
    that would evict every other entry) counts.
    """
    from ..stores.localstore import LocalStore
    from ..stores.objectstore import ObjectStore

    try:
        if isinstance(store, LocalStore):
            from ..stores import treewalk

            return treewalk.disk_usage(entry.path)
        if isinstance(store, ObjectStore):
            return sum(store.list_objects(store.object_path(entry.key)).values())
    except OSError as error:  # counted as listed; the budget is best effort
        logger.warning("could not measure %s: %s", entry.path, error)
    return max(entry.size, 0)


def _age(entry: EntryInfo) -> float:
    # Unknown or nonsense times count as oldest: a forged time must not make an entry immortal.
    when = timestamp(entry.last_used)
    return when if when is not None else 0.0


def remove_entry(store: Store, entry: EntryInfo, *, reason: str, backend: str = "",
                 dry_run: bool = False) -> Action:
    """Remove one entry unless it is in use, being downloaded, or changed since it was listed."""
    action = Action(entry, reason)
    if dry_run:
        action.kept_because = store.busy(entry.key)
        action.outcome = "kept" if action.kept_because else "would remove"
        return action
    with store.guard(entry.key) as busy:
        if busy is not None:
            action.outcome, action.kept_because = "kept", busy
            return action
        now = store.entry(entry.key)
        if now is None:
            action.outcome = "gone"
            return action
        if now.state != entry.state or _age(now) > _age(entry) + 1e-3:
            action.outcome, action.kept_because = "kept", f"{now.state} and used since it was listed"
            return action
        if now.state == "in progress":
            store.cleanup(entry.key)  # a crashed writer's temp dirs (we hold its download lock)
        store.remove(entry.key)
        action.outcome = "removed"
    emit("evicted", entry.handle or entry.key, backend, path=entry.path, bytes=entry.size, reason=reason)
    return action


def prune_store(store: Store, *, backend: str = "", max_size: int | None = None,
                older_than: float | None = None, debris: bool = True, keep: frozenset[str] = frozenset(),
                dry_run: bool = False, now: float | None = None) -> PruneReport:
    """Remove debris, stale entries and least recently used entries of one store.

    Args:
        store: the store.
        backend: its backend's name (for events and the report).
        max_size: evict least recently used entries until the total is at most this many bytes.
        older_than: remove usable entries not used for this many seconds.
        debris: remove damaged entries and leftovers of interrupted downloads.
        keep: keys never to remove (the entry a resolve just returned).
        dry_run: remove nothing; report what would be removed.
        now: the current Unix time (for ``older_than``).

    Returns:
        What was (or would be) removed and kept.
    """
    now = time.time() if now is None else now
    entries = list(store.entries())
    if max_size is not None:
        # The budget decides on what the entries really occupy: a manifest's sizes are a claim
        # (files it does not list are not in it), and a forged one must not hide bytes.
        entries = [replace(e, size=real_size(store, e)) for e in entries]
    report = PruneReport(backend, store.root, dry_run, max_size=max_size)
    total = report.total_before = sum(e.size for e in entries)
    chosen: set[str] = set()

    def act(entry: EntryInfo, reason: str) -> None:
        nonlocal total
        chosen.add(entry.key)
        action = remove_entry(store, entry, reason=reason, backend=backend, dry_run=dry_run)
        report.actions.append(action)
        if action.outcome != "kept":
            total -= entry.size

    if debris:
        for entry in entries:
            if entry.state not in USABLE and entry.key not in keep:
                act(entry, "damaged" if entry.state == "damaged" else "left over by an interrupted download")
    if older_than is not None:
        for entry in sorted(entries, key=_age):
            if entry.key not in chosen and entry.key not in keep and _age(entry) < now - older_than:
                act(entry, f"not used for {format_duration(now - _age(entry))}")
    if max_size is not None:
        # Debris goes first, then least recently used.
        for entry in sorted(entries, key=lambda e: (e.state in USABLE, _age(e))):
            if total <= max_size:
                break
            if entry.key not in chosen and entry.key not in keep:
                act(entry, "over the size budget")
    report.total_after = total
    return report


def enforce_budget(store: Store, max_size: int, *, keep: frozenset[str], backend: str = "") -> PruneReport | None:
    """Evict least recently used entries until ``store`` holds at most ``max_size`` bytes.

    Called by a backend after it committed a download. Never raises: a resolve that succeeded
    must not fail because cleaning up after it did; problems are logged.
    """
    try:
        report = prune_store(store, backend=backend, max_size=max_size, debris=False, keep=keep)
    except Exception as error:  # noqa: BLE001 - see the docstring
        logger.warning("could not enforce the size budget of %s: %s", store.root, error)
        return None
    if report.over_budget:
        logger.warning("the %s cache at %s holds %s, over its budget of %s: %d entries are in use "
                       "and the entry just resolved is never evicted", backend or "", store.root,
                       format_size(report.total_after), format_size(max_size), len(report.kept))
    return report


# -- units ----------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Parse ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or plain seconds) into seconds.

    Raises:
        ValueError: naming the accepted units.
    """
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a duration (write e.g. 30d, 12h, 90m, 45s or 2w)")
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]


def format_duration(seconds: float) -> str:
    """A short duration: ``45s``, ``12m``, ``3h``, ``30d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def format_size(n: float) -> str:
    """Bytes in binary units, as ``du -h`` and ``hf cache`` print them: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
