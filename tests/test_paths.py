"""The shared rules for names inside an entry (``hubcache.core.paths``).

Windows' rules are tested here on Linux by passing ``windows=True``: the functions are pure text
checks, so the semantics are the same on any host (and the same names must pass with
``windows=False`` where Linux takes them).
"""

from __future__ import annotations

import time

import pytest

from hubcache import UnsafeArchiveError
from hubcache.core.manifest import FileRecord, Manifest
from hubcache.core.paths import EntryTree, Limits, link_target, member_path, validate_manifest

# -- member_path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("saved_model.pb", "saved_model.pb"),
    ("./variables/variables.index", "variables/variables.index"),
    ("variables//x/", "variables/x"),
    ("variables/./x", "variables/x"),
    (".//./a", "a"),
    ("assets\\vocab.txt", "assets/vocab.txt"),
    ("./", None), (".", None), ("", None), ("././/", None),
    ("..data", "..data"), ("a/..b/c..", "a/..b/c.."),  # dots inside a name are fine
    ("ab:c", "ab:c"), ("models/D:x", "models/D:x"),  # ':' is a plain character on Linux
    ("nul.txt", "nul.txt"), ("CON", "CON"), ("x.", "x."), ("a ", "a "), ("a?b", "a?b"), ("a\x01b", "a\x01b"),
    ("x" * 255, "x" * 255), ("/".join(["d"] * 2000), "/".join(["d"] * 2000)),
    ("caf\udcc3", "caf\udcc3"),  # an undecodable byte, as tarfile hands it over: a valid name on Linux
])
def test_member_path_normal_form(name, expected):
    assert member_path(name, windows=False) == expected


@pytest.mark.parametrize("name, words", [
    ("/etc/passwd", "absolute"), ("\\windows\\system32", "absolute"), ("C:evil", "absolute"),
    ("c:\\evil", "absolute"), ("a:b", "absolute"),  # a drive, even on Linux (as always)
     ("//server/share", "absolute"), ("\\\\server\\share\\x", "absolute"),
    ("..", "'..'"), ("../escape", "'..'"), ("a/../../escape", "'..'"), ("variables\\..\\..\\escape", "'..'"),
    ("a/../b", "'..'"),  # stays inside, but '..' is refused outright: no member name needs it
    ("a\x00b", "NUL"), ("a/b\x00", "NUL"),
    ("x" * 256, "longer than 255 bytes"), ("a/" + "\u00e9" * 128, "longer than 255 bytes"),
    ("/".join(["d"] * 2049), "longer than 4096 bytes"), ("x" * 5000, "longer than 4096 bytes"),
    ("a/\ud800", "lone surrogate"),  # not even Linux can store it (only from a manifest, not tarfile)
])
def test_member_path_refusals_everywhere(name, words):
    for windows in (False, True):
        with pytest.raises(UnsafeArchiveError, match=words) as info:
            member_path(name, windows=windows)
        assert info.value.member == name
        assert str(info.value).startswith("archive member ") and "\n" not in str(info.value)


# Windows' refusals of member names and link targets (drive letters, streams, reserved names,
# absolute and UNC targets) are documented by tests/reliability/test_escape.py.


@pytest.mark.parametrize("name", ["console", "null", "com10", "lpt", "auxiliary.txt", "CONx", "a.b.c", "..x"])
def test_names_that_only_look_reserved_pass_on_windows(name):
    assert member_path(name, windows=True) == name


def test_the_name_in_messages_follows_what():
    with pytest.raises(UnsafeArchiveError, match=r"^manifest entry '\.\./x' leaves the entry"):
        member_path("../x", what="manifest entry")


