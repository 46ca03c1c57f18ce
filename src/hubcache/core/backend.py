"""The backend base classes a plugin subclasses."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from .config import Config
from .errors import ConfigError
from .handles import Handle, parse_handle
from .locate import Location

if TYPE_CHECKING:  # pragma: no cover
    from ..stores.localstore import LocalStore
    from ..stores.objectstore import ObjectStore
    from .manifest import Manifest
    from .store import EntryInfo, Store


class Backend(ABC):
    """A way of turning a located handle into a loadable path.

    Subclasses set :attr:`name` (unique among installed backends) and implement :meth:`resolve`.
    Instances are created by hubcache with the effective :class:`~hubcache.core.config.Config`.

    Attributes:
        name: the backend's name, as ``HUBCACHE_BACKEND`` spells it.
        protocols: cache-dir URL schemes this backend owns: a ``TFHUB_CACHE_DIR`` with one of them
            selects this backend (``""`` stands for a plain local path).
        description: one line for ``hubcache config`` and ``hubcache plugins``.
        settings: environment variables the backend reads itself (name -> one line of help):
            ``hubcache config`` shows their values and sources, and changing one in a running
            process builds a new backend instance instead of reusing the old one.
    """

    name: ClassVar[str] = ""
    protocols: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    settings: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Config):
        self.config = config

    @abstractmethod
    def resolve(self, handle: Handle, location: Location) -> str:
        """Return a path (local or fsspec URL) holding the model."""

    def describe(self) -> dict[str, object]:
        """Facts about this backend instance, for ``hubcache config``."""
        return {"name": self.name, "description": self.description}

    def resolve_checked(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        """Resolve, and return a cheap check that the path is still valid for later calls.

        The resolver memoises the path and, on later calls in this process, runs only the check
        (``None``: the path stays valid). Cache backends return a one-``stat`` check.
        """
        return self.resolve(handle, location), None


class CacheBackend(Backend):
    """A backend that downloads archives into a cache held by a :class:`~hubcache.core.store.Store`.

    Subclasses implement :meth:`default_root` and :meth:`make_store`; the download, safe
    extraction, manifest and commit protocol are shared (``hubcache.core.cache``).
    """

    @abstractmethod
    def default_root(self) -> str:
        """The cache root used when ``TFHUB_CACHE_DIR`` does not name one for this backend."""

    @abstractmethod
    def make_store(self, root: str) -> Store:
        """Build the store for ``root``."""

    @property
    def root(self) -> str:
        """The effective cache root: ``TFHUB_CACHE_DIR`` if it is one of ours, else the default."""
        cache_dir = self.config.cache_dir
        if cache_dir:
            parsed = parse_handle(str(cache_dir))
            scheme = parsed.scheme
            if scheme == "file" and "" in self.protocols:
                return parsed.local_path  # a local store wants a path, not a file:// URL
            if scheme in self.protocols:
                return str(cache_dir)
            if not self.protocols:
                raise ConfigError(f"backend {self.name!r} cannot use cache dir {cache_dir!r}")
        return self.default_root()

    @property
    def store(self) -> Store:
        """The store (built once per backend instance)."""
        store = self.__dict__.get("_store")
        if store is None:
            store = self.__dict__["_store"] = self.make_store(self.root)
        return store

    def resolve(self, handle: Handle, location: Location) -> str:
        return self.resolve_checked(handle, location)[0]

    def resolve_checked(self, handle: Handle, location: Location) -> tuple[str, Callable[[], bool] | None]:
        from .cache import resolve_in_store

        if location.kind == "directory":
            # As tensorflow_hub does: a directory handle is already loadable.
            return location.url, None
        if location.kind == "pointer":
            raise ConfigError(
                f"backend {self.name!r} caches archives; this handle points to an uncompressed model",
                hint="set TFHUB_MODEL_LOAD_FORMAT=COMPRESSED or choose the remote backend")
        path, manifest = resolve_in_store(self.store, handle, location, self.config, backend=self.name,
                                          on_commit=self.after_commit)
        return path, self.store.validator(path, manifest)

    def after_commit(self, handle: Handle, path: str, manifest: Manifest) -> None:
        """Called after this backend downloaded and committed a new entry; default: nothing.

        The ``home`` backend enforces its size budget here (``hubcache.maintenance.prune``).
        """

    def entries(self) -> Iterator[EntryInfo]:
        """Every entry in this backend's cache."""
        return self.store.entries()

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "description": self.description, "root": self.root}


