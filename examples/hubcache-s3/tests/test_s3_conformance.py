"""hubcache's conformance suite, run against the s3 backend on moto's S3 server."""

from __future__ import annotations

import pytest

from hubcache.testing import ObjectStoreConformance
from hubcache_s3 import S3Backend


class TestS3Conformance(ObjectStoreConformance):
    @pytest.fixture
    def backend(self, conformance_config, s3_root):
        return S3Backend(conformance_config.replace(cache_dir=s3_root, lease_ttl=5.0))
