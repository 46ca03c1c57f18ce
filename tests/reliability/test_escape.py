"""Nothing outside the entry, whatever the order of the members: archives whose symlinks pass
through other symlinks (the outer link first, which escaped before and which ``verify --full``
called good, or the inner one first), self-loops, cycles and chains longer than Linux follows,
and links that point outside by ``..``, an absolute path, a drive or a UNC share are resolved
from a real loopback origin into a cache three levels deep in a sandbox; the whole sandbox is
snapshotted before and after. Each is refused with a one-line ``UnsafeArchiveError`` naming the
handle, nothing is committed, nothing is written outside the entry; a sibling named ``..foo`` is
a name, not a step up, and is kept. Member names and link targets are also judged with Windows'
rules (the package installs there), on this machine, through the same functions the extractor
uses (``hubcache.core.paths`` with ``windows=True``): a drive letter in any component, ``:``
streams, reserved device names, backslashes, and absolute or UNC link targets.

The same rules hold for entries written from something other than an archive; those have their
own tests: copies between cache tiers from a hostile source tier in ``tests/test_tier_copy_hostile.py``,
and adopting entries (and a shared cache created by another user) in ``tests/test_shared_cache.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time

import pytest

import hubcache
from hubcache import UnsafeArchiveError
from hubcache.core.paths import link_target, member_path

from hostile_tar_builders import info, tarfile_archive
from local_layout import manifest_data

from .helpers import leftovers, snapshot
from .test_hostile import origin, refuse, sandbox  # noqa: F401 (fixtures: loopback origin, sandbox)

SCENARIO = "11. Nothing outside the entry"

MODEL = info("saved_model.pb", b"model bytes")


def d(name: str):
    return info(name, None, tarfile.DIRTYPE)


def sym(name: str, target: str):
    return info(name, None, tarfile.SYMTYPE, linkname=target)


def archive(*members) -> bytes:
    """A .tar.gz of the model file and ``members``, in exactly this order."""
    return gzip.compress(tarfile_archive(MODEL, *members, fmt=tarfile.GNU_FORMAT), mtime=0)


def refused_end_to_end(origin, sandbox, case: str, body: bytes, words: str, figures: dict,
                       member: str | None = None) -> UnsafeArchiveError:
    """Resolve ``body`` from the origin: refused as unsafe (``words`` in the one-line message),
    nothing committed, nothing outside the entry (``refuse`` compares sandbox snapshots)."""
    name = "".join(c if c.isalnum() else "_" for c in case)[:60]
    error, seconds, _ = refuse(origin, sandbox, name, body)
    assert isinstance(error, UnsafeArchiveError), repr(error)
    assert words in error.message, error.message
    if member is not None:
        assert error.member == member, error.member
    root, _ = sandbox
    assert open(os.path.join(root, "a", "victim.txt")).read() == "must stay as it is"
    figures.update(run=f"resolve a .tar.gz ({len(body)} bytes) holding {case}", error=type(error).__name__,
                   message=error.message[:110], refused_in_s=round(seconds, 3),
                   files_outside=0)  # refuse() compared the sandbox before and after
    return error


# -- links through links, loops, links leaving the entry ------------------------------------------

#: case -> the members after the model file (the first link of each is the outer one).
THROUGH_LINKS = {
    # the outer link first: alone, 'out' resolves inside; 'sub -> ..' then makes it the parent's
    "d/out -> sub/x, then d/sub -> ..": [d("d/"), sym("d/out", "sub/x"), sym("d/sub", "..")],
    "out -> a/up/../.., then a/up -> ..": [d("a/"), sym("out", "a/up/../.."), sym("a/up", "..")],
    "d/x -> p/q/../../.., then d/p/q -> ..": [d("d/"), sym("d/x", "p/q/../../.."), d("d/p/"), sym("d/p/q", "..")],
    # and the inner link first, for good measure
    "inner first: d/sub -> .., then d/out -> sub/x": [d("d/"), sym("d/sub", ".."), sym("d/out", "sub/x")],
}


@pytest.mark.parametrize("case", list(THROUGH_LINKS))
def test_a_link_through_a_link_is_refused_whichever_comes_first(case, origin, sandbox, figures):
    """A symlink whose target passes through another symlink, in either order (before: a link
    written before the links it passes through was never checked again, and the entry was
    committed with a link leading outside it)."""
    refused_end_to_end(origin, sandbox, case, archive(*THROUGH_LINKS[case]), "through another symlink", figures)


LOOPS = {
    "l -> l": ([sym("l", "l")], "itself"),
    "l -> ./l": ([sym("l", "./l")], "itself"),
    "a/l -> ../a/l/../x": ([d("a/"), sym("a/l", "../a/l/../x")], "through itself"),
    "a -> b, b -> a": ([sym("a", "b"), sym("b", "a")], "symlink cycle"),
    "41 links in a chain": ([sym(f"l{i}", f"l{i + 1}") for i in range(41)], "chain of more than 40"),
}


@pytest.mark.parametrize("case", list(LOOPS))
def test_symlink_loops_are_refused(case, origin, sandbox, figures):
    """Self-loops, cycles and chains longer than the 40 links Linux follows."""
    members, words = LOOPS[case]
    refused_end_to_end(origin, sandbox, case, archive(*members), words, figures)


LEAVING = {
    "evil -> ../outside": ("evil", "../outside"),
    "a/evil -> ../../outside": ("a/evil", "../../outside"),
    "a/b/evil -> ../x/../../../outside": ("a/b/evil", "../x/../../../outside"),
    "evil -> /etc/passwd": ("evil", "/etc/passwd"),
    "evil -> C:\\Windows": ("evil", "C:\\Windows"),
    "evil -> \\\\server\\share (UNC)": ("evil", "\\\\server\\share"),
    "evil -> //server/share": ("evil", "//server/share"),
    "evil -> '' (empty)": ("evil", ""),
}


@pytest.mark.parametrize("case", list(LEAVING))
def test_symlinks_that_leave_the_entry_are_refused(case, origin, sandbox, figures):
    """Links pointing outside by ``..``, an absolute path, a drive, a UNC share, or nowhere."""
    name, target = LEAVING[case]
    refused_end_to_end(origin, sandbox, case, archive(sym(name, target)), "", figures, member=name)


def test_a_sibling_named_dotdot_something_is_inside(origin, sandbox, figures):
    """``..foo`` is a name, not a step up: links to it are kept (before: the text check saw
    ``..`` and refused it)."""
    root, cache = sandbox
    body = archive(d("a/"), info("..foo", b"f"), sym("a/l", "../..foo"), sym("m", "..foo"))
    url = origin.add("/escape/dotdot-sibling.tar.gz", body)
    before = snapshot(root)
    began = time.perf_counter()
    path = hubcache.resolve(url)
    seconds = time.perf_counter() - began
    with open(os.path.join(path, "a", "l"), "rb") as f:
        assert f.read() == b"f"
    assert manifest_data(cache, os.path.basename(path))["symlinks"] == {"a/l": "../..foo", "m": "..foo"}
    # Nothing new outside the cache dir; every link of the entry resolves inside it.
    inside = os.path.relpath(cache, root)
    outside = [p for p in snapshot(root) if p not in before and p != inside and not p.startswith(inside + os.sep)]
    assert outside == [], outside
    for link in ("a/l", "m"):
        assert os.path.realpath(os.path.join(path, link)).startswith(os.path.realpath(path) + os.sep)
    assert leftovers(cache) == []
    figures.update(run="resolve a .tar.gz holding '..foo', a/l -> ../..foo and m -> ..foo",
                   outcome="committed, links kept", resolved_in_s=round(seconds, 3), files_outside=0)


# -- Windows' rules, judged on this machine ------------------------------------------------------

WINDOWS_NAMES = [
    ("models/D:x", "drive letter or an alternate data stream"),
    ("file:stream", "alternate data stream"), ("a/b.txt:$DATA", "alternate data stream"),
    ("CON", "reserved device name"), ("a/nul", "reserved device name"), ("nul.txt", "reserved device name"),
    ("Aux.tar.gz", "reserved device name"), ("lpt9", "reserved device name"), ("x/COM1.bin", "reserved device name"),
    ("com\u00b9", "reserved device name"), ("prn .txt", "reserved device name"), ("CONIN$", "reserved device name"),
    ("x.", "ends with a dot or a space"), ("a/dir./b", "ends with a dot or a space"), ("a /b", "ends with a dot"),
    ("a<b", "forbids"), ("a>b", "forbids"), ('a"b', "forbids"), ("a|b", "forbids"), ("a?b", "forbids"),
    ("a*b", "forbids"), ("a\x01b", "forbids"), ("d/a\x1fb", "forbids"),
]


@pytest.mark.parametrize("name, words", WINDOWS_NAMES, ids=[ascii(n) for n, _ in WINDOWS_NAMES])
def test_member_path_windows_rules(name, words, figures):
    """Member names Windows cannot create or would misread are refused with Windows' rules
    (``member_path(name, windows=True)``, the default on Windows); Linux takes them as they are."""
    began = time.perf_counter()
    with pytest.raises(UnsafeArchiveError, match=words) as caught:
        member_path(name, windows=True)
    seconds = time.perf_counter() - began
    assert caught.value.member == name
    assert member_path(name, windows=False) == name  # Linux takes it as it is
    figures.update(run=f"member name {ascii(name)} with Windows' rules", error=type(caught.value).__name__,
                   message=str(caught.value)[:110], refused_in_s=round(seconds, 6), on_linux="accepted as is")


#: Link targets: refused only with Windows' rules, then absolute, drive and UNC targets (refused on
#: every platform; the words their one-line message holds).
WINDOWS_TARGETS = [("sub/nul", None), ("x/a:b", None), ("dir./f", None), ("a?", None),
                   ("\\x", "absolute"), ("\\\\server\\share", "absolute"), ("//server/share", "absolute"),
                   ("C:\\Windows", "drive"), ("C:x", "drive"), ("D:x", "drive")]


@pytest.mark.parametrize("target, words", WINDOWS_TARGETS, ids=[ascii(t) for t, _ in WINDOWS_TARGETS])
def test_link_target_windows_rules(target, words, figures):
    """Link targets judged with Windows' rules (``link_target("l", target, windows=True)``):
    drive letters, reserved names and streams are refused there; absolute, drive and UNC
    targets everywhere."""
    began = time.perf_counter()
    with pytest.raises(UnsafeArchiveError) as caught:
        link_target("l", target, windows=True)
    seconds = time.perf_counter() - began
    if words is None:
        assert link_target("l", target, windows=False) == target
        on_linux = "accepted as is"
    else:
        with pytest.raises(UnsafeArchiveError, match=words) as linux:
            link_target("l", target, windows=False)
        assert linux.value.member == "l" and "\n" not in str(linux.value)
        on_linux = "refused too"
    figures.update(run=f"symlink l -> {ascii(target)} with Windows' rules", error=type(caught.value).__name__,
                   message=str(caught.value)[:110], refused_in_s=round(seconds, 6), on_linux=on_linux)
