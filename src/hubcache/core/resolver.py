"""The resolver: handle -> locate -> select backend -> backend.resolve -> path.

Hits are memoised per process: a repeated ``resolve`` of the same handle under the same settings
costs a dictionary lookup and the backend's one-``stat`` validity check.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..plugins.registry import get_registry
from .backend import Backend
from .config import Config, config_fingerprint, load_config
from .errors import ConfigError, HubcacheError
from .handles import Handle, parse_handle
from .locate import Location
from .pins import apply_configured_pins, require_checkable_pin
from .redact import redact

DEFAULT_BACKEND = "tmp"
UNCOMPRESSED_BACKEND = "remote"

#: (handle, config fingerprint) -> (path, still_valid) of a hit.
_memo: dict[tuple[str, tuple[object, ...]], tuple[str, Callable[[], bool] | None]] = {}
#: config fingerprint -> (config, backend).
_backends: dict[tuple[object, ...], tuple[Config, Backend]] = {}
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


def locate_handle(handle: Handle, config: Config, *, load_format: str | None = None) -> Location:
    """Where ``handle``'s bytes are: the ``hubcache_locate`` hook's first answer.

    Args:
        handle: the parsed handle.
        config: the settings; their load format is passed on (``AUTO`` as ``COMPRESSED``).
        load_format: ``COMPRESSED`` or ``UNCOMPRESSED`` instead of the configured one (a repair
            that must download an archive into a cache asks for ``COMPRESSED``).

    Raises:
        HubcacheError: as a locator raises it (e.g. a local path that does not exist).
    """
    if load_format is None:
        load_format = "UNCOMPRESSED" if config.load_format == "UNCOMPRESSED" else "COMPRESSED"
    # pluggy's hook calls return Any: the spec (a firstresult hook) says what a locator returns.
    location: Location = get_registry().hook.hubcache_locate(handle=handle, load_format=load_format)
    return location


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
        parsed = apply_configured_pins(parse_handle(handle), config)  # HUBCACHE_PINS, for every backend
        location = locate_handle(parsed, config)
        require_checkable_pin(parsed, location, config)
        path, still_valid = backend.resolve_checked(parsed, location)
    except HubcacheError as error:
        if error.handle is None:
            error.handle = redact(handle) if isinstance(handle, str) else None
        raise
    _memo[memo_key] = (path, still_valid)
    return path


def clear_memo() -> None:
    """Forget memoised hits and backend instances (after changing settings in-process)."""
    _memo.clear()
    with _backends_lock:
        _backends.clear()
