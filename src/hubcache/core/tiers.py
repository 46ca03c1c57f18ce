"""A chain of cache tiers: ``HUBCACHE_BACKEND=home,gcs`` reads through, fastest tier first.

- A hit in the first tier returns at once (the same one-``stat`` memoised check as a single
  backend).
- A miss there that hits a later tier (a bucket shared by a fleet) copies the entry down into
  every earlier writable tier, file by file with each file's CRC-32 checked against the manifest,
  committed with that tier's own protocol; the origin is not contacted.
- A miss everywhere downloads once, into the first writable tier, then copies the entry up into
  every other writable tier, so the next host finds it in the shared one.
- A tier that cannot be written (a read-only team cache, a bucket without write access) is still
  read; copies into it are skipped with a log message.

Every tier must be a cache backend; offline mode (``HUBCACHE_OFFLINE``) serves hits from any
tier and never downloads.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Callable, Iterator

from .backend import Backend, CacheBackend
from .cache import check_pin, resolve_in_store
from .config import Config
from .errors import CacheError, ConfigError, HubcacheError, IntegrityError, OfflineError
from .events import emit
from .handles import Handle
from .locate import Location
from .manifest import Manifest, crc_hex
from .store import Store

logger = logging.getLogger("hubcache")


def tier_names(name: str) -> list[str]:
    """The tiers of a backend setting (``"home,gcs"`` -> ``["home", "gcs"]``)."""
    return [part.strip() for part in name.split(",") if part.strip()]


class TieredBackend(Backend):
    """Several cache backends read in order, each filled from the next (see the module doc).

    Args:
        config: the effective settings.
        tiers: the cache backends, fastest first.
    """

    name = "tiers"
    description = "a chain of cache tiers read in order"

    def __init__(self, config: Config, tiers: list[CacheBackend]):
        super().__init__(config)
        if len(tiers) < 2:
            raise ConfigError("a tier chain needs at least two backends")
        for tier in tiers:
            if not isinstance(tier, CacheBackend):
                raise ConfigError(f"backend {tier.name!r} keeps no cache, so it cannot be a tier",
                                  hint="chain cache backends only, e.g. HUBCACHE_BACKEND=home,gcs")
        self.tiers = tiers
        self.name = ",".join(t.name for t in tiers)  # type: ignore[misc]

    @classmethod
    def from_setting(cls, config: Config, setting: str) -> TieredBackend:
        """Build the chain a ``HUBCACHE_BACKEND`` value names."""
        from .plugins import get_registry

        registry = get_registry()
        return cls(config, [registry.backend_class(name)(config) for name in tier_names(setting)])

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description,
                "tiers": [tier.describe() for tier in self.tiers]}

    def resolve(self, handle: Handle, location: Location) -> str:
        return self.resolve_checked(handle, location)[0]

    def resolve_checked(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        if location.kind in ("directory", "pointer"):
            return self.tiers[0].resolve_checked(handle, location)  # the same answer as one tier
        key = handle.key
        for index, tier in enumerate(self.tiers):
            store = tier.store
            store.mark_used(key)
            found = store.lookup(key, handle.url)
            if found is None:
                continue
            check_pin(handle, found[1])
            path, manifest = found
            # Copy down: the earliest tier that takes the copy serves this and every later call.
            for upper in reversed(self.tiers[:index]):
                copied = self._copy(handle, tier.store, path, manifest, upper)
                if copied is not None:
                    tier, path = upper, copied
            return path, tier.store.validator(path, manifest)
        if self.config.get("offline"):
            raise OfflineError(f"not in any tier of {self.name}, and offline mode is on (HUBCACHE_OFFLINE)",
                               hint=f"run `hubcache prefetch {handle.raw}` while online")
        return self._download(handle, location)

    def _download(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        """Download once into the first tier that can be written, then fill the others."""
        errors = []
        for index, tier in enumerate(self.tiers):
            try:
                path, manifest = resolve_in_store(tier.store, handle, location, self.config,
                                                  backend=tier.name, on_commit=tier.after_commit)
            except CacheError as error:  # not writable: try the next tier
                logger.info("tier %s of %s cannot take %s: %s", tier.name, self.name, handle.raw, error.message)
                errors.append(f"{tier.name}: {error.message}")
                continue
            for other in self.tiers[index + 1:]:
                self._copy(handle, tier.store, path, manifest, other)
            return path, tier.store.validator(path, manifest)
        raise CacheError(f"no tier of {self.name} could store the download ({'; '.join(errors)})",
                         hint="make one tier writable, or use a single backend")

    def _copy(self, handle: Handle, source: Store, path: str, manifest: Manifest,
              target: CacheBackend) -> str | None:
        """Copy a committed entry into ``target``'s store; its path there, or ``None`` if the
        tier cannot take it (read-only, full) or the source turned out damaged."""
        store, key = target.store, handle.key

        def on_wait(holder: str) -> None:
            emit("waiting", handle.raw, target.name, path=store.entry_path(key), holder=holder)

        try:
            with store.lock(key, on_wait):
                found = store.lookup(key, handle.url)  # another process may have copied it meanwhile
                if found is not None:
                    return found[0]
                store.cleanup(key)
                writer = store.writer(key, handle.url)
                try:
                    _fill(writer, path, manifest)
                    copied = writer.commit(manifest)
                except BaseException:
                    writer.abort()
                    raise
        except HubcacheError as error:
            logger.info("could not copy %s into tier %s: %s", handle.raw, target.name, error)
            return None
        except OSError as error:
            logger.info("could not copy %s into tier %s: %s", handle.raw, target.name, error)
            return None
        emit("copied", handle.raw, target.name, path=copied, source=path, bytes=manifest.total_bytes)
        target.after_commit(handle, copied, manifest)  # e.g. the home tier's size budget
        return copied


def _open(path: str):
    if "://" not in path:
        return open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb").open()


def _join(root: str, rel: str) -> str:
    if "://" in root:
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, *rel.split("/"))


def _chunks(path: str, expected_crc: str, rel: str) -> Iterator[bytes]:
    crc = 0
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            yield chunk
    if crc_hex(crc) != expected_crc:
        raise IntegrityError(f"{rel} in the source tier has CRC-32 {crc_hex(crc)}, expected {expected_crc}",
                             hint="`hubcache rm` the entry from that tier")


def _fill(writer, root: str, manifest: Manifest) -> None:
    dirs = set(manifest.dirs)
    for record in manifest.files:
        parts = record.path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(dirs):
        writer.add_dir(d)
    for record in manifest.files:
        writer.add_file(record.path, _chunks(_join(root, record.path), record.crc32, record.path))
    for link, target in sorted(manifest.symlinks.items()):
        writer.add_symlink(link, target)