# -- link_target ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path, target, resolved", [
    ("l", "saved_model.pb", "saved_model.pb"),
    ("variables/vocab", "../assets/vocab.txt", "assets/vocab.txt"),
    ("a/b/l", "../../x/./y", "x/y"),
    ("a/b/l", "./c//d/", "a/b/c/d"),
    ("a/l", "..", ""),  # the entry's root is inside
    ("a/l", "../..foo", "..foo"),  # a sibling named '..foo' is not outside
    ("l", "..foo/bar", "..foo/bar"),
    ("l", "ab:c", "ab:c"),
])
def test_link_target_resolves_lexically(path, target, resolved):
    assert link_target(path, target, windows=False) == resolved


@pytest.mark.parametrize("path, target, words", [
    ("l", "", "empty"), ("l", "a\x00b", "NUL"), ("l", "/etc/passwd", "absolute"), ("l", "a\\b", "backslash"),
    ("l", "../x", "outside"), ("a/l", "../../x", "outside"),
    ("a/b/l", "../x/../../../outside", "outside"), ("l", "x/../..", "outside"),
    ("l", "l", "itself"), ("l", "./l", "itself"), ("a/l", "../a/l", "itself"), ("l", "l/x", "itself"),
    ("l", "x" * 256, "longer than 255"), ("l", "../" * 1400, "longer than 4096"),
])
def test_link_target_refusals(path, target, words):
    with pytest.raises(UnsafeArchiveError, match=words) as info:
        link_target(path, target, windows=False)
    assert info.value.member == path and "\n" not in str(info.value)


# -- EntryTree -----------------------------------------------------------------------------------


def refused(steps, words: str, limits: Limits = Limits()) -> UnsafeArchiveError:
    """Apply ``steps`` (method name, args...) to a fresh tree, then finish(); expect a refusal."""
    tree = EntryTree(limits, windows=False)
    with pytest.raises(UnsafeArchiveError, match=words) as info:
        for method, *args in steps:
            getattr(tree, method)(*args)
        tree.finish()
    return info.value


def accepted(steps, limits: Limits = Limits()) -> EntryTree:
    tree = EntryTree(limits, windows=False)
    for method, *args in steps:
        getattr(tree, method)(*args)
    tree.finish()
    return tree


# A link whose target walks through another link escapes or loops, in either order.
THROUGH_LINKS = {
    "out -> sub/x, then sub -> ..": [("add_dir", "d"), ("add_symlink", "d/out", "sub/x"),
                                     ("add_symlink", "d/sub", "..")],
    "outer first: out -> a/up/../.., then a/up -> ..": [("add_dir", "a"), ("add_symlink", "out", "a/up/../.."),
                                                        ("add_symlink", "a/up", "..")],
    "outer first, deep: x -> p/q/r/f, then p/q -> ../..": [("add_symlink", "x", "p/q/r/f"), ("add_dir", "p"),
                                                           ("add_symlink", "p/q", "..")],
    "a file replaced by a link after a target walked through it": [
        ("add_symlink", "x", "f/y"), ("add_file", "f", 1), ("add_symlink", "f", ".")],
}


@pytest.mark.parametrize("name", sorted(THROUGH_LINKS))
def test_a_link_through_another_link_is_refused_in_either_order(name):
    steps = THROUGH_LINKS[name]
    error = refused(steps, "through another symlink")
    assert error.member in {step[1] for step in steps}
    # The reverse order (the inner link first) is refused too.
    links = [s for s in steps if s[0] == "add_symlink"]
    others = [s for s in steps if s[0] != "add_symlink"]
    refused(others + links[::-1], "through another symlink")


@pytest.mark.parametrize("steps, words", [
    ([("add_symlink", "l", "l")], "itself"),
    ([("add_dir", "a"), ("add_symlink", "a/l", "../a/l/../x")], "through itself"),
    ([("add_symlink", "a", "b"), ("add_symlink", "b", "a")], "symlink cycle"),
    ([("add_symlink", "a", "d/b"), ("add_symlink", "d/b", "../c"), ("add_symlink", "c", "a")], "symlink cycle"),
    ([("add_symlink", f"l{i}", f"l{i + 1}") for i in range(41)], "chain of more than 40"),
])
def test_loops_and_long_chains_are_refused(steps, words):
    refused(steps, words)


