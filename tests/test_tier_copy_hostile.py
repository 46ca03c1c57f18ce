"""Copies between cache tiers read untrusted input: a forged entry in a lower tier (a local tier
another process wrote, a bucket others can write) is never served, never copied, and never makes
hubcache write, unlink or read outside the entries; the origin serves the handle instead.

``HUBCACHE_BACKEND=home,tmp`` gives two local tiers, easy to forge; one test forges a bucket
manifest of ``home,gcs`` in the GCS emulator. The whole sandbox is snapshotted around each
resolve, and the origin's request count says who served the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib

import pytest

import hubcache
from gcs_emulator import fresh_root, gcs  # first: it configures gcsfs before gcsfs is imported
from hubcache.core import resolver
from hubcache.stores import treewalk
from hubcache.core.handles import cache_key
from hubcache.core.manifest import FileRecord, Manifest, crc_hex
from hubcache.core.tiers import SourceUnusable, TieredBackend
from hubcache.testing import archive_of, tree_of
from bucket_layout import descriptor_object, plant_manifest
from bucket_layout import manifest_json as bucket_manifest_json
from local_layout import manifest_json, write_manifest_json



@pytest.fixture
def chain(monkeypatch):
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,tmp")


def tiers():
    return resolver.current_backend()[1].tiers


def snapshot(base: str, *skip: str) -> dict[str, tuple]:
    """Everything under ``base`` except the trees in ``skip`` (the cache roots, whose own
    entries a resolve may rewrite): path -> (kind, sha256 of a file's bytes or a link's target)."""
    skipped = {os.path.join(s, "") for s in skip}
    seen = {}
    for d in treewalk.walk(base):
        here = os.path.join(base, d.path) if d.path else base
        d.dirs[:] = [n for n in d.dirs if os.path.join(here, n, "") not in skipped]
        for name in d.dirs:
            seen[os.path.join(here, name)] = ("dir",)
        for name in d.files:
            with open(os.path.join(here, name), "rb") as f:
                seen[os.path.join(here, name)] = ("file", hashlib.sha256(f.read()).hexdigest())
        for name in d.symlinks:
            seen[os.path.join(here, name)] = ("link", os.readlink(os.path.join(here, name)))
    return seen


def only_the_entry(root: str, key: str) -> list[str]:
    """Names in a local cache root other than the entry of ``key`` (a local store keeps nothing
    else: no lock once the resolve is done, no use or owner files)."""
    return [n for n in os.listdir(root) if n not in (key, f"{key}.descriptor.txt")]


def forge(store, key: str, edit) -> None:
    """Rewrite the manifest of ``key`` in a local ``store`` (the end of its descriptor) with
    ``edit(manifest)``."""
    manifest = Manifest.from_json(manifest_json(store.root, key))
    edit(manifest)
    write_manifest_json(store.root, key, manifest.to_json())


def record(path: str, data: bytes) -> FileRecord:
    return FileRecord(path, len(data), crc_hex(zlib.crc32(data)))


def links_in(path: str) -> dict[str, str]:
    found = {}
    for d in treewalk.walk(path):
        for name in d.symlinks:
            rel = f"{d.path}/{name}" if d.path else name
            found[rel] = os.readlink(os.path.join(path, rel))
    return found


def _setup(origin, model, tmp_path):
    """Resolve once (both tiers filled, one origin request), then empty the first tier.
    Returns (url, key, home tier, tmp tier, sandbox snapshot function)."""
    url = origin.add("/m.tar.gz", archive_of(model))
    hubcache.resolve(url)
    home, tmp = tiers()
    key = cache_key(url)
    home.store.remove(key)
    resolver.clear_memo()
    return url, key, home, tmp


def _resolve_and_check(url, key, home, tmp, model, tmp_path, origin):
    """Resolve afresh; the forged tier must be skipped: nothing outside the tiers' own entries
    changes, the origin serves, and the served tree is the model's."""
    roots = (home.store.root, tmp.store.root)
    before = snapshot(str(tmp_path), *roots)
    path = hubcache.resolve(url)
    assert snapshot(str(tmp_path), *roots) == before, "something outside the tiers' entries was written or removed"
    assert only_the_entry(home.store.root, key) == [] and only_the_entry(tmp.store.root, key) == []
    assert path == home.store.entry_path(key)
    assert tree_of(path) == tree_of(model) and links_in(path) == {}
    assert origin.count() == 2, "the forged tier must not serve; the origin does"
    return path


