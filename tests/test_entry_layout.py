"""The entry layout (``hubcache.core.entry``) is written once, and both stores use it.

The key pattern, the descriptor hubcache writes and how it tells tensorflow_hub's from its own,
when a listing is a complete model (the same messages for a local directory and an object
listing), the entry states, and the CRC-32 used to read files back.
"""

from __future__ import annotations

import io
import os
import socket
import typing
import zlib

import pytest

from hubcache.core import crc, entry, store
from hubcache.stores import localstore, objectstore
from hubcache.archive import pipeline
from hubcache.maintenance import prune
from hubcache.core.handles import cache_key


def test_key_pattern():
    key = cache_key("https://example.com/model/1")
    assert entry.is_key(key)
    assert entry.KEY.match(key)
    for text in ("", key.upper(), key[:-1], key + "0", key[:-1] + "g", f" {key}", "https://x/y"):
        assert not entry.is_key(text), text


def test_side_names():
    key = "a" * 40
    assert entry.manifest_name(key) == f"{key}.manifest.json"
    assert entry.descriptor_name(key) == f"{key}.descriptor.txt"
    root = "/cache"
    local = localstore.LocalStore(root)
    assert local.descriptor_path(key) == os.path.join(local.root, entry.descriptor_name(key))
    # tensorflow_hub's own lock name (resolver._lock_filename), there only while a download runs.
    assert local.lock_path(key) == os.path.join(local.root, key + ".lock")
    # An older hubcache's manifest file, still read.
    assert local.legacy_manifest_path(key) == os.path.join(local.root, entry.manifest_name(key))
    assert not hasattr(local, "use_path") and not hasattr(local, "manifest_path")


def test_descriptor_round_trip():
    handle = "https://example.com/model/1"
    text = entry.descriptor_text(handle)
    lines = text.splitlines()
    # tensorflow_hub's three lines (resolver._write_module_descriptor_file), then hubcache's.
    assert lines[0] == f"Module: {handle}"
    assert lines[1].startswith("Download Time: ")
    assert lines[2] == f"Downloader Hostname: {socket.gethostname()} (PID:{os.getpid()})"
    assert lines[3] == entry.WRITER_TAG and entry.WRITER_TAG.startswith(entry.WRITER_MARK + " ")
    assert text.endswith("\n") and len(lines) == 4
    assert not entry.written_by_tensorflow_hub(text)
    assert not entry.written_by_tensorflow_hub(text.encode())


def test_written_by_tensorflow_hub():
    theirs = "Module: https://example.com/m/1\nDownload Time: now\nDownloader Hostname: h (PID:1)\n"
    assert entry.written_by_tensorflow_hub(theirs)
    assert entry.written_by_tensorflow_hub(theirs.encode())
    assert entry.written_by_tensorflow_hub(b"")
    assert not entry.written_by_tensorflow_hub(None)  # no descriptor: nobody's entry
    assert not entry.written_by_tensorflow_hub(theirs + "Writer: hubcache 0.0\n")  # any version


def test_one_writer_tag():
    # The stores use the module's tag, not one of their own.
    assert localstore.WRITER_TAG is entry.WRITER_TAG
    assert not hasattr(objectstore, "WRITER_TAG")


COMPLETE = {"saved_model.pb": 10, "variables/variables.index": 5,
            "variables/variables.data-00000-of-00002": 7, "variables/variables.data-00001-of-00002": 7,
            "assets/vocab.txt": 3}


@pytest.mark.parametrize("files, others, expected", [
    (COMPLETE, (), []),
    ({"tfhub_module.pb": 1}, (), []),
    ({}, (), ["the entry has no objects"]),
    ({"README": 1}, (), ["no saved_model.pb, saved_model.pbtxt or tfhub_module.pb"]),
    ({"saved_model.pb": 0, "saved_model.pbtxt": 0}, (), ["saved_model.pb is empty", "saved_model.pbtxt is empty"]),
    ({"x": 1}, ("saved_model.pb",), ["saved_model.pb is not a regular file"]),
    ({k: v for k, v in COMPLETE.items() if "00001" not in k}, (), ["variables shard 1 of 2 is missing"]),
    ({"saved_model.pb": 1, "variables/variables.index": 1}, (), ["variables shard 0 of 1 is missing"]),
    # a shard that is not a regular file is still there; no index: shards are not checked
    ({"saved_model.pb": 1, "variables/variables.index": 1}, ("variables/variables.data-00000-of-00001",), []),
    ({"saved_model.pb": 1, "variables/variables.data-00001-of-00002": 1}, (), []),
])
def test_model_dir_problems(files, others, expected):
    assert entry.model_dir_problems(files, others) == expected


