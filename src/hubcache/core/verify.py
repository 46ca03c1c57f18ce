"""``hubcache verify``: check cache entries against their manifests, and repair them.

By default every file's size is compared with the manifest (what a resolve checks too); with
``full`` every file's CRC-32 as well, which catches same-size corruption (a flipped bit) that only
reading the bytes reveals. A pinned handle's entry must also come from an archive with the
pinned digest.

Repair does now what the next resolve would do: under the entry's download lock it removes what
a dead writer left and the damaged entry, then downloads and commits the handle afresh through
its backend, and checks the result in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from .backend import CacheBackend
from .errors import HubcacheError
from .handles import parse_handle

#: statuses that need no action
GOOD = ("ok", "foreign", "downloading", "repaired", "cleaned")


@dataclass
class Verified:
    """What verify found for one entry of one backend.

    Attributes:
        backend: the backend's name.
        key: the cache key.
        handle: the handle (given, or recorded in the manifest or descriptor), if known.
        path: the entry's path.
        status: ``ok``, ``foreign`` (a complete tensorflow_hub entry, no manifest to check),
            ``damaged``, ``pin mismatch`` (complete, but not from the pinned archive, or from an
            archive whose digest hubcache did not verify itself), ``leftover`` (a dead writer's
            temp files), ``downloading`` (another process is writing it), ``not cached``; after a
            repair ``repaired``, ``cleaned`` or ``repair failed``.
        problems: what is wrong, one item per problem.
        checked: ``sizes`` or ``sizes+crc32``.
        error: why a repair failed.
    """

    backend: str
    key: str
    handle: str | None
    path: str
    status: str
    problems: list[str] = field(default_factory=list)
    checked: str = "sizes"
    error: str | None = None

    @property
    def good(self) -> bool:
        return self.status in GOOD

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check(backend: CacheBackend, key: str, handle: str | None, pin: tuple[str, str] | None,
           full: bool) -> Verified:
    store = backend.store
    info = store.entry(key)
    result = Verified(backend.name, key, handle, store.entry_path(key), "not cached",
                      checked="sizes+crc32" if full else "sizes")
    if info is None:
        if handle is not None:
            result.problems.append("not in the cache")
        return result
    result.handle = handle or info.handle
    leftover = False
    if info.state == "in progress":
        busy = store.busy(key)  # "in use" (resolved by a live process) is no writer: not a reason
        if busy and "being downloaded" in busy:
            result.status = "downloading"
            result.problems.append(busy)
            return result
        leftover = True
        result.problems.append("files left behind by an interrupted download")
    if info.state == "foreign":
        result.status = "foreign"
        return result
    damage: list[str] = []
    mismatch = False
    if info.manifest is not None or not leftover:
        damage = store.verify(key, full=full)
        if not damage and pin is not None and info.manifest is not None:
            archive = info.manifest.archive
            actual = archive.get(pin[0])
            # As a resolve does (cache.check_pin): only a digest hubcache verified can vouch for a pin.
            if archive.get("verified", True) is False or not isinstance(actual, str) or not actual:
                mismatch = True
                damage.append(f"its archive's {pin[0]} was not verified by hubcache (the entry was copied "
                              f"from another tier or adopted), so it cannot vouch for the pin {pin[1]}")
            elif actual != pin[1]:
                mismatch = True
                damage.append(f"built from an archive whose {pin[0]} is {actual}, but the handle pins {pin[1]}")
    result.problems.extend(damage)
    result.status = ("pin mismatch" if mismatch else "damaged" if damage else "leftover" if leftover
                     else "ok")
    return result


def _repair(backend: CacheBackend, result: Verified) -> None:
    from .plugins import get_registry

    store = backend.store
    if result.handle is None and result.status != "leftover":
        result.status = "repair failed"
        result.error = f"the handle is unknown (no manifest or descriptor names it): `hubcache rm {result.key}`"
        return
    try:
        with store.lock(result.key, lambda holder: None):
            store.cleanup(result.key)
            if result.status != "leftover":
                store.remove(result.key)
        if result.status == "leftover":
            result.status = "cleaned"
            return
        handle = parse_handle(result.handle or "")
        location = get_registry().hook.hubcache_locate(handle=handle, load_format="COMPRESSED")
        backend.resolve(handle, location)
    except HubcacheError as error:
        result.status = "repair failed"
        result.error = str(error)
        return
    after = store.verify(result.key, full=True)
    if after:
        result.status = "repair failed"
        result.error = "; ".join(after)
    else:
        result.status = "repaired"


def verify(backends: Sequence[CacheBackend], handles: Sequence[str] = (), *, full: bool = False,
           repair: bool = False) -> list[Verified]:
    """Check (and with ``repair`` fix) the entries of ``handles``, or every entry if none given.

    Handles may also be cache keys (40 hex digits). Pins apply: the handle's own, and those of
    ``HUBCACHE_PINS``.

    Raises:
        HubcacheError: for a malformed handle or pins file.
    """
    from .manage import _KEY
    from .pins import apply_pins

    results = []
    for backend in backends:
        if handles:
            targets = []
            for text in handles:
                if _KEY.match(text):
                    targets.append((text, None, None))
                else:
                    parsed = apply_pins(parse_handle(text), backend.config)
                    targets.append((parsed.key, text, parsed.pin))
        else:
            targets = [(e.key, None, None) for e in backend.store.entries()]
        for key, handle, pin in targets:
            result = _check(backend, key, handle, pin, full)
            if repair and not result.good:
                _repair(backend, result)
            results.append(result)
    return results
