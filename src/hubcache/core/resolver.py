"""The resolver: handle -> locate -> select backend -> backend.resolve -> path.

Hits are memoised per process: a repeated ``resolve`` of the same handle under the same settings
costs a dictionary lookup and the backend's one-``stat`` validity check.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

from .backend import Backend
from .config import Config, config_fingerprint, load_config
from .errors import ConfigError, HubcacheError, IntegrityError
from .handles import Handle, has_pin, parse_handle
from .locate import Location
from .pins import apply_pins
from .plugins import get_registry
from .redact import redact

DEFAULT_BACKEND = "tmp"
UNCOMPRESSED_BACKEND = "remote"

_memo: dict[tuple, tuple[str, Callable[[], bool] | None]] = {}
_backends: dict[tuple, tuple[Config, Backend]] = {}
_backends_lock = threading.Lock()


def select_backend_name(config: Config) -> tuple[str, str]:
    """The backend the settings select, and why (for ``hubcache config``).

    Precedence: ``HUBCACHE_BACKEND``; then ``TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED`` -> ``remote``;
    then a ``TFHUB_CACHE_DIR`` URL whose scheme a backend owns; then ``tmp``.
    """
    setting = config.settings["backend"]
    if setting.value:
        return str(setting.value).strip(), f"{setting.origin}"
    fmt = config.settings["load_format"]
    if fmt.value == "UNCOMPRESSED":
        return UNCOMPRESSED_BACKEND, f"{fmt.origin}=UNCOMPRESSED"
    cache_dir = config.settings["cache_dir"]
    if cache_dir.value:
        scheme = parse_handle(str(cache_dir.value)).scheme
        if scheme not in ("", "file"):
            registry = get_registry()
            for name, cls in sorted(registry.backends.items()):
                if scheme in getattr(cls, "protocols", ()):
                    return name, f"{cache_dir.origin}={cache_dir.value}"
            raise ConfigError(
                f"{cache_dir.origin}={cache_dir.value!r}: no installed backend stores caches at {scheme}:// URLs",
                hint="for gs:// install 'hubcache[gcs]'; `hubcache plugins --all` lists backends")
    return DEFAULT_BACKEND, "default"


def current_backend() -> tuple[Config, Backend]:
    """The configured backend instance (cached per distinct settings)."""
    fingerprint = config_fingerprint(get_registry().setting_names)
    cached = _backends.get(fingerprint)
    if cached is not None:
        return cached
    with _backends_lock:
        cached = _backends.get(fingerprint)
        if cached is None:
            config = load_config()
            name, _ = select_backend_name(config)
            cached = _backends[fingerprint] = (config, make_backend(name, config))
    return cached


def make_backend(name: str, config: Config) -> Backend:
    """An instance of backend ``name``, or of a tier chain for ``"home,gcs"`` (hubcache.core.tiers)."""
    if "," in name:
        from .tiers import TieredBackend

        return TieredBackend.from_setting(config, name)
    return get_registry().backend_class(name)(config)


def resolve(handle: str) -> str:
    """Return a path from which the model named by ``handle`` can be loaded.

    Args:
        handle: a model handle: a tfhub.dev-style URL (``https://tfhub.dev/google/spice/2``), an
            archive URL (``.tar``, ``.tar.gz``, ``.tar.zst``, ``.tar.bz2``, ``.tar.xz``), a
            ``gs://`` or other fsspec URL, or a local path. It may end in a pinned digest,
            ``#sha256=<hex>``.

    Returns:
        A local directory (cache backends) or a remote directory URL (``remote`` backend).

    Raises:
        HubcacheError: a subclass saying what went wrong with this handle and what to do.
    """
    if not isinstance(handle, str):
        parse_handle(handle)  # raises HandleError (a list would otherwise fail as unhashable)
    memo_key = (handle, config_fingerprint(get_registry().setting_names))
    hit = _memo.get(memo_key)
    if hit is not None:
        path, still_valid = hit
        if still_valid is None or still_valid():
            return path
        _memo.pop(memo_key, None)
    try:
        config, backend = current_backend()
        parsed = _apply_pins(parse_handle(handle), config)  # HUBCACHE_PINS, for every backend
        load_format = "UNCOMPRESSED" if config["load_format"] == "UNCOMPRESSED" else "COMPRESSED"
        location = get_registry().hook.hubcache_locate(handle=parsed, load_format=load_format)
        require_checkable_pin(parsed, location, config)
        path, still_valid = backend.resolve_checked(parsed, location)
    except HubcacheError as error:
        if error.handle is None:
            error.handle = redact(handle) if isinstance(handle, str) else None
        raise
    _memo[memo_key] = (path, still_valid)
    return path


def _apply_pins(parsed: Handle, config: Config) -> Handle:
    """``apply_pins``, also for a pins file that names a handle with its credentials, as the
    user writes it (``parsed`` shows them as ``***``)."""
    if parsed.userinfo and config.get("pins"):
        written = dataclasses.replace(parsed, url=parsed.reveal(parsed.url), raw=parsed.reveal(parsed.raw.strip()))
        parsed = dataclasses.replace(parsed, pin=apply_pins(written, config).pin)
    return apply_pins(parsed, config)


def require_checkable_pin(handle: Handle, location: Location, config: Config) -> None:
    """A pin is a promise about archive bytes: refuse a pinned handle that resolves to no archive
    (a directory, or a model read in place), rather than return it unchecked.

    Raises:
        IntegrityError: the handle is pinned and ``location`` is not an archive.
    """
    if handle.pin is None or location.kind == "archive":
        return
    algorithm, digest = handle.pin
    pins = config.get("pins")
    from_file = pins and not has_pin(handle.raw)
    if location.kind == "directory":
        what = "names a directory, not an archive"
        fix = "pin the archive's URL instead"
    else:
        fmt = config.settings["load_format"]
        what = f"is read in place ({fmt.origin or 'load format'}=UNCOMPRESSED), not downloaded as an archive"
        fix = f"set {fmt.origin or 'TFHUB_MODEL_LOAD_FORMAT'}=COMPRESSED to download and check the archive"
    drop = f"remove its line from {pins}" if from_file else "remove the pin"
    raise IntegrityError(f"the handle pins {algorithm}={digest}, but it {what}: there are no archive bytes "
                         "whose digest could be checked", hint=f"{fix}, or {drop}")


def clear_memo() -> None:
    """Forget memoised hits and backend instances (after changing settings in-process)."""
    _memo.clear()
    with _backends_lock:
        _backends.clear()
