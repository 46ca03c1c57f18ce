"""The conformance suite every cache backend runs against itself (re-exported as
``hubcache.testing.CacheBackendConformance``). Requires pytest."""

from __future__ import annotations

import os

import pytest

from .testing import FORMATS, SUFFIX, OriginServer, archive_of, build_model_dir, hostile_archives, read_tree, tree_of


class CacheBackendConformance:
    """What every cache backend must do. Subclass it in a test module and provide a ``backend``
    fixture returning a fresh instance of your backend (with its own empty cache root).

    The suite starts its own origin server; it calls ``backend.resolve`` directly, so no
    environment variables are needed. Small limits are set through ``Config.replace``: build your
    backend from the ``conformance_config`` fixture to have them.
    """

    MAX_BYTES = 1 << 20
    MAX_MEMBERS = 500

    @pytest.fixture
    def conformance_config(self):
        from hubcache.core.config import load_config

        return load_config().replace(max_archive_bytes=self.MAX_BYTES, max_members=self.MAX_MEMBERS,
                                     retries=1, timeout=10.0)

    @pytest.fixture
    def backend(self, conformance_config):  # pragma: no cover - subclasses provide it
        raise NotImplementedError("override the `backend` fixture")

    @pytest.fixture
    def origin(self):
        with OriginServer() as server:
            yield server

    @pytest.fixture
    def model(self, tmp_path):
        return build_model_dir(tmp_path / "model", weights_bytes=200_000, shards=2)

    # helpers

    def resolve(self, backend, url: str) -> str:
        from hubcache.core.handles import parse_handle
        from hubcache.core.locate import locate

        handle = parse_handle(url)
        return backend.resolve(handle, locate(handle, "COMPRESSED"))

    def fresh(self, backend):
        """A new instance of the same backend on the same root (no in-memory state)."""
        return type(backend)(backend.config)

    def filesystem(self, backend, path: str):
        """``(fs, path)`` to read an entry with: the store's own filesystem when it has one (so a
        backend configured by its own settings, e.g. an endpoint URL, is read the same way)."""
        import fsspec

        fs = getattr(backend.store, "fs", None)
        if fs is None:
            return fsspec.core.url_to_fs(path)
        return fs, fs._strip_protocol(path)

    def read(self, backend, path: str) -> dict[str, bytes]:
        """Every file of an entry, read through the backend's filesystem."""
        return read_tree(path, self.filesystem(backend, path)[0])

    def committed_keys(self, backend) -> set[str]:
        return {e.key for e in backend.entries() if e.state == "committed"}

    # the suite

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_miss_then_hit_every_format(self, backend, origin, model, fmt):
        url = origin.add(f"/m{SUFFIX[fmt]}", archive_of(model, fmt))
        path = self.resolve(backend, url)
        assert self.read(backend, path) == tree_of(model)
        assert origin.count(f"/m{SUFFIX[fmt]}") == 1
        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count() == 1, "a hit must not contact the origin"

    def test_layout_matches_tensorflow_hub(self, backend, origin, model):
        from hubcache.core.handles import cache_key

        url = origin.add("/layout.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        key = cache_key(url)
        assert path.rstrip("/").endswith(key)
        fs, root = self.filesystem(backend, path)
        parent = root.rstrip("/")[: -len(key)]
        assert fs.exists(parent + key + ".descriptor.txt")
        assert fs.exists(parent + key + ".manifest.json")
        assert b"Module: " + url.encode() in fs.cat_file(parent + key + ".descriptor.txt")

    def test_redirect_and_suffixless_url(self, backend, origin, model):
        origin.add("/blob/abc", archive_of(model, "zst"))
        url = origin.redirect("/download/model", "/blob/abc")
        path = self.resolve(backend, url + "?token=1")
        assert self.read(backend, path) == tree_of(model)

    def test_tfhub_style_handle(self, backend, origin, model):
        handle = origin.add_tfhub_model("/google/tiny/1", archive_of(model))
        path = self.resolve(backend, handle)
        assert self.read(backend, path) == tree_of(model)
        assert [r.query for r in origin.requests if r.path == "/google/tiny/1"] == ["tf-hub-format=compressed"]

    def test_manifest_is_the_commit(self, backend, origin, model):
        from hubcache.core.handles import cache_key

        url = origin.add("/c.tar.gz", archive_of(model))
        path = self.resolve(backend, url)
        fs, root = self.filesystem(backend, path)
        fs.rm(root.rstrip("/")[: -40] + cache_key(url) + ".manifest.json")
        assert cache_key(url) not in self.committed_keys(self.fresh(backend))
        assert self.resolve(self.fresh(backend), url) == path
        assert origin.count("/c.tar.gz") == 2, "an entry without a manifest must be rebuilt"
        assert self.read(backend, path) == tree_of(model)

    @pytest.mark.parametrize("name", sorted(hostile_archives(max_bytes=1024, max_members=10)))
    def test_refuses_bad_archive_and_commits_nothing(self, backend, origin, name):
        from hubcache.core.errors import ArchiveError, DownloadError

        body = hostile_archives(max_bytes=self.MAX_BYTES, max_members=self.MAX_MEMBERS)[name]
        url = origin.add(f"/bad/{name}.tar.gz", body)
        with pytest.raises((ArchiveError, DownloadError)):
            self.resolve(backend, url)
        assert not self.committed_keys(self.fresh(backend))
        assert not os.path.exists("/tmp/hubcache-escape.txt")

    @pytest.mark.parametrize("status", [404, 500])
    def test_http_errors_name_the_status(self, backend, origin, status):
        from hubcache.core.errors import DownloadError

        url = origin.add("/gone.tar.gz", b"", status=status)
        with pytest.raises(DownloadError) as info:
            self.resolve(backend, url)
        assert info.value.status == status and str(status) in str(info.value)
        assert not self.committed_keys(self.fresh(backend))

    def test_cut_connection_commits_nothing_then_recovers(self, backend, origin, model):
        from hubcache.core.errors import DownloadError

        data = archive_of(model, "gz")
        url = origin.add("/cut.tar.gz", data, ranges=False)
        # One cut per attempt the backend's config allows (retries + 1), so the first resolve fails.
        attempts = int(backend.config.get("retries", 0)) + 1
        origin.fail("/cut.tar.gz", *[("cut", len(data) // 2)] * attempts)
        with pytest.raises(DownloadError):
            self.resolve(backend, url)
        assert not self.committed_keys(self.fresh(backend))
        path = self.resolve(self.fresh(backend), url)
        assert self.read(backend, path) == tree_of(model)

    def test_entries_and_remove(self, backend, origin, model):
        from hubcache.core.handles import cache_key

        url = origin.add("/e.tar.gz", archive_of(model))
        self.resolve(backend, url)
        entries = {e.key: e for e in backend.entries()}
        assert entries[cache_key(url)].state == "committed"
        assert entries[cache_key(url)].size == sum(len(v) for v in tree_of(model).values())
        assert backend.store.remove(cache_key(url))
        assert cache_key(url) not in self.committed_keys(self.fresh(backend))