def test_what_stays_inside_is_accepted():
    tree = accepted([
        ("add_file", "saved_model.pb", 5),
        ("add_symlink", "model.pb", "saved_model.pb"),
        ("add_symlink", "variables/vocab", "../assets/vocab.txt"),  # target comes later
        ("add_file", "assets/vocab.txt", 3),
        ("add_symlink", "alias", "assets"),
        ("add_symlink", "dangling", "not/yet/there"),
        ("add_symlink", "sib", "..foo"),
        ("add_file", "..foo", 1),
        ("add_symlink", "root", "."),
        ("add_symlink", "chain0", "chain1"), ("add_symlink", "chain1", "model.pb"),
        *[("add_symlink", f"c{i}", f"c{i + 1}") for i in range(39)], ("add_file", "c39", 0),
        ("add_hardlink", "copy.pb", "saved_model.pb"),
    ])
    assert tree.total_bytes == 5 + 3 + 1 + 5


@pytest.mark.parametrize("steps, words", [
    ([("add_dir", "link"), ("add_symlink", "s", "link"), ("add_file", "s/x", 1)], "through the symlink 's'"),
    ([("add_symlink", "s", "x"), ("add_dir", "s/sub")], "through the symlink 's'"),
    ([("add_symlink", "s", "x"), ("add_symlink", "s/t", "y")], "through the symlink 's'"),
    ([("add_file", "f", 1), ("add_file", "f/x", 1)], "needs 'f' to be a directory"),
    ([("add_file", "f", 1), ("add_dir", "f")], "needs to be a directory"),
    ([("add_dir", "d"), ("add_file", "d", 1)], "replaces a directory"),
    ([("add_file", "d/x", 1), ("add_symlink", "d", "x")], "replaces a directory"),
    ([("add_symlink", "s", "f"), ("add_file", "f", 1), ("add_hardlink", "h", "s")], "not a file earlier"),
    ([("add_hardlink", "h", "later")], "not a file earlier"),
    ([("add_dir", "d"), ("add_hardlink", "h", "d")], "not a file earlier"),
    ([("add_file", "f", 1), ("add_hardlink", "f", "f")], "hard link to itself"),
    ([("add_file", "./x", 1)], "normal form"),
    ([("add_file", "a//b", 1)], "normal form"),
    ([("add_file", "a\\b", 1)], "normal form"),
    ([("add_dir", "")], "normal form"),
    ([("add_file", "f", -1)], "invalid size"),
    ([("add_file", "f", True)], "invalid size"),
])
def test_tree_rules(steps, words):
    refused(steps, words)


def test_later_files_and_links_replace_earlier_ones():
    tree = accepted([
        ("add_file", "x", 10), ("add_file", "x", 3),  # replaced: counted once in the total
        ("add_symlink", "s", "x"), ("add_file", "s", 1), ("add_symlink", "s", "x"),
        # a replaced link's target no longer walks: 'p' may become a link now
        ("add_symlink", "t", "p/q"), ("add_file", "t", 0), ("add_symlink", "p", "x"),
    ])
    assert tree.total_bytes == 3


def test_limits_count_implied_directories_and_hardlink_copies():
    refused([("add_file", "a/b/c/d", 1)], "more than 3 members", Limits(max_members=3))
    accepted([("add_file", "a/b/c/d", 1)], Limits(max_members=4))
    refused([("add_file", "f", 600), ("add_hardlink", "g", "f")], "more than 1000 bytes", Limits(max_bytes=1000))
    refused([("add_symlink", f"l{i}", f"missing{i}/x/y") for i in range(4)], "paths that do not exist",
            Limits(max_members=10))


