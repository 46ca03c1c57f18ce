"""``hubcache.resolve`` end to end: every format, redirects, local and fsspec handles, hits that
never touch the network (also from a new process), pinned digests, damaged entries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import fsspec
import pytest

import hubcache
from hubcache import ArchiveError, IntegrityError, UnsafeArchiveError
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import FORMATS, SUFFIX, archive_of, hostile_archives, tree_of
from local_layout import manifest_data


def cache_root() -> str:
    return os.path.join(tempfile.gettempdir(), "tfhub_modules")


def states() -> dict[str, str]:
    """Every entry of the default cache and its state."""
    return {e.key: e.state for e in LocalStore(cache_root()).entries()}


def leftovers() -> list[str]:
    """Everything in the cache root: directories (entries, temp dirs), descriptors, partial files
    and download locks (a local store keeps no other file, and a lock only while it downloads)."""
    root = cache_root()
    if not os.path.isdir(root):
        return []
    return sorted(os.listdir(root))


def manifest_of(handle: str) -> dict:
    return manifest_data(cache_root(), cache_key(handle))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_miss_then_hit(origin, model, fmt):
    url = origin.add(f"/models/m{SUFFIX[fmt]}", archive_of(model, fmt))
    path = hubcache.resolve(url)
    assert path == os.path.join(cache_root(), cache_key(url))
    assert tree_of(path) == tree_of(model)
    assert origin.count() == 1
    assert hubcache.resolve(url) == path  # memoised
    resolver.clear_memo()
    assert hubcache.resolve(url) == path  # read from the manifest
    assert origin.count() == 1, "a hit must not contact the origin"
    manifest = manifest_of(url)
    assert manifest["archive"]["format"] == fmt
    assert manifest["source"] == url
    assert manifest["archive"]["sha256"] == hashlib.sha256(archive_of(model, fmt)).hexdigest()


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_is_read_from_the_bytes_of_a_suffixless_redirect(origin, model, fmt):
    origin.add(f"/blobs/{fmt}-0001", archive_of(model, fmt))
    url = origin.redirect(f"/download/model-{fmt}", f"/blobs/{fmt}-0001")
    path = hubcache.resolve(url)
    assert tree_of(path) == tree_of(model)
    assert [r.status for r in origin.requests] == [302, 200]
    manifest = manifest_of(url)
    assert manifest["archive"]["format"] == fmt
    assert manifest["source"] == origin.url(f"/blobs/{fmt}-0001")


def test_a_chain_of_redirects_is_followed(origin, model):
    origin.add("/final", archive_of(model, "xz"))
    origin.redirect("/hop2", "/final", status=307)
    url = origin.redirect("/hop1", "/hop2", status=301)
    assert tree_of(hubcache.resolve(url)) == tree_of(model)
    assert [r.path for r in origin.requests] == ["/hop1", "/hop2", "/final"]


def test_a_local_directory_resolves_to_itself(model):
    assert hubcache.resolve(model) == model
    assert hubcache.resolve(f"file://{model}") == model
    assert hubcache.resolve(model + "/") == model
    assert not os.path.exists(cache_root()), "a directory handle must not create a cache"


@pytest.mark.parametrize("name, as_url", [("m.tar.zst", False), ("m.tar.zst", True), ("blob", False)])
def test_a_local_archive_is_extracted_into_the_cache(tmp_path, model, name, as_url):
    archive = tmp_path / name
    archive.write_bytes(archive_of(model, "zst"))
    before = archive.read_bytes()
    handle = f"file://{archive}" if as_url else str(archive)
    path = hubcache.resolve(handle)
    assert path == os.path.join(cache_root(), cache_key(handle))
    assert tree_of(path) == tree_of(model)
    assert archive.read_bytes() == before
    assert states() == {cache_key(handle): "committed"}


def test_a_memory_fsspec_archive(model):
    url = "memory://hubcache-test-bucket/models/m.tar.bz2"
    fs = fsspec.filesystem("memory")
    fs.pipe(url, archive_of(model, "bz2"))
    try:
        path = hubcache.resolve(url)
        assert tree_of(path) == tree_of(model)
        assert manifest_of(url)["archive"]["format"] == "bz2"
        # A hit does not read the archive again: it may even be gone.
        fs.rm(url)
        resolver.clear_memo()
        assert hubcache.resolve(url) == path
    finally:
        if fs.exists(url):
            fs.rm(url)


def test_a_hit_in_a_new_process_makes_no_request(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model, "gz"))
    path = hubcache.resolve(url)
    origin.reset_counts()
    out = subprocess.run([sys.executable, "-c", "import sys, hubcache; print(hubcache.resolve(sys.argv[1]))", url],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == path
    assert origin.count() == 0


# -- pinned digests ------------------------------------------------------------------------------


def test_a_correct_pin_resolves_and_shares_the_unpinned_entry(origin, model):
    data = archive_of(model, "gz")
    url = origin.add("/pinned.tar.gz", data)
    pinned = f"{url}#sha256={hashlib.sha256(data).hexdigest()}"
    path = hubcache.resolve(pinned)
    assert tree_of(path) == tree_of(model)
    assert os.path.basename(path) == cache_key(url)
    assert hubcache.resolve(url) == path
    assert origin.count() == 1


def test_a_wrong_pin_is_an_integrity_error_and_commits_nothing(origin, model):
    data = archive_of(model, "gz")
    url = origin.add("/pinned.tar.gz", data)
    wrong = hashlib.sha256(b"another archive").hexdigest()
    with pytest.raises(IntegrityError) as info:
        hubcache.resolve(f"{url}#sha256={wrong}")
    message = str(info.value)
    assert wrong in message and hashlib.sha256(data).hexdigest() in message and url in message
    assert "\n" not in message
    assert states() == {} and leftovers() == []
    # The same archive unpinned is fine.
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


def test_a_pin_is_checked_against_an_entry_that_is_already_cached(origin, model):
    url = origin.add("/cached.tar.gz", archive_of(model, "gz"))
    hubcache.resolve(url)
    with pytest.raises(IntegrityError, match="pins"):
        hubcache.resolve(f"{url}#sha256={'0' * 64}")
    assert origin.count() == 1


# -- what must never be committed, and what must be repaired ---------------------------------------


@pytest.mark.parametrize("name", ["dotdot", "symlink_escape", "hardlink_escape", "fifo", "truncated_zst"])
def test_a_refused_archive_leaves_nothing_behind(origin, name):
    url = origin.add(f"/bad/{name}", hostile_archives()[name])  # suffix-less: sniffed
    with pytest.raises(ArchiveError) as info:
        hubcache.resolve(url)
    if name != "truncated_zst":
        assert isinstance(info.value, UnsafeArchiveError)
    assert url in str(info.value)
    assert states() == {} and leftovers() == []


def test_a_file_deleted_from_an_entry_is_noticed_and_the_entry_rebuilt(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model, "gz"))
    path = hubcache.resolve(url)
    # What a temp cleaner does. The first lookup in a process (here: after forgetting the memo)
    # checks every file against the manifest, so any missing file is seen.
    os.unlink(os.path.join(path, "variables", "variables.index"))
    resolver.clear_memo()
    assert hubcache.resolve(url) == path
    assert tree_of(path) == tree_of(model)
    assert origin.count() == 2


def test_the_memoised_hit_notices_a_removed_entry(origin, model):
    import shutil

    url = origin.add("/m.tar.gz", archive_of(model, "gz"))
    path = hubcache.resolve(url)
    shutil.rmtree(path)
    assert hubcache.resolve(url) == path
    assert tree_of(path) == tree_of(model)
    assert origin.count() == 2
