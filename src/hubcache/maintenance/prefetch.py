"""Warm a cache: resolve many handles in parallel (``hubcache prefetch``).

Each handle goes through the ordinary resolver in a worker thread, so locks, extraction checks,
the size budget and offline mode behave exactly as for ``hubcache.resolve``. A prefetch does not
*use* what it fetches, so it releases each entry's in-use mark (see :mod:`hubcache.stores.usage`)
once it is committed: prefetching more than the size budget holds evicts the least recently used
entries, as any later download would.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TextIO

from ..core.events import Event
from ..plugins.markers import hookimpl


@dataclass
class Fetched:
    """The outcome of prefetching one handle.

    Attributes:
        handle: the handle as given.
        path: where it resolved, if it did.
        error: the error's one-line message, if it failed.
        kind: the error's class name, if it failed.
        downloaded: bytes downloaded for it by this prefetch (0: it was already cached).
        seconds: wall time of its resolve.
    """

    handle: str
    path: str | None = None
    error: str | None = None
    kind: str | None = None
    downloaded: int = 0
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """``fetched``, ``cached`` or ``failed``."""
        if self.error is not None:
            return "failed"
        return "fetched" if self.downloaded else "cached"

    def to_json(self) -> dict[str, object]:
        return {"handle": self.handle, "status": self.status, "path": self.path, "error": self.error,
                "kind": self.kind, "downloaded_bytes": self.downloaded, "seconds": round(self.seconds, 3)}


class Observer:
    """Follows the download events of one prefetch (a plugin registered while it runs).

    Subclasses (the CLI's progress display) override the ``on_*`` methods; they run in worker
    threads.
    """

    def __init__(self, handles: Sequence[str]):
        self.handles = set(handles)
        self.bytes: dict[str, int] = {}
        self.lock = threading.Lock()

    @hookimpl
    def hubcache_event(self, event: Event) -> None:
        if event.handle not in self.handles:
            return
        if event.kind == "download_started":
            with self.lock:
                self.bytes[event.handle] = 0
            self.on_started(event.handle, event.data.get("total"))
        elif event.kind in ("download_progress", "download_finished"):
            count = int(event.data.get("bytes", 0))
            with self.lock:
                delta = count - self.bytes.get(event.handle, 0)
                self.bytes[event.handle] = count
            if delta > 0:
                self.on_bytes(event.handle, delta)

    def on_started(self, handle: str, total: int | None) -> None:
        """A download began (``total``: its announced size, if any)."""

    def on_bytes(self, handle: str, count: int) -> None:
        """``count`` more bytes of ``handle`` arrived."""

    def finished(self, result: Fetched) -> None:
        """A handle is done (called under the caller's lock, in completion order)."""

    def write(self, line: str, stream: TextIO) -> None:
        """Print a line without breaking the display."""
        print(line, file=stream, flush=True)

    def close(self) -> None:
        """The prefetch is over."""


class BarObserver(Observer):
    """One tqdm bar on stderr for a whole prefetch: the bytes of every download together, and
    how many handles are done (``prefetch 3/10``). Per-download bars are muted meanwhile."""

    def __init__(self, handles: Sequence[str]):
        from tqdm import tqdm

        super().__init__(handles)
        self.count, self.done, self.total = len(set(handles)), 0, 0
        self.bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                        desc=self._desc(), dynamic_ncols=True, mininterval=0.2, leave=True)

    def _desc(self) -> str:
        return f"prefetch {self.done}/{self.count}"

    def on_started(self, handle: str, total: int | None) -> None:
        if total:
            with self.lock:
                self.total += total
                self.bar.total = self.total
            self.bar.refresh()

    def on_bytes(self, handle: str, count: int) -> None:
        self.bar.update(count)

    def finished(self, result: Fetched) -> None:
        self.done += 1
        self.bar.set_description(self._desc())

    def write(self, line: str, stream: TextIO) -> None:
        self.bar.write(line, file=stream)

    def close(self) -> None:
        self.bar.close()


def read_handle_list(lines: Iterable[str]) -> list[str]:
    """Handles from a list file: one a line; blank lines and ``#`` comments are skipped."""
    out = []
    for line in lines:
        text = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if text:
            out.append(text)
    return out


def prefetch(handles: Sequence[str], *, jobs: int = 4, observer: Observer | None = None,
             on_done: Callable[[Fetched], None] | None = None) -> list[Fetched]:
    """Resolve every handle, ``jobs`` at a time; never raises for one handle's failure.

    Args:
        handles: the handles (duplicates are fetched once).
        jobs: worker threads.
        observer: follows download events (progress display); registered while this runs.
        on_done: called (from a worker thread) as each handle finishes.

    Returns:
        One :class:`Fetched` per distinct handle, in the order given.
    """
    from ..core.errors import HubcacheError
    from ..plugins.registry import get_registry

    unique = list(dict.fromkeys(handles))
    observer = observer or Observer(unique)
    observer.handles = set(unique)
    registry = get_registry()
    name = f"hubcache.prefetch.{id(observer)}"
    registry.pm.register(observer, name=name)

    def one(handle: str) -> Fetched:
        from ..core.resolver import resolve

        result = Fetched(handle)
        started = time.monotonic()
        try:
            result.path = resolve(handle)
            _release(handle)
        except HubcacheError as error:
            result.error, result.kind = str(error), type(error).__name__
        except Exception as error:  # noqa: BLE001 - one broken handle must not stop the others
            result.error, result.kind = f"{handle!r}: {type(error).__name__}: {error}", type(error).__name__
        result.seconds = time.monotonic() - started
        with observer.lock:
            result.downloaded = observer.bytes.get(handle, 0)
        if on_done is not None:
            on_done(result)
        return result

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="hubcache-prefetch") as pool:
            return list(pool.map(one, unique))
    finally:
        registry.pm.unregister(name=name)


def _release(handle: str) -> None:
    from ..core.backend import CacheBackend
    from ..core.handles import parse_handle
    from ..core.resolver import current_backend

    _, backend = current_backend()
    for tier in getattr(backend, "tiers", [backend]):
        if isinstance(tier, CacheBackend):
            tier.store.release(parse_handle(handle).key)