def _make(root: str, files: dict[str, int]) -> str:
    for rel, size in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * size)
    return root


@pytest.mark.parametrize("files", [
    COMPLETE,
    {"README": 1},
    {"saved_model.pb": 0, "tfhub_module.pb": 2},
    {k: v for k, v in COMPLETE.items() if "00000" not in k},
])
def test_local_directory_and_object_listing_agree(tmp_path, files):
    """The same files give the same verdict, in the same words, on a disk and in a bucket (the
    object store judges its listing with ``entry.model_dir_problems`` itself)."""
    path = _make(str(tmp_path / "entry"), files)
    assert localstore.local_model_dir_problems(path) == entry.model_dir_problems(files)
    assert not hasattr(objectstore, "model_dir_problems") and not hasattr(objectstore, "_MARKERS")


def test_local_directory_only_problems(tmp_path):
    assert localstore.local_model_dir_problems(str(tmp_path / "absent")) == ["the entry directory is missing"]
    (tmp_path / "file").write_bytes(b"x")
    assert localstore.local_model_dir_problems(str(tmp_path / "file")) == ["the entry directory is not a directory"]
    (tmp_path / "empty").mkdir()
    assert localstore.local_model_dir_problems(str(tmp_path / "empty")) == ["the entry directory is empty"]
    linked = _make(str(tmp_path / "linked"), {"real.pb": 3})
    os.symlink("real.pb", os.path.join(linked, "saved_model.pb"))
    assert localstore.local_model_dir_problems(linked) == ["saved_model.pb is not a regular file"]
    os.mkdir(os.path.join(linked, "tfhub_module.pb"))
    assert localstore.local_model_dir_problems(linked) == ["saved_model.pb is not a regular file",
                                                     "tfhub_module.pb is not a regular file"]


def test_local_variables_link_is_not_followed(tmp_path):
    # A `variables` link is not the model's variables directory: its contents are not judged
    # (hubcache never reads through a link in an entry), as before the layout moved.
    path = _make(str(tmp_path / "entry"), {"saved_model.pb": 3})
    elsewhere = _make(str(tmp_path / "elsewhere"), {"variables.index": 1})
    os.symlink(elsewhere, os.path.join(path, "variables"))
    assert localstore.local_model_dir_problems(path) == []
    os.unlink(os.path.join(path, "variables"))
    os.rename(elsewhere, os.path.join(path, "variables"))
    assert localstore.local_model_dir_problems(path) == ["variables shard 0 of 1 is missing"]


def test_entry_states():
    assert set(entry.ENTRY_STATES) == {"committed", "in progress", "foreign", "damaged"}
    assert set(entry.USABLE_STATES) <= set(entry.ENTRY_STATES)
    assert prune.USABLE == entry.USABLE_STATES
    hints = typing.get_type_hints(store.EntryInfo)
    assert hints["state"] == entry.EntryState


@pytest.mark.parametrize("data", [b"", b"x", os.urandom(3 << 20 | 123)])
def test_crc_helper_equals_zlib(data):
    assert crc.crc32_function()(data, 0) == zlib.crc32(data)
    assert crc.crc32_function()(data[7:], zlib.crc32(data[:7])) == zlib.crc32(data)
    assert crc.file_crc32(io.BytesIO(data)) == (zlib.crc32(data), len(data))


def test_one_crc_selector():
    assert pipeline.crc32_function is crc.crc32_function


