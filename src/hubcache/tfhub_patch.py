"""Make tensorflow_hub resolve through hubcache: :func:`patch_tensorflow_hub`.

tensorflow_hub sends every ``hub.resolve``, ``hub.load`` and ``hub.KerasLayer`` (and whatever is
built on them) through ``tensorflow_hub.registry.resolver``, which asks its implementations,
most recently registered first, whether they support a handle (``is_supported``) and calls the
first that does. :func:`patch_tensorflow_hub` registers :class:`HubcacheResolver` there, last, so
hubcache is asked first; :func:`unpatch_tensorflow_hub` takes it out again, leaving the list as
it was (other registrations made meanwhile stay).

TensorFlow is never imported here: if tensorflow_hub has not been imported yet (it imports
TensorFlow), the patch waits for it (``_hubcache_autopatch``'s import hook) and is applied the
moment tensorflow_hub finishes importing. ``HUBCACHE_PATCH_TFHUB=1`` arms that same hook at
interpreter start-up, for code that cannot be edited.

Handles hubcache cannot resolve here fall through to tensorflow_hub's own resolvers: non-strings,
malformed handles, local paths that do not exist (tensorflow_hub's ``IOError`` says so), URLs of schemes for which no fsspec implementation is installed (``ram://``,
``hdfs://`` read by TensorFlow's own filesystems, ``gs://`` without ``hubcache[gcs]``) are not
supported (:func:`supports`), and a resolve that raises :class:`~hubcache.MissingDependencyError`
(e.g. ``TFHUB_CACHE_DIR=gs://...`` without gcsfs) is handed to the next resolver tensorflow_hub
has, with a warning, as if hubcache were not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import threading
from typing import Any

import _hubcache_autopatch

from .core.errors import HandleError, MissingDependencyError
from .core.handles import parse_handle
from .core.resolver import resolve

logger = logging.getLogger("hubcache")

__all__ = ["HubcacheResolver", "patch_tensorflow_hub", "unpatch_tensorflow_hub", "is_patched", "supports"]

#: Schemes hubcache reads itself, without fsspec.
_OWN_SCHEMES = ("", "file", "http", "https")

_lock = threading.RLock()
#: The resolver registered in tensorflow_hub, while patched.
_registered: HubcacheResolver | None = None
#: scheme -> whether an fsspec implementation of it is installed
_readable: dict[str, bool] = {}
_warned: set[str] = set()


def _fsspec_reads(scheme: str) -> bool:
    """True if fsspec has an installed implementation for ``scheme`` (without importing it)."""
    known = _readable.get(scheme)
    if known is None:
        try:
            from fsspec.registry import known_implementations, registry
        except ImportError:  # pragma: no cover - fsspec is a dependency of hubcache
            known = False
        else:
            if scheme in registry:
                known = True
            else:
                entry = known_implementations.get(scheme)
                top = str(entry["class"]).split(".", 1)[0] if entry else ""
                known = bool(top) and importlib.util.find_spec(top) is not None
        _readable[scheme] = known
    return known


def supports(handle: object) -> bool:
    """Whether hubcache answers ``handle`` in tensorflow_hub (else tensorflow_hub's own resolvers
    do): a string hubcache can parse that is an existing local path, an http(s) URL, or a URL of
    a scheme fsspec can read here."""
    if not isinstance(handle, str):
        return False
    try:
        parsed = parse_handle(handle)
    except HandleError:
        return False
    if parsed.is_local:
        # A path that is not there is tensorflow_hub's PathResolver's to report (an IOError, which
        # code written for tensorflow_hub may catch); one that is there is the same to both, or
        # (an archive) unpacked by hubcache.
        return os.path.exists(parsed.local_path)
    return parsed.scheme in _OWN_SCHEMES or _fsspec_reads(parsed.scheme)


class HubcacheResolver:
    """A tensorflow_hub resolver implementation (``is_supported`` and ``__call__``, as
    ``tensorflow_hub.resolver.Resolver`` asks; not a subclass, so that defining it imports nothing
    of TensorFlow) that resolves through :func:`hubcache.resolve`."""

    def is_supported(self, handle: object) -> bool:
        return supports(handle)

    def __call__(self, handle: str) -> str:
        try:
            return resolve(handle)
        except MissingDependencyError as error:
            fallback = self._next(handle)
            if fallback is None:
                raise
            name = type(fallback).__name__
            key = f"{name}:{error}"
            if key not in _warned:
                _warned.add(key)
                logger.warning("hubcache cannot resolve %s here (%s); tensorflow_hub's %s does", handle, error, name)
            return str(fallback(handle))

    def _next(self, handle: str) -> Any:
        """The tensorflow_hub resolver that would answer ``handle`` if hubcache were not there."""
        registry = sys.modules.get("tensorflow_hub.registry")
        if registry is None:
            return None
        impls = list(registry.resolver._impls)
        if self not in impls:
            return None
        for impl in reversed(impls[:impls.index(self)]):
            if impl.is_supported(handle):
                return impl
        return None

    def __repr__(self) -> str:
        return "HubcacheResolver()"


def _register(registry: Any) -> None:
    global _registered
    resolver = HubcacheResolver()
    registry.resolver.add_implementation(resolver)
    _registered = resolver


def _live() -> bool:
    """True if our resolver is in tensorflow_hub's list (which tensorflow_hub's own
    ``registry._clear()`` empties behind our back)."""
    registry = sys.modules.get("tensorflow_hub.registry")
    return (_registered is not None and registry is not None
            and any(impl is _registered for impl in registry.resolver._impls))


def patch_tensorflow_hub() -> None:
    """Make tensorflow_hub resolve handles through hubcache.

    If tensorflow_hub is imported, hubcache's resolver is registered now; if not, it is registered
    the moment tensorflow_hub finishes importing (this call imports neither it nor TensorFlow).
    Idempotent and thread-safe: however many times and threads call it, one resolver is
    registered. :func:`unpatch_tensorflow_hub` undoes it.
    """
    with _lock:
        if _live():
            return
        if "tensorflow_hub" not in sys.modules:
            _hubcache_autopatch.arm()
            return
    # Being imported (by another thread: this waits for it to finish) or imported already. Not
    # under the lock: the importing thread takes it to register (through the hook).
    importlib.import_module("tensorflow_hub")
    registry = importlib.import_module("tensorflow_hub.registry")
    with _lock:
        _hubcache_autopatch.disarm()
        if not _live():
            _register(registry)


def unpatch_tensorflow_hub() -> None:
    """Undo :func:`patch_tensorflow_hub` (and ``HUBCACHE_PATCH_TFHUB``): tensorflow_hub's
    resolvers are again the ones it had, in their order; a patch still waiting for tensorflow_hub
    to be imported is called off. Idempotent and thread-safe."""
    global _registered
    with _lock:
        _hubcache_autopatch.disarm()
        resolver, _registered = _registered, None
        if resolver is None:
            return
        registry = sys.modules.get("tensorflow_hub.registry")
        if registry is not None:
            # MultiImplRegister has no removal method: its list, without ours (same objects,
            # same order); implementations others added meanwhile stay.
            registry.resolver._impls = [impl for impl in registry.resolver._impls if impl is not resolver]


def is_patched() -> bool:
    """True while tensorflow_hub resolves through hubcache, or will once it is imported."""
    with _lock:
        return _live() or _hubcache_autopatch.armed()