def test_manifest_names_leaving_the_entry_are_a_miss(chain, origin, model, tmp_path):
    url, key, home, tmp = _setup(origin, model, tmp_path)
    # `../../x` from the tmp entry is <tmp>/x; from the writer's temp dir in home it is the
    # home cache's parent: a victim file waits there.
    planted = b"evil bytes"
    outside_tmp = os.path.join(os.path.dirname(tmp.store.root), "x")
    with open(outside_tmp, "wb") as f:
        f.write(planted)
    victim = os.path.join(os.path.dirname(home.store.root), "x")
    with open(victim, "wb") as f:
        f.write(b"victim")
    forge(tmp.store, key, lambda m: m.files.append(record("../../x", planted)))
    _resolve_and_check(url, key, home, tmp, model, tmp_path, origin)
    with open(victim, "rb") as f:
        assert f.read() == b"victim"


def test_a_link_leaving_the_entry_is_a_miss(chain, origin, model, tmp_path):
    url, key, home, tmp = _setup(origin, model, tmp_path)
    os.symlink("../../../etc", os.path.join(tmp.store.entry_path(key), "l"))
    forge(tmp.store, key, lambda m: m.symlinks.update(l="../../../etc"))
    _resolve_and_check(url, key, home, tmp, model, tmp_path, origin)


def test_a_link_chain_whose_outer_link_comes_first_is_a_miss(chain, origin, model, tmp_path):
    """``esc -> assets/up/..`` reads as ``assets`` (inside) but ``assets/up -> ..`` makes it the
    entry's parent: each link alone looks fine, the chain escapes."""
    url, key, home, tmp = _setup(origin, model, tmp_path)
    entry = tmp.store.entry_path(key)
    os.symlink("assets/up/..", os.path.join(entry, "esc"))
    os.symlink("..", os.path.join(entry, "assets", "up"))

    def edit(m: Manifest) -> None:
        m.symlinks = {"esc": "assets/up/..", "assets/up": ".."}  # the outer link first

    forge(tmp.store, key, edit)
    _resolve_and_check(url, key, home, tmp, model, tmp_path, origin)


def test_a_source_file_that_is_a_link_to_outside_is_never_read(chain, origin, model, tmp_path):
    """The link's target has the very bytes the manifest announces, so only refusing to follow
    it keeps hubcache from reading outside the entry."""
    url, key, home, tmp = _setup(origin, model, tmp_path)
    entry = tmp.store.entry_path(key)
    index = os.path.join(entry, "variables", "variables.index")
    outside = tmp_path / "outside-index"
    shutil.copyfile(index, outside)
    os.unlink(index)
    os.symlink(str(outside), index)
    _resolve_and_check(url, key, home, tmp, model, tmp_path, origin)


def test_a_source_directory_that_is_a_link_to_outside_is_never_read(chain, origin, model, tmp_path):
    url, key, home, tmp = _setup(origin, model, tmp_path)
    entry = tmp.store.entry_path(key)
    outside = tmp_path / "outside-variables"
    shutil.copytree(os.path.join(entry, "variables"), outside)
    shutil.rmtree(os.path.join(entry, "variables"))
    os.symlink(str(outside), os.path.join(entry, "variables"))
    _resolve_and_check(url, key, home, tmp, model, tmp_path, origin)


