"""Test kit for hubcache and its backends: model and archive builders, a local origin server,
and the conformance suite every cache backend (built-in or third-party) runs against itself.

A third party tests its backend with one subclass (``ObjectStoreConformance`` for a backend
whose store is an object store, ``CacheBackendConformance`` for any other cache backend)::

    from hubcache.testing import ObjectStoreConformance

    class TestS3Conformance(ObjectStoreConformance):
        @pytest.fixture
        def backend(self, s3_bucket):
            return S3Backend(load_config().replace(cache_dir=f"s3://{s3_bucket}/cache"))

The suite needs pytest; nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .testkit import (
    FORMATS,
    SETTINGS,
    SUFFIX,
    OriginServer,
    ReplaceMidRead,
    Request,
    Route,
    archive_of,
    build_model_dir,
    compress,
    hostile_archives,
    instances_of,
    isolate,
    read_tree,
    replacing_mid_read,
    routed_hosts,
    same_layout_models,
    tar_directory,
    tree_of,
)

if TYPE_CHECKING:  # pragma: no cover - at run time the suite is imported when asked for (below)
    from .conformance import CacheBackendConformance, ObjectStoreConformance

__all__ = ["FORMATS", "SETTINGS", "SUFFIX", "OriginServer", "ReplaceMidRead", "Request", "Route", "archive_of",
           "build_model_dir", "compress", "hostile_archives", "instances_of", "isolate", "read_tree", "replacing_mid_read",
           "routed_hosts", "same_layout_models", "tar_directory", "tree_of"]


def __getattr__(name: str) -> type:
    # The conformance suite needs pytest; the builders and the server do not (the demo uses
    # them), so the suite is imported only when asked for.
    if name in ("CacheBackendConformance", "ObjectStoreConformance"):
        from . import conformance

        suite: type = getattr(conformance, name)
        return suite
    raise AttributeError(name)
