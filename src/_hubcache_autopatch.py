"""Patch tensorflow_hub as soon as it is imported: hubcache's start-up hook.

hubcache's wheel puts two start-up files beside this module in site-packages:

* ``hubcache-autopatch.pth`` (Python <= 3.14), one line::

      import os; 'HUBCACHE_PATCH_TFHUB' in os.environ and __import__('_hubcache_autopatch').startup()

  so an interpreter started without the variable imports nothing (``os`` is already loaded);
* ``hubcache-autopatch.start`` (Python >= 3.15, PEP 829: a ``.start`` file supersedes the ``import``
  lines of the ``.pth`` of the same name), naming :func:`startup`.

With ``HUBCACHE_PATCH_TFHUB=1``, :func:`startup` puts a finder at the front of ``sys.meta_path``
that waits for ``import tensorflow_hub``, lets it run unchanged, and right after its module body
finishes (its own resolvers are registered by then) calls
``hubcache.tfhub_patch.patch_tensorflow_hub()``, which registers hubcache's resolver last, so it is
asked first. Nothing of hubcache, TensorFlow or tensorflow_hub is imported before that.
:func:`hubcache.patch_tensorflow_hub` uses the same finder when it is called before
tensorflow_hub is imported.

This module is imported at interpreter start-up: standard library only, and nothing it does may
raise out of :func:`startup` (a broken hook must never stop Python from starting).
"""

import _thread
import os
import sys

# Annotations only (quoted): with the variable set, this module is imported at every interpreter
# start, where typing, threading, importlib.machinery and even __future__ would cost more than
# everything else here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

#: The environment variable that turns the hook on (any value but ``""``, ``0``, ``false``,
#: ``no`` or ``off``).
ENV = "HUBCACHE_PATCH_TFHUB"
#: The module whose import is awaited.
TARGET = "tensorflow_hub"

_lock = _thread.allocate_lock()


def enabled(value: "str | None" = None) -> bool:
    """True if ``value`` (default: the environment's ``HUBCACHE_PATCH_TFHUB``) turns the hook on."""
    if value is None:
        value = os.environ.get(ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def startup() -> None:
    """Interpreter start-up (from the ``.pth`` or ``.start`` file): arm the hook if the variable
    says so. Never raises."""
    try:
        if enabled():
            arm()
    except Exception as error:  # pragma: no cover - a hook must not stop the interpreter
        sys.stderr.write(f"hubcache: {ENV} is set, but tensorflow_hub cannot be patched: {error!r}\n")


class _Loader:
    """Runs the real loader, then the patch. Everything else is the real loader's."""

    def __init__(self, loader: "Any", finder: "PostImportFinder") -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "ModuleType") -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # The module keeps the loader it would have had without us.
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        # Only a module whose body finished: a failed import is retried as the user retries it.
        self._finder.imported(module)


class PostImportFinder:
    """A meta path finder that answers nothing itself: it asks the finders after it for
    :data:`TARGET` and wraps the loader they return, so :func:`_patch` runs once the module has
    been executed. It leaves ``sys.meta_path`` once it has done so, or when disarmed."""

    def find_spec(self, fullname: str, path: "Sequence[str] | None" = None,
                  target: "ModuleType | None" = None) -> "ModuleSpec | None":
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, PostImportFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec: "ModuleSpec | None" = find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None  # a namespace package or a legacy loader: let the import go as it would
            spec.loader = _Loader(spec.loader, self)  # type: ignore[assignment]
            return spec
        return None

    def imported(self, module: "ModuleType") -> None:
        with _lock:
            if self not in sys.meta_path:
                return  # disarmed while the module was being imported
            sys.meta_path.remove(self)
        _patch()


def _patch() -> None:
    try:
        from hubcache.tfhub_patch import patch_tensorflow_hub

        patch_tensorflow_hub()
    except Exception as error:  # the user's import of tensorflow_hub must still succeed
        import warnings

        warnings.warn(f"hubcache could not patch tensorflow_hub: {type(error).__name__}: {error}",
                      RuntimeWarning, stacklevel=2)


def _finders() -> "list[PostImportFinder]":
    return [finder for finder in sys.meta_path if isinstance(finder, PostImportFinder)]


def arm() -> None:
    """Patch tensorflow_hub when it is next imported (idempotent, thread-safe)."""
    with _lock:
        if not _finders():
            sys.meta_path.insert(0, PostImportFinder())


def disarm() -> None:
    """Undo :func:`arm` (if tensorflow_hub has not been imported since)."""
    with _lock:
        for finder in _finders():
            sys.meta_path.remove(finder)


def armed() -> bool:
    """True while the hook waits for tensorflow_hub to be imported."""
    return bool(_finders())
