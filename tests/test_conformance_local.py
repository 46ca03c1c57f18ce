"""The built-in local backends pass the conformance suite every backend runs."""

from __future__ import annotations

import pytest

from hubcache.backends.home import HomeBackend
from hubcache.backends.tmp import TmpBackend
from hubcache.testing import CacheBackendConformance


class TestTmpConformance(CacheBackendConformance):
    TFHUB_LAYOUT = True

    @pytest.fixture
    def backend(self, conformance_config, tmp_path):
        backend = TmpBackend(conformance_config)
        assert backend.root.startswith(str(tmp_path))
        return backend


class TestHomeConformance(CacheBackendConformance):
    TFHUB_LAYOUT = True

    @pytest.fixture
    def backend(self, conformance_config, tmp_path):
        backend = HomeBackend(conformance_config)
        assert backend.root.startswith(str(tmp_path / "home-cache"))
        return backend
