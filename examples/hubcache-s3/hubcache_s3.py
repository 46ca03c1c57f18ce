"""hubcache-s3: a hubcache backend that keeps its cache in an S3 bucket.

Selected by ``TFHUB_CACHE_DIR=s3://bucket/prefix`` (or ``HUBCACHE_BACKEND=s3`` with the root in
``TFHUB_CACHE_DIR``). Every host that can read the bucket shares the cache, as with hubcache's
built-in ``gcs`` backend, and with the same protocol (:mod:`hubcache.stores.objectstore`): the
files are uploaded to their final names, the descriptor holding the manifest is created last and
is the commit, and a lease object with a heartbeat, there only while a download runs, saves the
bandwidth of concurrent downloads. Once resolves finish the bucket holds exactly what
tensorflow_hub's cache holds: ``<sha1>/...`` and ``<sha1>.descriptor.txt`` per model.

This module is a third-party plugin: it imports only hubcache's stable plugin API,
:mod:`hubcache.plugin` (``hookimpl``, ``ObjectStoreBackend``, ``ObjectStore``, the errors), and s3fs.

Settings (environment):
    HUBCACHE_S3_ENDPOINT_URL: an S3-compatible endpoint (MinIO, moto, Ceph...). botocore's own
        ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` are honoured too when this is unset.
    HUBCACHE_S3_PROFILE: the AWS profile to use (default: botocore's credential chain:
        ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles...).
    HUBCACHE_LEASE_TTL, HUBCACHE_LOCK_TIMEOUT: hubcache's own, as for ``gcs``.

s3fs (and so botocore) and the store class (:mod:`hubcache_s3_store`, which builds on hubcache's
object-store protocol) are imported only when an ``s3://`` cache is used, so loading the plugin
costs ``hubcache plugins`` and every other command nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from hubcache.plugin import MissingDependencyError, ObjectStoreBackend, hookimpl

if TYPE_CHECKING:
    from hubcache_s3_store import S3ObjectStore

__version__ = "0.1.0"

ENV_ENDPOINT = "HUBCACHE_S3_ENDPOINT_URL"
ENV_PROFILE = "HUBCACHE_S3_PROFILE"


def endpoint_url() -> str | None:
    """The endpoint the settings name, or ``None`` for botocore's default (AWS itself)."""
    for name in (ENV_ENDPOINT, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_filesystem() -> Any:
    """An s3fs filesystem configured from the environment.

    Raises:
        MissingDependencyError: if s3fs is not installed.
    """
    try:
        import s3fs
    except ImportError:
        raise MissingDependencyError("s3:// cache dirs need s3fs, which is not installed",
                                     hint="pip install hubcache-s3 (it depends on s3fs)") from None
    # Listings are re-read on every use anyway: other hosts write the same bucket.
    return s3fs.S3FileSystem(endpoint_url=endpoint_url(), profile=os.environ.get(ENV_PROFILE) or None,
                             use_listings_cache=False)


class S3Backend(ObjectStoreBackend):
    """A cache in an S3 bucket (``TFHUB_CACHE_DIR=s3://bucket/prefix``), shared by many hosts."""

    name = "s3"
    scheme = "s3"  # owns s3:// cache dirs; messages and hints say s3://bucket/prefix
    description = "cache in an s3:// bucket shared by many hosts (TFHUB_CACHE_DIR=s3://bucket/prefix)"
    # Shown by `hubcache config`; changing one in a running process builds a new backend.
    settings = {
        ENV_ENDPOINT: "S3 endpoint URL (e.g. MinIO, moto); else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL",
        ENV_PROFILE: "AWS credentials profile (default: botocore's credential chain)",
    }

    def filesystem(self) -> Any:
        return s3_filesystem()

    def store_class(self) -> type[S3ObjectStore]:
        # Here, not at the top: the store module imports hubcache's object-store machinery,
        # which only an s3:// cache needs (every hubcache command loads this plugin).
        from hubcache_s3_store import S3ObjectStore

        return S3ObjectStore

    def describe(self) -> dict[str, object]:
        facts = super().describe()
        facts["endpoint"] = endpoint_url() or "AWS (botocore default)"
        facts["profile"] = os.environ.get(ENV_PROFILE) or "botocore default credentials"
        return facts


@hookimpl
def hubcache_register_backends(register):
    """Register the ``s3`` backend."""
    register(S3Backend)


def __getattr__(name: str) -> Any:
    # ``from hubcache_s3 import S3ObjectStore`` keeps working; it loads the store module then.
    if name == "S3ObjectStore":
        from hubcache_s3_store import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
