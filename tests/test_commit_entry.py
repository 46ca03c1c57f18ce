"""``commit_entry`` (core/commit.py): the one lock -> look up -> clean -> write -> commit (or
abort) sequence that a download and a copy between tiers both go through.

Run against a real local store: its lock is an OS file lock, which a second open of the lock
file conflicts with even inside this process, so holding it here stands for another writer.
"""

from __future__ import annotations

import os
import zlib

import pytest

from hubcache.core.commit import Committed, commit_entry
from hubcache.core.handles import parse_handle
from hubcache.stores.localstore import LocalStore
from hubcache.core.manifest import FileRecord, Manifest, crc_hex

HANDLE = parse_handle("https://example.com/models/encoder.tar.gz")


def no_wait(holder: str) -> None:
    raise AssertionError(f"nothing else holds the lock, yet it waited for {holder}")


def filler(data: bytes, writers: list | None = None, archive: dict | None = None):
    """A ``fill`` that writes one file ``w.bin`` holding ``data``."""

    def fill(writer) -> Manifest:
        if writers is not None:
            writers.append(writer)
        writer.add_file("w.bin", iter([data]))
        return Manifest(handle=HANDLE.url, archive=dict(archive or {}),
                        files=[FileRecord("w.bin", len(data), crc_hex(zlib.crc32(data)))])

    return fill


def content(store: LocalStore) -> bytes:
    with open(os.path.join(store.entry_path(HANDLE.key), "w.bin"), "rb") as f:
        return f.read()


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(str(tmp_path / "cache"))


def test_a_miss_is_committed_and_a_committed_entry_is_returned_as_it_is(store):
    made = commit_entry(store, HANDLE, filler(b"first"), on_wait=no_wait)
    assert isinstance(made, Committed) and made.new
    assert store.lookup(HANDLE.key, HANDLE.url)[0] == made.path
    again = commit_entry(store, HANDLE, filler(b"second"), on_wait=no_wait)
    assert (again.path, again.new) == (made.path, False)
    assert content(store) == b"first"


def test_an_entry_found_unusable_is_replaced(store):
    commit_entry(store, HANDLE, filler(b"first"), on_wait=no_wait)  # no verified digest
    seen = []
    # The store lets only an entry whose archive digest this process verified replace another.
    made = commit_entry(store, HANDLE, filler(b"second", archive={"sha256": "ab" * 32}), on_wait=no_wait,
                        usable=lambda manifest: seen.append(manifest) is not None)
    assert made.new and len(seen) == 1 and content(store) == b"second"


def test_a_failing_fill_is_aborted_and_commits_nothing(store):
    def fill(writer):
        filler(b"half")(writer)
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        commit_entry(store, HANDLE, fill, on_wait=no_wait)
    assert store.lookup(HANDLE.key, HANDLE.url) is None
    assert list(store.entries()) == []  # the writer's temp data is gone too


def test_restart_fills_a_fresh_writer_and_its_refusal_reraises(store):
    writers: list = []
    calls: list = []
    write = filler(b"whole", writers)

    def fill(writer):
        manifest = write(writer)
        if len(writers) < 3:
            raise ConnectionResetError("changed under us")
        return manifest

    def restart(error: BaseException, restarts: int) -> bool:
        calls.append((type(error), restarts))
        return isinstance(error, ConnectionResetError)

    made = commit_entry(store, HANDLE, fill, on_wait=no_wait, restart=restart)
    assert made.new and content(store) == b"whole"
    assert calls == [(ConnectionResetError, 0), (ConnectionResetError, 1)]
    assert len({id(w) for w in writers}) == 3  # a fresh writer each time

    store.remove(HANDLE.key)
    writers.clear()
    with pytest.raises(ConnectionResetError):
        commit_entry(store, HANDLE, fill, on_wait=no_wait, restart=lambda error, restarts: False)
    assert len(writers) == 1 and store.lookup(HANDLE.key, HANDLE.url) is None
    assert list(store.entries()) == []


def test_not_waiting_returns_who_holds_the_lock_and_writes_nothing(store):
    def fill(writer):
        raise AssertionError("filled while another writer held the lock")

    with store.lock(HANDLE.key, no_wait):
        busy = commit_entry(store, HANDLE, fill, on_wait=no_wait, wait=False)
    assert isinstance(busy, str) and busy.startswith("locked by")
    assert store.lookup(HANDLE.key, HANDLE.url) is None
