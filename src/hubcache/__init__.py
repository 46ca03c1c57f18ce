"""hubcache: resolve model handles to loadable paths through pluggable storage backends.

Drop-in for tensorflow_hub's resolver::

    import hubcache as hub
    path = hub.resolve("https://tfhub.dev/google/spice/2")
    model = hub.load("https://tfhub.dev/google/spice/2")   # needs hubcache[tensorflow]
"""

from __future__ import annotations

from typing import Any

from . import _moved
from ._version import __version__
from .core.config import define_absl_flags
from .core.errors import (
    ArchiveError,
    CacheError,
    ConfigError,
    DownloadError,
    HandleError,
    HubcacheError,
    IntegrityError,
    MissingDependencyError,
    OfflineError,
    UnsafeArchiveError,
)
from .core.resolver import resolve
from .plugins.markers import hookimpl

__all__ = [
    "__version__",
    "resolve",
    "load",
    "patch_tensorflow_hub",
    "unpatch_tensorflow_hub",
    "hookimpl",
    "HubcacheError",
    "HandleError",
    "ConfigError",
    "MissingDependencyError",
    "DownloadError",
    "ArchiveError",
    "UnsafeArchiveError",
    "IntegrityError",
    "OfflineError",
    "CacheError",
]


def load(handle: str, tags: Any = None, options: Any = None) -> Any:
    """Resolve ``handle`` and load it as a SavedModel (imports TensorFlow on first call).

    Args:
        handle: as for :func:`resolve`.
        tags: meta graph tags (``None``: the default; ``[]`` for TF1 hub modules).
        options: a ``tf.saved_model.LoadOptions``, passed to TensorFlow unchanged.

    Returns:
        What ``tf.saved_model.load`` returns (see :func:`hubcache.tf.load`).

    Raises:
        HandleError: ``handle`` is not a string, or names no SavedModel.
        MissingDependencyError: TensorFlow is not installed (``pip install 'hubcache[tensorflow]'``).
    """
    from .tf import load as _load

    return _load(handle, tags=tags, options=options)


def patch_tensorflow_hub() -> None:
    """Make ``import tensorflow_hub as hub`` code resolve through hubcache: ``hub.load``,
    ``hub.resolve``, ``hub.KerasLayer`` and all built on them (see :mod:`hubcache.tfhub_patch`).

    Idempotent and thread-safe. Imports neither tensorflow_hub nor TensorFlow: if tensorflow_hub
    is not imported yet, the patch is applied when it is. ``HUBCACHE_PATCH_TFHUB=1`` does the same
    without changing code. Handles hubcache cannot resolve go to tensorflow_hub's own resolvers.
    """
    from .tfhub_patch import patch_tensorflow_hub as _patch

    _patch()


def unpatch_tensorflow_hub() -> None:
    """Undo :func:`patch_tensorflow_hub`: tensorflow_hub's resolvers are again the ones it had."""
    from .tfhub_patch import unpatch_tensorflow_hub as _unpatch

    _unpatch()


# Old module paths (hubcache.core.fetch, ...) keep working for one release, with a warning.
_moved.install()

# Like tensorflow_hub: define --tfhub_cache_dir / --tfhub_model_load_format when absl is present.
define_absl_flags()