def test_a_key_is_exactly_40_hex_digits_not_one_with_a_trailing_newline():
    """A name planted in a shared cache or bucket as ``<key>\\n`` is not an entry's key."""
    from hubcache.core.entry import is_key

    key = "0123456789abcdef0123456789abcdef01234567"
    assert is_key(key)
    assert not is_key(key + "\n") and not is_key(key.upper()) and not is_key(key[:-1]) and not is_key(" " + key)


def test_one_reader_of_a_descriptors_module_line_for_both_stores():
    # Both stores show the handle a descriptor names (``hubcache ls`` of a tensorflow_hub entry):
    # one reader, so a bucket and a directory show the same planted text the same way.
    evil = "https://evil.example/m\x1b]0;pwned\x07\u202e" + "x" * 300
    for descriptor in (f"Module: {evil}\nDownload Time: now\n", f"Module: {evil}\n".encode()):
        shown = entry.descriptor_module(descriptor)
        assert shown is not None and shown.startswith("https://evil.example/m\\x1b]0;pwned\\x07\\u202e")
        assert shown.endswith("...") and "x" * 150 in shown and "x" * 170 not in shown  # capped
        assert shown.isprintable()
    assert entry.descriptor_module("Download Time: now\n") is None
    assert entry.descriptor_module(None) is None
    assert entry.descriptor_module(b"Module: caf\xc3\xa9\n") == "café"
    assert not hasattr(localstore, "_printable") and not hasattr(objectstore, "_printable")


def test_a_local_descriptor_holds_the_manifest_after_hubcaches_line():
    handle = "https://example.com/model/1"
    head = entry.descriptor_text(handle)
    manifest = b'{\n "format": 1,\n "handle": "x"\n}'
    text = entry.descriptor_with_manifest(head, manifest)
    assert text.startswith(head.encode()) and text.endswith(manifest)
    assert text.decode().splitlines()[4] == entry.MANIFEST_MARK
    assert entry.descriptor_manifest(text) == manifest
    assert entry.descriptor_head(text) == head
    assert entry.descriptor_module(text) == handle and not entry.written_by_tensorflow_hub(text)
    # No manifest: none at all, hubcache's descriptor before its commit, tensorflow_hub's (even one
    # that carries the marker: only hubcache's line before it makes it a manifest).
    assert entry.descriptor_manifest(None) is None
    assert entry.descriptor_manifest(head.encode()) is None
    theirs = b"Module: h\nDownload Time: now\nDownloader Hostname: x (PID:1)"
    assert entry.descriptor_manifest(theirs) is None
    assert entry.descriptor_manifest(theirs + b"\nManifest:\n{}") is None
    assert entry.descriptor_head(theirs) == theirs.decode()


def test_a_lock_file_says_what_tensorflow_hub_writes():
    text = entry.lock_text("hc12-abcdef01")
    assert text == f"{socket.gethostname()}.{os.getpid()}.hc12-abcdef01"
    # tensorflow_hub reads the task after the last dot (resolver._task_uid_from_lock_file).
    assert text.split(".")[-1] == "hc12-abcdef01"
    assert entry.parse_lock(text) == (socket.gethostname(), os.getpid(), "hc12-abcdef01")
    assert entry.lock_by_hubcache(text)
    assert entry.lock_holder(text) == f"{socket.gethostname()} pid {os.getpid()}"
    theirs = "host.example.com.4242.0123456789abcdef0123456789abcdef"  # resolver._lock_file_contents
    assert entry.parse_lock(theirs) == ("host.example.com", 4242, "0123456789abcdef0123456789abcdef")
    assert not entry.lock_by_hubcache(theirs)
    for junk in ("", "x", "host.pid.task", "h.99999999999.t", ".1.t"):
        assert entry.parse_lock(junk) is None and not entry.lock_by_hubcache(junk)
    planted = "evil\x1b]0;pwned\x07.1.t"
    assert entry.lock_holder(planted).isprintable() and entry.lock_holder(None) == "unknown"


def test_the_names_an_older_hubcache_kept():
    assert entry.LEGACY_SUFFIXES == (".hubcache.lock", ".hubcache.owner", ".hubcache.use")
    assert not hasattr(entry, "USE_SUFFIX") and not hasattr(entry, "HUBCACHE_LOCK_SUFFIX")
