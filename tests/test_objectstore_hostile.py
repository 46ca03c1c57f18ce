"""Object stores as a boundary: names given to the writer, and what others left in the bucket,
against a real GCS emulator (fake-gcs-server) and a real origin server.

The generic cases (an unsafe manifest is a miss, a stalled lease holder cannot overwrite a new
lease) are in the conformance suite, which the gcs backend and the S3 example both run.
"""

from __future__ import annotations

import json
import time

import pytest

from gcs_emulator import fresh_root, gcs
from hubcache.backends.gcs import GcsBackend
from hubcache.backends.gcs_store import GcsObjectStore
from hubcache.core.config import load_config
from hubcache.core.errors import UnsafeArchiveError
from hubcache.core.handles import cache_key, parse_handle
from hubcache.core.locate import locate
from hubcache.stores.objectstore import PreconditionFailed
from hubcache.testing import archive_of, tree_of

KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def gcs_root() -> str:
    return fresh_root()


def strip(url: str) -> str:
    return url.split("://", 1)[1]


def objects(root: str) -> list[str]:
    """Every object under the test's root, relative to it."""
    prefix = strip(root) + "/"
    return sorted(p[len(prefix):] for p in gcs().find(prefix))


# -- the writer -----------------------------------------------------------------------------------

BAD_NAMES = ["../outside", "a/../../outside", "/outside", "a//b", "./a", "a/./b", "a/", "", "a\\b", "a/.."]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_writer_refuses_a_file_name_not_in_normal_form(gcs_root, name):
    """Whoever calls it, the writer uploads nothing under a name that is not ``a/b/c`` inside the
    entry: "<key>/../outside" is an object outside the entry for the emulator (it cleans names)
    and for anyone who turns object names into paths."""
    store = GcsObjectStore(gcs_root, gcs())
    writer = store.writer(KEY, "https://example.com/m.tar.gz")
    writer.add_file("saved_model.pb", iter([b"pb"]))
    with pytest.raises(UnsafeArchiveError) as info:
        writer.add_file(name, iter([b"hostile bytes"]))
    assert repr(name) in str(info.value) and "\n" not in str(info.value)
    writer._flush()
    writer._wait()
    assert objects(gcs_root) == [f"{KEY}/saved_model.pb"], "nothing else was uploaded, anywhere"
    writer.abort()
    assert objects(gcs_root) == []


@pytest.mark.parametrize("method", ["add_dir", "add_symlink", "add_hardlink", "add_hardlink_source"])
def test_writer_refuses_other_names_not_in_normal_form(gcs_root, method):
    store = GcsObjectStore(gcs_root, gcs())
    writer = store.writer(KEY, "https://example.com/m.tar.gz")
    writer.add_file("saved_model.pb", iter([b"pb"]))
    calls = {
        "add_dir": lambda: writer.add_dir("../outside"),
        "add_symlink": lambda: writer.add_symlink("../outside", "saved_model.pb"),
        "add_hardlink": lambda: writer.add_hardlink("../outside", "saved_model.pb"),
        "add_hardlink_source": lambda: writer.add_hardlink("copy", "../saved_model.pb"),
    }
    with pytest.raises(UnsafeArchiveError) as info:
        calls[method]()
    assert "../" in str(info.value)
    writer._flush()
    writer._wait()
    assert objects(gcs_root) == [f"{KEY}/saved_model.pb"]
    writer.abort()


@pytest.mark.parametrize("target", ["../secret", "../../secret", "/secret", "a/../../secret", "link"])
def test_writer_refuses_link_targets_outside_the_entry(gcs_root, target):
    """A link is stored as a copy of its target's object: the target must be inside the entry, so
    a copy never reads another entry's or anyone's object (a planted ``<root>/secret`` here)."""
    store = GcsObjectStore(gcs_root, gcs())
    gcs().pipe_file(f"{strip(gcs_root)}/secret", b"someone else's bytes")
    writer = store.writer(KEY, "https://example.com/m.tar.gz")
    writer.add_file("saved_model.pb", iter([b"pb"]))
    with pytest.raises(UnsafeArchiveError) as info:
        writer.add_symlink("link", target)
    assert "'link'" in str(info.value)
    writer.abort()
    assert objects(gcs_root) == ["secret"]


