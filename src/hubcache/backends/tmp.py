"""The ``tmp`` backend (default): a cache in ``tempfile.gettempdir()/tfhub_modules``.

The same place tensorflow_hub uses by default, so the two share entries. Fast, but the OS may
clean it; hubcache detects entries a temp cleaner damaged and rebuilds them.

The temp dir is shared by every user of the machine, and any of them can create
``tfhub_modules`` first. hubcache uses it only when it is a real directory of this process's
user that no one else can write; otherwise (another user's, a link, writable by others) it uses
a per-user directory ``tfhub_modules-<uid>`` beside it, created ``0700``, and says why in an
``INFO`` log line. If that one is unsafe too, using the cache fails with a ``CacheError`` saying
how to fix it (:class:`~hubcache.stores.localstore.LocalStore` checks its root, ``private``, on every
use). ``hubcache config`` shows the root in effect.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from typing import TYPE_CHECKING, Callable

from ..core.backend import Backend, LocalCacheBackend
from ..plugins.markers import hookimpl
from ..stores import safefs

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from ..stores.localstore import LocalStore

logger = logging.getLogger("hubcache")
_explained: set[tuple[str, str]] = set()


def _unsafe(path: str) -> str | None:
    """Why ``path`` cannot be this user's cache root (``None``: absent, or fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot be examined ({error.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != safefs.euid():
        return f"belongs to another user (uid {st.st_uid})"
    if safefs.writable_by_others(st):
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def per_user_root(tmp: str) -> str:
    """The per-user fallback root in the temp dir ``tmp``."""
    return os.path.join(tmp, f"tfhub_modules-{safefs.euid()}")


def default_root(tmp: str) -> str:
    """The cache root in the temp dir ``tmp``: the shared ``tfhub_modules`` when it is safe for
    this user, else the per-user fallback (see the module doc; whether the fallback is safe is
    checked when it is used, so that ``hubcache config`` still shows it)."""
    shared = os.path.join(tmp, "tfhub_modules")
    if not safefs.POSIX:  # pragma: no cover - Windows: per-user temp dirs, no POSIX owners
        return shared
    why = _unsafe(shared)
    if why is None:
        return shared
    fallback = per_user_root(tmp)
    if (shared, why) not in _explained:
        _explained.add((shared, why))
        logger.info("not using %s: it %s; using %s instead", shared, why, fallback)
    return fallback


class TmpBackend(LocalCacheBackend):
    """A download-and-decompress cache in the system temp directory."""

    name = "tmp"
    description = "local cache in the temp dir (default; what tensorflow_hub uses)"

    def default_root(self) -> str:
        return default_root(tempfile.gettempdir())

    def make_store(self, root: str) -> LocalStore:
        store = super().make_store(root)
        tmp = tempfile.gettempdir()
        if store.root in (os.path.join(tmp, "tfhub_modules"), per_user_root(tmp)):
            # In a directory every user can write: the root must be our own (checked again on
            # every use, since another user may create it between this choice and our mkdir).
            store.private = True
            if store.root == per_user_root(tmp):
                store.create_mode = 0o700
        return store


@hookimpl
def hubcache_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(TmpBackend)