def test_a_source_file_longer_than_its_manifest_says_is_refused(chain, origin, model, tmp_path):
    """The manifest's size and CRC-32 describe the file's first bytes only: a copy that read just
    as many bytes as announced would take it. The copy raises and commits nothing."""
    url, key, home, tmp = _setup(origin, model, tmp_path)
    entry = tmp.store.entry_path(key)
    with open(os.path.join(entry, "assets", "vocab.txt"), "rb") as f:
        vocab = f.read()
    manifest = tmp.store.read_manifest(key)
    manifest.files = [record(r.path, vocab[:-5]) if r.path == "assets/vocab.txt" else r for r in manifest.files]
    chain_backend = resolver.current_backend()[1]
    assert isinstance(chain_backend, TieredBackend)
    with pytest.raises(SourceUnusable, match="assets/vocab.txt has more than"):
        chain_backend._copy(hubcache.core.handles.parse_handle(url), tmp.store, entry, manifest, home)
    assert home.store.entry(key) is None
    assert not [n for n in os.listdir(home.store.root) if n.startswith(key) and not n.endswith(_BOOKKEEPING)]


@pytest.mark.parametrize("setting, value", [("HUBCACHE_MAX_MEMBERS", "4"), ("HUBCACHE_MAX_EXTRACT_SIZE", "1000")])
def test_a_source_entry_over_the_limits_is_not_copied(chain, origin, model, monkeypatch, setting, value):
    """A lower tier's entry gets the limits an archive gets: over them it is a miss, and the
    origin's archive (over them too) is refused as such."""
    url, key, home, tmp = _setup(origin, model, None)
    monkeypatch.setenv(setting, value)
    resolver.clear_memo()
    with pytest.raises(hubcache.UnsafeArchiveError):
        hubcache.resolve(url)
    assert home.store.entry(key) is None and origin.count() == 2


def test_a_copy_from_another_local_tier_keeps_the_digest_and_a_bucket_copy_does_not(chain, origin, model):
    url, key, home, tmp = _setup(origin, model, None)
    hubcache.resolve(url)  # copied down from tmp
    copied = home.store.read_manifest(key)
    assert copied.archive.get("verified", True) is not False
    assert copied.archive["sha256"] == tmp.store.read_manifest(key).archive["sha256"]


def test_a_bucket_manifest_with_dotdot_names_writes_nothing_outside_home(origin, model, monkeypatch, tmp_path):
    root = fresh_root()
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/fleet.tar.gz", archive_of(model))
    hubcache.resolve(url)  # host 1: fills home and the bucket
    home, bucket = tiers()
    key = cache_key(url)
    # A bucket writer forges the manifest: a file and a directory two levels above the entry.
    fs = gcs()
    manifest_object = descriptor_object(root.split("://", 1)[1], key)
    manifest = Manifest.from_json(bucket_manifest_json(fs, manifest_object))
    manifest.files.append(record("../../x", b"evil"))
    manifest.dirs.append("../../evil-dir")
    plant_manifest(fs, manifest_object, manifest.to_json())
    # Host 2: an empty home cache, with a victim where `../../x` of its temp dir points.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    resolver.clear_memo()
    home2 = tiers()[0]
    os.makedirs(home2.store.root)
    victim = tmp_path / "host2-cache" / "x"
    victim.write_bytes(b"victim")
    before = snapshot(str(tmp_path), home2.store.root)
    path = hubcache.resolve(url)
    assert snapshot(str(tmp_path), home2.store.root) == before
    assert only_the_entry(home2.store.root, key) == []
    assert victim.read_bytes() == b"victim" and not (tmp_path / "host2-cache" / "evil-dir").exists()
    assert path == home2.store.entry_path(key) and tree_of(path) == tree_of(model)
    assert origin.count() == 2, "the forged bucket entry must not serve; the origin does"
    # What the first tier holds came from the origin: its digest is one this process verified.
    assert home2.store.read_manifest(key).archive.get("verified", True) is not False