def test_checks_are_linear_in_depth():
    """A tree at the member limit whose paths are 2,000 names deep takes seconds, not hours
    (a check that joined every prefix of every path was quadratic in the depth)."""
    depth, limits = 2000, Limits(max_members=50_000)
    dirs = ["/".join(["a"] * i) for i in range(1, depth + 1)]
    began = time.perf_counter()
    tree = EntryTree(limits, windows=False)
    tree.add_file(dirs[-1] + "/f", 0)  # makes the 2,000 directories at once
    for i in range(limits.max_members - depth - 1 - 2000):
        tree.add_file(member_path(dirs[(i * 7919) % depth] + f"/f{i}"), 0)  # scattered: no locality
    deep_target = "/".join(["a"] * (depth - 1)) + "/f"
    for i in range(1000):
        tree.add_symlink(f"l{i}", deep_target)
        tree.add_symlink(f"ll{i}", f"l{i}")
    tree.finish()
    seconds = time.perf_counter() - began
    assert tree.members == limits.max_members
    assert seconds < 10, f"{seconds:.1f} s"


# -- validate_manifest -----------------------------------------------------------------------------


def manifest(files=(), dirs=(), symlinks=None) -> Manifest:
    return Manifest(handle="h", files=[FileRecord(p, s, "00000000") for p, s in files], dirs=list(dirs),
                    symlinks=dict(symlinks or {}))


def test_a_sound_manifest_passes():
    validate_manifest(manifest(files=[("saved_model.pb", 3), ("variables/v.index", 0)],
                               dirs=["variables", "assets"], symlinks={"m.pb": "saved_model.pb",
                                                                        "variables/a": "../assets"}))


@pytest.mark.parametrize("kwargs, words", [
    ({"files": [("a//b", 1)]}, "normal form"),
    ({"files": [("./x", 1)]}, "normal form"),
    ({"files": [("a/../b", 1)]}, "'..'"),
    ({"dirs": ["a/"]}, "normal form"),
    ({"files": [("/etc/passwd", 1)]}, "absolute"),
    ({"files": [("x", True)]}, "invalid size"),
    ({"files": [("x", -5)]}, "invalid size"),
    ({"files": [("x", 1), ("x", 1)]}, "listed twice"),
    ({"files": [("x", 1)], "dirs": ["x"]}, "as both a directory and a file"),
    ({"files": [("x", 1)], "symlinks": {"x": "y"}}, "as both a file and a symlink"),
    ({"symlinks": {"l": "../../etc"}}, "outside"),
    ({"symlinks": {"a": "b", "b": "a"}}, "cycle"),
    ({"symlinks": {"out": "up/x", "up": "."}}, "through another symlink"),
    ({"files": [("l/x", 1)], "symlinks": {"l": "d"}}, "replaces a directory"),
    ({"files": [("f", 1), ("f/g", 1)]}, "needs 'f' to be a directory"),
])
def test_a_manifest_is_untrusted_input(kwargs, words):
    with pytest.raises(UnsafeArchiveError, match=words) as info:
        validate_manifest(manifest(**kwargs), windows=False)
    assert str(info.value).startswith(("manifest entry", "the manifest"))


def test_manifest_limits_and_windows_names():
    big = manifest(files=[("a", 600), ("b", 600)])
    validate_manifest(big, Limits(max_bytes=1200))
    with pytest.raises(UnsafeArchiveError, match="more than 1000 bytes"):
        validate_manifest(big, Limits(max_bytes=1000))
    many = manifest(files=[(f"d/f{i}", 0) for i in range(5)], dirs=["d"])
    validate_manifest(many, Limits(max_members=6))
    with pytest.raises(UnsafeArchiveError, match="more than 5 members"):
        validate_manifest(many, Limits(max_members=5))
    odd = manifest(files=[("models/D:x", 1)])
    validate_manifest(odd, windows=False)
    with pytest.raises(UnsafeArchiveError, match="alternate data stream"):
        validate_manifest(odd, windows=True)
