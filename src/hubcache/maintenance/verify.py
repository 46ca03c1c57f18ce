"""``hubcache verify``: check cache entries against their manifests, and repair them.

By default every file's size is compared with the manifest (what a resolve checks too); with
``full`` every file's CRC-32 as well, which catches same-size corruption (a flipped bit) that only
reading the bytes reveals. A pinned handle's entry must also come from an archive with the
pinned digest.

``full`` also reports what an entry holds that its manifest does not list (files planted in a
local entry, objects in a bucket entry): a listing that lies about an entry hides bytes from the
size budget and from checks.

Repair removes what a dead writer left and the damaged entry, under the entry's download lock.
It downloads again only the handles the user named on the command line: a handle read from a
cache (a manifest or descriptor, which anyone who can write a shared cache or bucket can plant)
is never fetched, so a planted ``file:///...`` or intranet URL cannot make a maintenance host
read its own files or call an address of the attacker's choosing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from ..core.backend import CacheBackend
from ..core.entry import is_key
from ..core.errors import HubcacheError
from ..core.handles import parse_handle
from ..core.manifest import Manifest
from ..core.pins import apply_configured_pins, pin_problem
from ..core.store import Store

#: statuses that need no action
GOOD = ("ok", "foreign", "downloading", "repaired", "cleaned", "removed")


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
            repair ``repaired`` (downloaded again: only handles named by the user), ``removed``
            (a damaged entry removed, not downloaded again), ``cleaned`` (leftovers removed) or
            ``repair failed``.
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
        if full and info.manifest is not None:
            try:
                damage.extend(f"{name} is not in the manifest" for name in unlisted(store, key, info.manifest))
            except OSError as error:  # a bucket listing that failed: say so, check the rest
                damage.append(f"could not list what the entry holds: {error}")
        if not damage and pin is not None and info.manifest is not None:
            # The resolve path's own check and wording (core/pins.py).
            problem = pin_problem(pin, info.manifest)
            if problem is not None:
                mismatch = True
                damage.append(f"the entry {problem}")
    result.problems.extend(damage)
    result.status = ("pin mismatch" if mismatch else "damaged" if damage else "leftover" if leftover
                     else "ok")
    return result


_MAX_UNLISTED = 20  # named in a report; more are counted


def unlisted(store: Store, key: str, manifest: Manifest) -> list[str]:
    """What the entry of ``key`` holds that ``manifest`` does not list (relative paths, sorted).

    A local entry is walked without following links (files, links, folders and anything else
    not named by the manifest); an object store is asked for its ``unlisted_objects(key,
    manifest)`` if it has one, else the objects under the entry's prefix are listed. Stores of
    other kinds report nothing. At most ``_MAX_UNLISTED`` names, then a count of the rest.
    """
    from ..stores.localstore import LocalStore
    from ..stores.objectstore import ObjectStore

    found: list[str] = []
    if isinstance(store, LocalStore):
        from ..stores import treewalk

        known = {f.path for f in manifest.files} | set(manifest.symlinks) | set(manifest.dirs)
        parents = _ancestors(known)
        for d in treewalk.walk(store.entry_path(key)):
            base = d.path + "/" if d.path else ""
            for name in d.files + d.symlinks + d.other:
                if base + name not in known:
                    found.append(base + name)
            for name in list(d.dirs):
                if base + name not in known and base + name not in parents:
                    found.append(base + name + "/")
                    d.dirs.remove(name)  # its contents are unlisted too: the folder says it
    elif isinstance(store, ObjectStore):
        custom = getattr(store, "unlisted_objects", None)
        if custom is not None:
            found = list(custom(key, manifest))
        else:
            known = {f.path for f in manifest.files} | set(manifest.symlinks)
            prefix = store.object_path(key) + "/"
            found = [p[len(prefix):] for p in store.list_objects(store.object_path(key))
                     if p.startswith(prefix) and p[len(prefix):] not in known]
    found.sort()
    if len(found) > _MAX_UNLISTED:
        found[_MAX_UNLISTED:] = [f"and {len(found) - _MAX_UNLISTED} more"]
    return found


def _ancestors(names: Iterable[str]) -> set[str]:
    """Every folder above one of ``names`` (``"a/b/c"``: ``"a"``, ``"a/b"``).

    The climb from a name stops at the first folder already found, whose own ancestors are then
    found too: each folder is built once, so an entry 2,000 folders deep (one manifest name per
    level) costs one pass over its names, not a rebuild of every prefix of every name (tens of
    seconds of string joins for ``verify --full`` of one such entry).
    """
    found: set[str] = set()
    for name in names:
        end = name.rfind("/")
        while end >= 0:
            parent = name[:end]
            if parent in found:
                break
            found.add(parent)
            end = name.rfind("/", 0, end)
    return found


def _repair(backend: CacheBackend, result: Verified, *, fetch: bool) -> None:
    """Repair one entry; ``fetch``: the user named its handle, so it may be downloaded again."""
    from ..core.resolver import locate_handle

    store = backend.store
    if fetch and result.handle is None and result.status != "leftover":
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
        if not fetch:
            # The handle came from the cache, not from the user: never fetch it (see the module doc).
            result.status = "removed"
            return
        handle = parse_handle(result.handle or "")
        location = locate_handle(handle, backend.config, load_format="COMPRESSED")  # into a cache: an archive
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
    ``HUBCACHE_PINS``. ``repair`` downloads again only entries whose handle is in ``handles``
    (not a key, not a handle read from the cache): other damaged entries are removed.

    Raises:
        HubcacheError: for a malformed handle or pins file.
    """
    results = []
    for backend in backends:
        targets: list[tuple[str, str | None, tuple[str, str] | None]]
        if handles:
            targets = []
            for text in handles:
                if is_key(text):
                    targets.append((text, None, None))
                else:
                    parsed = apply_configured_pins(parse_handle(text), backend.config)
                    targets.append((parsed.key, text, parsed.pin))
        else:
            targets = [(e.key, None, None) for e in backend.store.entries()]
        for key, handle, pin in targets:
            result = _check(backend, key, handle, pin, full)
            if repair and not result.good:
                _repair(backend, result, fetch=handle is not None)
            results.append(result)
    return results