# -- what others left in the bucket ---------------------------------------------------------------


def test_adoption_refuses_object_names_not_in_normal_form(origin, model, gcs_root):
    """An entry "tensorflow_hub wrote" (a descriptor without hubcache's line) is adopted from its
    listing; object names are anyone's, and one that is no safe path (a backslash, a name over
    255 bytes) makes it no entry of ours: a miss, downloaded again."""
    url = origin.add("/foreign.tar.gz", archive_of(model))
    key = cache_key(url)
    entry = f"{strip(gcs_root)}/{key}"
    for rel, data in tree_of(model).items():
        gcs().pipe_file(f"{entry}/{rel}", data)
    gcs().pipe_file(f"{entry}/variables\\..\\..\\escape", b"hostile")
    gcs().pipe_file(f"{entry}.descriptor.txt", f"Module: {url}\nDownload Time: now\n".encode())
    backend = GcsBackend(load_config().replace(cache_dir=gcs_root))
    assert backend.store.lookup(key, url) is None, "a listing with a hostile name must not be adopted"
    handle = parse_handle(url)
    path = backend.resolve(handle, locate(handle, "COMPRESSED"))
    assert origin.count("/foreign.tar.gz") == 1
    manifest = backend.store.read_manifest(key)
    assert manifest is not None and manifest.creator.startswith("hubcache")
    assert path == f"{gcs_root}/{key}"
    assert not gcs().exists(f"{entry}/variables\\..\\..\\escape"), "the commit removes objects of no archive"


def test_a_lease_rewrite_is_conditional_on_the_generation(gcs_root):
    """The GCS spelling of the lease's primitive: a stale generation is refused by the service."""
    store = GcsObjectStore(gcs_root, gcs())
    path = store.object_path("x.lock")
    store.create_object(path, b"A 1")
    data, first = store.read_versioned(path)
    second = store.replace_object(path, b"A 2", first)
    assert (data, second != first) == (b"A 1", True)
    with pytest.raises(PreconditionFailed):
        store.replace_object(path, b"stale A", first)
    with pytest.raises(PreconditionFailed):
        store.replace_object(store.object_path("gone.lock"), b"x", second)
    assert store.read_versioned(path) == (b"A 2", second)
    store.delete_versioned(path, second)
    assert store.read_versioned(path) is None


def test_a_heartbeat_whose_retry_meets_its_own_write_keeps_the_lease(gcs_root):
    """gcsfs retries a request whose answer was lost; the retry of a conditional rewrite that did
    land meets the generation it made itself and gets 412. The holder must then see its own bytes
    and keep the lease, not think it was taken over. (The lost answer is the one thing simulated:
    the write is real, then the store raises what the retry would.)"""

    class AnswerLostOnce(GcsObjectStore):
        lost_answers = 0

        def replace_object(self, path, data, version):
            new = super().replace_object(path, data, version)
            if not self.lost_answers:
                self.lost_answers += 1
                raise PreconditionFailed(path)
            return new

    store = AnswerLostOnce(gcs_root, gcs(), lease_ttl=0.3)
    with store.lock(KEY, on_wait=lambda holder: None):
        lease = store._leases[KEY]
        deadline = time.monotonic() + 10
        while lease.beat < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.lost_answers == 1 and lease.beat >= 6
        assert not store.lease_lost(KEY)
        data, _ = store.read_versioned(store.object_path(f"{KEY}.lock"))
        assert json.loads(data)["lease"] == lease.id
    assert store.read_versioned(store.object_path(f"{KEY}.lock")) is None, "released"
