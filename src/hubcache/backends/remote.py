"""The ``remote`` backend: read the model where it lies (``TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED``).

Nothing is cached and nothing is written locally: a tfhub.dev-style handle is turned into the
``gs://`` directory its server names (``?tf-hub-format=uncompressed`` answers ``303`` with that
path as its body), which is checked to exist; a ``gs://`` (or any fsspec, or local) directory
handle resolves to itself. TensorFlow then reads the variables straight from the bucket. An
archive cannot be read in place, so an archive handle is an error here.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from ..core.backend import Backend
from ..core.errors import (
    ConfigError,
    DownloadError,
    HandleError,
    MissingDependencyError,
)
from ..core.handles import Handle
from ..core.locate import Location
from ..plugins.markers import hookimpl


def _filesystem(path: str) -> tuple[Any, str]:
    if path.startswith(("gs://", "gcs://")):
        from .gcs import gcs_filesystem

        fs = gcs_filesystem()
        return fs, fs._strip_protocol(path)
    import fsspec

    try:
        return cast("tuple[Any, str]", fsspec.core.url_to_fs(path))  # fsspec is untyped
    except ImportError as error:
        scheme = path.split("://", 1)[0]
        raise MissingDependencyError(f"cannot open {scheme}:// URLs: {error}",
                                     hint=f"install the fsspec implementation for {scheme}://") from None


class RemoteBackend(Backend):
    """Resolves to the remote directory itself; no cache."""

    name = "remote"
    description = "no cache: return the remote (gs://) directory (TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED)"

    def resolve(self, handle: Handle, location: Location) -> str:
        if location.kind == "directory":
            return location.url
        if location.kind == "archive":
            raise ConfigError(
                "this is an archive, and archives need a cache backend; UNCOMPRESSED (the remote "
                "backend) reads only directories",
                hint="unset TFHUB_MODEL_LOAD_FORMAT (or set it to COMPRESSED), or set HUBCACHE_BACKEND=tmp")
        from ..download.pointer import follow_pointer

        path = follow_pointer(location.url, timeout=self.config.timeout,
                              retries=self.config.retries)
        fs, fs_path = _filesystem(path)
        try:
            exists = fs.isdir(fs_path)
        except Exception as error:
            raise DownloadError(f"cannot check {path} (named by {location.url}): {type(error).__name__}: {error}",
                                url=path) from None
        if not exists:
            raise HandleError(f"the server points to {path} for the uncompressed model, but there is no such "
                              "directory", hint="set TFHUB_MODEL_LOAD_FORMAT=COMPRESSED to download the archive")
        return path


@hookimpl
def hubcache_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(RemoteBackend)