def test_a_bucket_copy_is_marked_unverified(origin, model, monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/fleet.tar.gz", archive_of(model))
    hubcache.resolve(url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    resolver.clear_memo()
    path = hubcache.resolve(url)  # copied down from the bucket
    assert origin.count() == 1 and tree_of(path) == tree_of(model)
    assert tiers()[0].store.read_manifest(cache_key(url)).archive["verified"] is False


def test_a_pin_is_satisfied_by_a_local_tier_copy(chain, origin, model):
    url, key, home, tmp = _setup(origin, model, None)
    digest = tmp.store.read_manifest(key).archive["sha256"]
    assert hubcache.resolve(f"{url}#sha256={digest}") == home.store.entry_path(key)
    assert origin.count() == 1, "copied down from the trusted local tier"


def _fleet_second_host(origin, model, monkeypatch, tmp_path) -> tuple[str, str]:
    """A ``home,gcs`` fleet: host 1 downloads the handle into its home tier and the bucket; then
    this process becomes host 2 (an empty home tier). Returns the handle and its archive digest."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/fleet.tar.gz", archive_of(model))
    hubcache.resolve(url)
    digest = tiers()[0].store.read_manifest(cache_key(url)).archive["sha256"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    resolver.clear_memo()
    return url, digest


def test_a_pin_is_never_satisfied_by_a_digest_read_from_a_bucket(origin, model, monkeypatch, tmp_path):
    url, digest = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    path = hubcache.resolve(f"{url}#sha256={digest}")
    assert origin.count() == 2, "the pin was checked against the downloaded archive, not the bucket's manifest"
    assert tree_of(path) == tree_of(model)
    assert tiers()[0].store.read_manifest(cache_key(url)).archive.get("verified", True) is not False


def test_a_pinned_resolve_replaces_an_unverified_copy_with_a_verified_download(origin, model, monkeypatch, tmp_path):
    url, digest = _fleet_second_host(origin, model, monkeypatch, tmp_path)
    path = hubcache.resolve(url)  # unpinned: the bucket's copy will do
    home = tiers()[0]
    assert origin.count() == 1 and home.store.read_manifest(cache_key(url)).archive["verified"] is False
    resolver.clear_memo()
    assert hubcache.resolve(f"{url}#sha256={digest}") == path
    assert origin.count() == 2 and tree_of(path) == tree_of(model)
    assert home.store.read_manifest(cache_key(url)).archive.get("verified", True) is not False
    resolver.clear_memo()
    assert hubcache.resolve(f"{url}#sha256={digest}") == path and origin.count() == 2, "verified now"


def test_verify_says_a_copy_from_a_bucket_cannot_vouch_for_a_pin_and_repair_downloads(
        origin, model, monkeypatch, tmp_path):
    import subprocess
    import sys

    monkeypatch.setenv("TFHUB_CACHE_DIR", fresh_root())
    monkeypatch.setenv("HUBCACHE_BACKEND", "home,gcs")
    url = origin.add("/fleet.tar.gz", archive_of(model))
    hubcache.resolve(url)
    pinned = f"{url}#sha256={tiers()[0].store.read_manifest(cache_key(url)).archive['sha256']}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host2-cache"))
    resolver.clear_memo()
    hubcache.resolve(url)  # host 2: copied down from the bucket, digest unverified
    hubcache_cli = [sys.executable, "-m", "hubcache", "verify", "--backend", "home", "--json"]
    done = subprocess.run([*hubcache_cli, pinned], capture_output=True, text=True)
    [result] = json.loads(done.stdout)
    assert done.returncode == 1 and result["status"] == "pin mismatch", done.stderr
    assert "cannot be checked against the pin" in result["problems"][0]
    done = subprocess.run([*hubcache_cli, "--repair", pinned], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)[0]["status"] == "repaired", done.stdout + done.stderr
    assert origin.count() == 2
    assert tiers()[0].store.read_manifest(cache_key(url)).archive.get("verified", True) is not False
