"""Disk full: ENOSPC while extracting or committing is a clear ``CacheError``; the temp dir is
removed, nothing is committed, the rest of the cache is unchanged, and the space comes back.

The cache lives on a real, small tmpfs (``mount -t tmpfs -o size=...``), so the kernel itself
returns ENOSPC; nothing is simulated. Mounting needs root (CAP_SYS_ADMIN); without it the test is
skipped and says so (an fsspec filesystem that fails writes would not exercise the local store,
which writes through ``os``). The sweep fills the tmpfs to leave exactly N pages free, for every N
from "the commit's last page is missing" down to "not even the first file fits", so ENOSPC lands
on every allocation the resolve makes: file data, descriptor, manifest.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

import hubcache
from hubcache import CacheError
from hubcache.core import resolver
from hubcache.core.handles import cache_key
from hubcache.stores.localstore import LocalStore
from hubcache.testing import OriginServer

from .helpers import leftovers, make_archive, snapshot, tree

SCENARIO = "8. Disk full"
PAGE = 4096
#: Pages a resolve holds only while it runs (the download lock's note, the descriptor written
#: before the one with the manifest replaces it).
TRANSIENT_PAGES = 2
#: Files of the refused key a failed resolve may leave: none (the download lock goes with it).
BOOKKEEPING: tuple[str, ...] = ()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs, unmounted afterwards; yields its path and a function to resize it."""
    mountpoint = str(tmp_path / "small")
    os.makedirs(mountpoint)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", mountpoint],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); "
                    "ENOSPC is only tested on a real filesystem")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", mountpoint], check=True)

    try:
        yield mountpoint, resize
    finally:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def files_of(seed: int, weights: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [("saved_model.pb", b"\x08\x01" + rng.randbytes(5000)),
            ("variables/variables.index", rng.randbytes(700)),
            ("variables/variables.data-00000-of-00001", rng.randbytes(weights)),
            ("assets/vocab.txt", b"\n".join(b"token%d" % i for i in range(2000)))]


def unchanged_except_bookkeeping(before: dict, after: dict, key: str) -> list[str]:
    """What differs between two snapshots, besides the refused key's lock/owner/use files."""
    ignore = {key + s for s in BOOKKEEPING}
    keys = (set(before) | set(after)) - ignore
    return sorted(k for k in keys if before.get(k) != after.get(k) and not (
        before.get(k, ("",))[0] == "dir" and after.get(k, ("",))[0] == "dir"))


def test_enospc_while_extracting(small_fs, monkeypatch, figures):
    """A 3 MiB model into a 2 MiB cache that already holds a small entry: a one-line CacheError,
    no temp dir, the small entry untouched and still a hit, the space given back; after the
    filesystem grows, the same resolve succeeds."""
    root, resize = small_fs
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    with OriginServer() as origin:
        small = origin.add("/full/small.tar.gz", make_archive(files_of(1, 100_000)))
        big_files = files_of(2, 3 << 20)
        big = origin.add("/full/big.tar.gz", make_archive(big_files))
        hubcache.resolve(small)
        before, free_before = snapshot(root), free_bytes(root)
        with pytest.raises(CacheError) as info:
            hubcache.resolve(big)
        message = str(info.value)
        assert message.startswith(repr(big)) and "no space left" in message and "\n" not in message
        assert leftovers(root) == []
        assert unchanged_except_bookkeeping(before, snapshot(root), cache_key(big)) == []
        assert free_bytes(root) >= free_before - PAGE, "the partial extraction's space was not given back"
        hubcache.resolve(small)
        assert origin.count("/full/small.tar.gz") == 1, "the small entry must still be a hit"
        resize("8m")
        assert tree(hubcache.resolve(big)) == dict(big_files)
    figures.update(run="2 MiB tmpfs holding a committed entry; a 3 MiB model resolved; then the fs grown to 8 MiB",
                   error="CacheError", message=message[:200], temp_left=0, free_bytes_before=free_before,
                   recovered_after_resize=True)


def test_enospc_at_every_allocation(small_fs, monkeypatch, figures):
    """Leave exactly N free pages, for N from just short of a full commit down to nothing: every
    failing resolve is a CacheError with no commit and no leftovers, and the first one that fits
    commits a complete entry."""
    root, _ = small_fs
    monkeypatch.setenv("TFHUB_CACHE_DIR", root)
    files = files_of(3, 40_000)
    with OriginServer() as origin:
        url = origin.add("/full/sweep.tar.gz", make_archive(files))
        key = cache_key(url)
        store = LocalStore(root)
        # Measure what one resolve needs, then give it back.
        free0 = free_bytes(root)
        hubcache.resolve(url)
        need_pages = (free0 - free_bytes(root)) // PAGE
        store.remove(key)
        resolver.clear_memo()
        outcomes: dict[int, str] = {}
        stages: set[str] = set()
        filler = os.path.join(root, "filler")
        # A resolve needs a few pages more while it runs than its entry keeps: the lock file's
        # note and the descriptor written before the commit (both gone once it is committed).
        for pages in range(need_pages + TRANSIENT_PAGES + 1, -1, -1):
            with open(filler, "wb") as f:  # leave exactly `pages` pages free
                f.write(bytes(free_bytes(root) - pages * PAGE))
            assert free_bytes(root) == pages * PAGE
            before = snapshot(root)
            resolver.clear_memo()
            try:
                path = hubcache.resolve(url)
            except CacheError as error:
                text = str(error)
                assert "no space left" in text and "\n" not in text, text
                stages.add(text.split(" while ")[1].split(" ")[0] if " while " in text else "?")
                assert store.lookup(key, url) is None, "a failed resolve left a committed entry"
                assert not os.path.exists(store.entry_path(key)), "an uncommitted entry dir was left"
                assert leftovers(root) == [], leftovers(root)
                assert unchanged_except_bookkeeping(before, snapshot(root), key) == []
                outcomes[pages] = "CacheError"
            else:
                assert tree(path) == dict(files) and store.verify(key, full=True) == []
                outcomes[pages] = "committed"
                store.remove(key)
    failing = sorted(p for p, o in outcomes.items() if o == "CacheError")
    fits = min(p for p, o in outcomes.items() if o == "committed")
    assert failing and max(failing) < fits <= need_pages + TRANSIENT_PAGES, (need_pages, outcomes)
    assert all(outcomes[p] == "CacheError" for p in range(0, fits))
    assert all(outcomes[p] == "committed" for p in outcomes if p >= fits)
    figures.update(run=f"free space set to N pages for N = {need_pages + TRANSIENT_PAGES + 1}..0 ({len(outcomes)} "
                       f"resolves) of a model whose entry keeps {need_pages} pages (it fits from {fits} free pages)",
                   resolves=len(outcomes), refused=len(failing), committed=len(outcomes) - len(failing),
                   enospc_while=", ".join(sorted(stages)), partial_commits=0, leftovers=0)
