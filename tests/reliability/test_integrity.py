"""Integrity pins: a handle may pin its archive's digest (``#sha256=<hex>``) or a pins file
(``HUBCACHE_PINS``) may; the bytes are hashed while they stream, and a mismatch raises an
integrity error and commits nothing."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

import hubcache
from hubcache import ConfigError, IntegrityError
from hubcache.core.handles import cache_key
from hubcache.testing import SUFFIX, OriginServer, archive_of, tree_of

from .helpers import EventLog, leftovers, snapshot

SCENARIO = "4. Integrity pin"


@pytest.fixture
def served(model):
    with OriginServer() as origin:
        archive = archive_of(model, "zst")
        url = origin.add("/pinned/model.tar.zst", archive)
        yield origin, url, archive


def assert_nothing_committed(cache_root: str, url: str) -> None:
    key = cache_key(url)
    names = os.listdir(cache_root) if os.path.isdir(cache_root) else []
    assert key not in names and f"{key}.manifest.json" not in names and f"{key}.descriptor.txt" not in names
    assert leftovers(cache_root) == []


def test_matching_pin_streams_once_with_no_archive_copy(served, model, cache_root, tmp_path, figures):
    """A correct pin: one request, hashed on the fly (no archive file appears anywhere on disk
    while it downloads), and the manifest records the same digest."""
    origin, url, archive = served
    digest = hashlib.sha256(archive).hexdigest()
    origin.throttle("/pinned/model.tar.zst", 1 << 20)
    seen_archive_files: list[str] = []
    done = threading.Event()

    def watch() -> None:  # look for anything that starts like the archive while it streams
        while not done.is_set():
            for dirpath, _, names in os.walk(tmp_path):
                for name in names:
                    try:
                        with open(os.path.join(dirpath, name), "rb") as f:
                            if f.read(4) == archive[:4]:
                                seen_archive_files.append(name)
                    except OSError:
                        pass
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        path = hubcache.resolve(f"{url}#sha256={digest}")
    finally:
        done.set()
        watcher.join()
    assert tree_of(path) == tree_of(model)
    assert origin.count("/pinned/model.tar.zst") == 1
    from hubcache.stores.localstore import LocalStore

    manifest = LocalStore(cache_root).read_manifest(cache_key(url))
    assert manifest.archive["sha256"] == digest and manifest.archive["bytes"] == len(archive)
    assert seen_archive_files == [], "an archive copy was written to disk"
    figures.update(run="a correct #sha256 pin, .tar.zst streamed at 1 MiB/s while the disk is watched",
                   archive_requests=1, archive_copies_on_disk=0)


@pytest.mark.parametrize("fmt", ["gz", "zst", "tar"])
def test_wrong_pin_raises_and_commits_nothing(fmt, model, cache_root, tmp_path, figures):
    """A wrong pin: IntegrityError naming the handle and both digests; nothing committed, nothing
    left, and the next resolve with the right pin works."""
    with OriginServer() as origin:
        archive = archive_of(model, fmt)
        url = origin.add(f"/pinned/model-{fmt}{SUFFIX[fmt]}", archive)
        wrong = hashlib.sha256(archive + b"x").hexdigest()
        before = snapshot(str(tmp_path / "tmp"))
        with pytest.raises(IntegrityError) as info:
            hubcache.resolve(f"{url}#sha256={wrong}")
        message = str(info.value)
        assert url in message and wrong in message and hashlib.sha256(archive).hexdigest() in message
        assert "\n" not in message
        assert_nothing_committed(cache_root, url)
        assert snapshot(str(tmp_path / "tmp")) == before
        right = hashlib.sha256(archive).hexdigest()
        assert tree_of(hubcache.resolve(f"{url}#sha256={right}")) == tree_of(model)
        assert origin.count() == 2
    figures.update(run=f"a wrong #sha256 pin on a .{fmt} archive", error=type(info.value).__name__,
                   committed=0, message=message[:160])


def test_pin_holds_across_a_resumed_download(served, model, cache_root, figures):
    """The digest is of the bytes as served, even when they arrive in two ranged responses."""
    origin, url, archive = served
    digest = hashlib.sha256(archive).hexdigest()
    origin.fail("/pinned/model.tar.zst", ("cut", len(archive) // 3))
    with EventLog() as log:
        path = hubcache.resolve(f"{url}#sha256={digest}")
    assert tree_of(path) == tree_of(model)
    ranges = [r.headers.get("Range") for r in origin.requests]
    assert ranges == [None, f"bytes={len(archive) // 3}-"]
    assert len(log.kinds("download_retry")) == 1
    figures.update(run="a pinned download cut at 1/3 and resumed with Range", requests=len(ranges),
                   bytes_served=sum(r.sent for r in origin.requests), archive_bytes=len(archive))


def test_pinned_handle_refuses_a_cached_entry_from_other_bytes(served, model, cache_root, figures):
    """An entry cached from other bytes (the origin changed the file) does not satisfy a pin:
    IntegrityError on the hit, with no network call."""
    origin, url, archive = served
    hubcache.resolve(url)
    other = hashlib.sha256(archive + b"other").hexdigest()
    with pytest.raises(IntegrityError) as info:
        hubcache.resolve(f"{url}#sha256={other}")
    assert origin.count() == 1
    assert "hubcache rm" in str(info.value)
    figures.update(run="pinned resolve of a handle already cached from different bytes",
                   error=type(info.value).__name__, archive_requests=1)


def test_pins_file_in_configuration(served, model, cache_root, tmp_path, monkeypatch, figures):
    """HUBCACHE_PINS pins unmodified handles: the right digest passes, a wrong one raises and
    commits nothing, a disagreeing handle pin and a malformed file are configuration errors."""
    origin, url, archive = served
    digest = hashlib.sha256(archive).hexdigest()
    pins = tmp_path / "models.pins"
    monkeypatch.setenv("HUBCACHE_PINS", str(pins))

    pins.write_text(f"# pinned models\n{url}  sha256={'0' * 64}\n")
    with pytest.raises(IntegrityError):
        hubcache.resolve(url)
    assert_nothing_committed(cache_root, url)

    pins.write_text(f"# pinned models\n\n{url}  {digest}  # a bare hex digest is SHA-256\n")
    path = hubcache.resolve(url)
    assert tree_of(path) == tree_of(model)

    with pytest.raises(ConfigError, match="make the two pins agree"):
        hubcache.resolve(f"{url}#sha256={'1' * 64}")
    assert hubcache.resolve(f"{url}#sha256={digest}") == path

    pins.write_text(f"{url} sha256=abc\n")
    with pytest.raises(ConfigError, match=r"models\.pins:1"):
        hubcache.resolve(url + "?other")
    monkeypatch.setenv("HUBCACHE_PINS", str(tmp_path / "missing.pins"))
    with pytest.raises(ConfigError, match="missing.pins"):
        hubcache.resolve(url + "?another")
    figures.update(run="HUBCACHE_PINS file: wrong digest, right digest, disagreeing handle pin, "
                       "malformed line, missing file", archive_requests=origin.count())
