"""``load()``: tensorflow_hub's ``hub.load``, resolving through hubcache.

It behaves as ``tensorflow_hub.load`` (tensorflow_hub/module_v2.py) does: a handle that is not a
string is a ``ValueError``; a TF1 Hub format module (one with ``tfhub_module.pb``) loads with
``tags`` defaulting to ``[]``; ``options`` goes to ``tf.saved_model.load`` unchanged; the loaded
object carries ``_is_hub_module_v1``, which ``hub.KerasLayer`` reads. Where it differs, it says
more: a directory that holds no SavedModel is a :class:`~hubcache.HandleError` naming the handle
and the path, and a missing TensorFlow is a :class:`~hubcache.MissingDependencyError` naming the
extra to install.

TensorFlow is imported on the first call of :func:`load`, never when hubcache is imported.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Iterable, cast

from .core.errors import HandleError, MissingDependencyError
from .core.resolver import resolve

#: The marker file of the TF1 Hub format (a serialized ``tensorflow_hub.ModuleDef``).
MODULE_PROTO_FILENAME = "tfhub_module.pb"
INSTALL_HINT = "pip install 'hubcache[tensorflow]'"


def import_tensorflow(handle: str | None = None) -> ModuleType:
    """Import and return TensorFlow.

    Args:
        handle: the handle being loaded, for the error message.

    Raises:
        MissingDependencyError: TensorFlow is not installed, or is installed but cannot be imported.
    """
    try:
        import tensorflow as tf
    except ModuleNotFoundError as error:
        if error.name != "tensorflow":
            raise _broken(error, handle) from error
        raise MissingDependencyError("loading a model needs TensorFlow, which is not installed",
                                     handle=handle, hint=INSTALL_HINT) from error
    except ImportError as error:
        raise _broken(error, handle) from error
    return cast(ModuleType, tf)  # tensorflow is untyped here (no stubs): Any


def _broken(error: ImportError, handle: str | None) -> MissingDependencyError:
    # Installed but unusable (a missing shared library, a half-upgraded dependency): say so
    # rather than claim it is absent.
    return MissingDependencyError(f"TensorFlow is installed but cannot be imported: {error}",
                                  handle=handle, hint=f"reinstall it: {INSTALL_HINT}")


def load(handle: str, tags: Iterable[str] | None = None, options: Any = None) -> Any:
    """Resolve ``handle`` and load the SavedModel there, as ``tensorflow_hub.load`` does.

    Args:
        handle: a model handle, as for :func:`hubcache.resolve`.
        tags: the MetaGraph tag set to load; ``None`` means TensorFlow's default, or ``[]`` for a
            TF1 Hub format module (whose inference graph has the empty tag set).
        options: a ``tf.saved_model.LoadOptions`` (e.g. ``experimental_io_device='/job:localhost'``
            on a Cloud TPU, to read the files through the host), passed to TensorFlow unchanged.

    Returns:
        What ``tf.saved_model.load`` returns, with ``_is_hub_module_v1`` set.

    Raises:
        HandleError: ``handle`` is not a string (a ``ValueError``, as in tensorflow_hub), or it
            resolves to a directory that holds neither ``saved_model.pb`` nor
            ``saved_model.pbtxt``.
        MissingDependencyError: TensorFlow is not installed.
        HubcacheError: resolving failed (see :func:`hubcache.resolve`).
    """
    if not isinstance(handle, str):
        raise HandleError(f"a handle must be a string, got {type(handle).__name__}: {handle!r}",
                          hint="pass a URL such as https://tfhub.dev/google/spice/2 or a path")
    # Before resolving: without TensorFlow a download would be wasted.
    tf = import_tensorflow(handle)
    path = resolve(handle)
    is_hub_module_v1 = tf.io.gfile.exists(_join(path, MODULE_PROTO_FILENAME))
    if tags is None and is_hub_module_v1:
        tags = []
    if not any(tf.io.gfile.exists(_join(path, name)) for name in
               (tf.saved_model.SAVED_MODEL_FILENAME_PB, tf.saved_model.SAVED_MODEL_FILENAME_PBTXT)):
        raise HandleError(
            f"{path} holds neither saved_model.pb nor saved_model.pbtxt, so it is not a TensorFlow SavedModel",
            handle=handle,
            hint="check that the handle names a TensorFlow model, not e.g. a TFLite or TF.js one")
    obj = tf.saved_model.load(path, tags=tags, options=options)
    obj._is_hub_module_v1 = is_hub_module_v1  # read by hub.KerasLayer, as hub.load sets it
    return obj


def _join(path: str, name: str) -> str:
    # Remote paths (gs://...) are URLs: join with "/" whatever the OS.
    return f"{path.rstrip('/')}/{name}" if "://" in path else os.path.join(path, name)
