"""The ``gcs`` backend: a download-and-decompress cache in a ``gs://`` bucket many hosts share.

Selected by ``TFHUB_CACHE_DIR=gs://bucket/prefix`` (or ``HUBCACHE_BACKEND=gcs`` with the root in
``TFHUB_CACHE_DIR``). This is the Colab TPU workaround: the TPU worker cannot read the notebook
host's disk, but it can read the bucket. The commit protocol and the lease are those of
:mod:`hubcache.stores.objectstore`; this module builds the gcsfs filesystem and spells the lease's
conditional rewrite in GCS terms (:mod:`hubcache.backends.gcs_store`: ``ifGenerationMatch``).

Settings: ``HUBCACHE_GCS_TOKEN`` (gcsfs ``token``: ``anon``, ``google_default``, ``cloud``, or a
service-account JSON file; default: gcsfs's own credential chain, or ``anon`` when an emulator is
set), ``HUBCACHE_LEASE_TTL``. ``STORAGE_EMULATOR_HOST`` points gcsfs at an emulator
(fake-gcs-server), as for every Google client.

gcsfs is the optional extra ``hubcache[gcs]``, imported only when a gs:// path is used.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from ..plugin import MissingDependencyError, ObjectStoreBackend, hookimpl

if TYPE_CHECKING:  # pragma: no cover (at run time the store class is imported when it is built)
    from ..plugin import Backend, ObjectStore

ENV_TOKEN = "HUBCACHE_GCS_TOKEN"


def emulator() -> str | None:
    """The GCS emulator ``STORAGE_EMULATOR_HOST`` names, if any (``default`` means none)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    return host if host and host != "default" else None


def gcs_filesystem() -> Any:
    """A gcsfs filesystem configured from the environment.

    Raises:
        MissingDependencyError: if gcsfs is not installed.
    """
    if emulator() and "gcsfs" not in sys.modules:
        # gcsfs's experimental zonal/HNS support probes each bucket with a call an emulator does
        # not answer, costing 60 s per bucket; emulators have no such buckets anyway.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import gcsfs
    except ImportError:
        raise MissingDependencyError("gs:// paths need gcsfs, which is not installed",
                                     hint="pip install 'hubcache[gcs]'") from None
    token = os.environ.get(ENV_TOKEN) or None
    if token is None and emulator():
        # An emulator takes no credentials, and must not be sent real ones; and gcsfs releases
        # before 2025 try the GCE metadata server first (15 s per process where there is none).
        token = "anon"
    # Listings are re-read on every use anyway (other hosts write the same bucket).
    return gcsfs.GCSFileSystem(token=token, use_listings_cache=False)


class GcsBackend(ObjectStoreBackend):
    """A cache in a Google Cloud Storage bucket, shared by every host that can read it."""

    name = "gcs"
    scheme = "gs"
    protocols = ("gs", "gcs")
    description = "cache in a gs:// bucket shared by many hosts (TFHUB_CACHE_DIR=gs://bucket/prefix)"
    settings = {
        ENV_TOKEN: "gcsfs token: anon, google_default, cloud, or a service-account JSON file",
        "STORAGE_EMULATOR_HOST": "a GCS emulator's URL (tests), as for every Google client",
    }
    cache_dir_hint = "(or --tfhub_cache_dir)"

    def filesystem(self) -> Any:
        return gcs_filesystem()

    def store_class(self) -> type[ObjectStore]:
        from .gcs_store import GcsObjectStore  # lazily: plugins load on every command

        return GcsObjectStore

    def describe(self) -> dict[str, object]:
        facts = super().describe()
        default = "anon (an emulator takes none)" if emulator() else "gcsfs default credentials"
        facts["token"] = os.environ.get(ENV_TOKEN) or default
        if emulator():
            facts["emulator"] = emulator()
        return facts


@hookimpl
def hubcache_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(GcsBackend)