class ObjectStoreBackend(CacheBackend):
    """A cache backend whose entries live in an object store reached through fsspec.

    The shared glue of such backends: the cache root must be a URL of :attr:`scheme` naming a
    bucket (anything else is a :class:`~hubcache.core.errors.ConfigError` saying so), the store
    is an :class:`~hubcache.stores.objectstore.ObjectStore` (or :meth:`store_class`) built with
    ``lease_ttl`` and ``lock_timeout`` from the config, and :meth:`describe` adds ``lease_ttl``.
    Subclasses set :attr:`scheme` and implement :meth:`filesystem`; a service with its own
    conditional writes returns its store class from :meth:`store_class`.

    Attributes:
        scheme: the URL scheme of the cache root (``"s3"`` for ``s3://bucket/prefix``), as
            messages spell it. :attr:`~Backend.protocols` defaults to ``(scheme,)``; set it as
            well to own more spellings (``gcs`` owns ``gs`` and ``gcs``).
        cache_dir_hint: extra words for the hint when no usable root is set, e.g. another way to
            set one that this backend's users know (``gcs``: the absl flag, for Colab).
    """

    scheme: ClassVar[str] = ""
    cache_dir_hint: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.scheme and not cls.protocols:
            cls.protocols = (cls.scheme,)

    @abstractmethod
    def filesystem(self) -> Any:
        """The fsspec filesystem the store talks through, configured from the environment.

        Import the client library here, not at module level: every hubcache command loads every
        plugin, and only the selected backend builds its store.

        Raises:
            MissingDependencyError: if the client library is not installed.
        """

    def store_class(self) -> type[ObjectStore]:
        """The store class (default: the generic :class:`~hubcache.stores.objectstore.ObjectStore`,
        whose versioned primitives only emulate preconditions: override it for real ones)."""
        from ..stores.objectstore import (
            ObjectStore,  # lazily: plugins load on every command
        )

        return ObjectStore

    def _example_root(self) -> str:
        return f"{self.scheme}://bucket/prefix"

    def default_root(self) -> str:
        """Refuse: an object-store cache has no default root, ``TFHUB_CACHE_DIR`` must name one.

        Raises:
            ConfigError: always, saying what ``TFHUB_CACHE_DIR`` is and what it should be.
        """
        cache_dir = self.config.cache_dir
        url = f"{_article(self.scheme)} {self.scheme}:// URL"
        found = f"TFHUB_CACHE_DIR is {cache_dir!r}, not {url}" if cache_dir else "TFHUB_CACHE_DIR is not set"
        extra = f" {self.cache_dir_hint}" if self.cache_dir_hint else ""
        raise ConfigError(f"the {self.name} backend keeps its cache in a bucket, but {found}",
                          hint=f"set TFHUB_CACHE_DIR={self._example_root()}{extra}")

    def make_store(self, root: str) -> ObjectStore:
        """Build :meth:`store_class` on :meth:`filesystem` for ``root``, with the config's
        ``lease_ttl`` and ``lock_timeout``, and ``connections`` parallel uploads.

        Raises:
            ConfigError: ``root`` names no bucket.
            MissingDependencyError: from :meth:`filesystem`.
        """
        if not root.split("://", 1)[-1].strip("/"):
            raise ConfigError(f"cache dir {root!r} names no bucket",
                              hint=f"set TFHUB_CACHE_DIR={self._example_root()}")
        return self.store_class()(root, self.filesystem(), lease_ttl=self.config.lease_ttl,
                                  lock_timeout=self.config.lock_timeout, workers=self.config.connections)

    def describe(self) -> dict[str, object]:
        facts = super().describe()
        facts["lease_ttl"] = self.config.lease_ttl
        return facts


def _article(scheme: str) -> str:
    """``a`` or ``an`` before ``scheme``: one without vowels, or of up to three letters, is read
    letter by letter (an s3, a gs, an hdfs), a longer one as a word (a memory, an azure)."""
    if not scheme:
        return "a"
    spelled = len(scheme) <= 3 or not any(c in "aeiou" for c in scheme.lower())
    return "an" if scheme[0].lower() in ("aefhilmnorsx" if spelled else "aeiou") else "a"


class LocalCacheBackend(CacheBackend):
    """A cache backend on the local filesystem; subclasses only choose :meth:`default_root`."""

    protocols = ("",)

    def make_store(self, root: str) -> LocalStore:
        from ..stores.localstore import LocalStore

        self._check_root(root)
        return LocalStore(root, lock_timeout=self.config.lock_timeout)

    def _check_root(self, root: str) -> None:
        """Refuse a ``TFHUB_CACHE_DIR`` that is, or lies under, something other than a directory
        (a file): a setting to fix, said in one line. (A default root that cannot be made is
        the store's ``CacheError``: a tier chain skips such a tier.)"""
        setting = self.config.settings.get("cache_dir")
        if setting is None or not setting.value:
            return
        probe = os.path.abspath(root)
        while not os.path.isdir(probe):
            # A file, a FIFO, a dangling link... (isdir again: another thread or process may
            # have made the directory between the two looks)
            if os.path.lexists(probe) and not os.path.isdir(probe):
                raise ConfigError(f"{setting.origin}={setting.value!r} cannot hold a cache: {probe} is not a "
                                  "directory", hint=f"point {setting.origin} at a directory, or move {probe} away")
            parent = os.path.dirname(probe)
            if parent == probe:
                return
            probe = parent
