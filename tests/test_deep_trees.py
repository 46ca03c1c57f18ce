"""Trees of any depth: ``hubcache.core.treewalk`` and every maintenance command on an entry
nested thousands of directories deep (legal on Linux; ``os.walk``/``shutil.rmtree`` recurse and
full paths pass ``PATH_MAX`` there).

Deep trees are built with ``dir_fd`` loops, as an attacker (or a strange model) would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat

import pytest

from hubcache.core import treewalk

DEPTH = 3000


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest removes old temp dirs with ``shutil.rmtree``, which a deep tree crashes
    (``RecursionError``), in this session and in every later one: remove them here."""
    yield
    for name in os.listdir(tmp_path):
        treewalk.rmtree(os.path.join(tmp_path, name), ignore_errors=True)


def make_deep(root: str, depth: int = DEPTH, *, name: str = "d", payload: bytes = b"0123456789",
              bottom: dict[str, str] | None = None) -> list[str]:
    """A chain of ``depth`` directories ``name`` under ``root``, a file ``f`` holding ``payload``
    at every level, and at the bottom the symlinks in ``bottom`` (name -> target). Returns the
    relative paths of the files."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    files = []
    try:
        for level in range(depth):
            with open(os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd), "wb") as f:
                f.write(payload)
            files.append("/".join([name] * level + ["f"]))
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        for link, target in (bottom or {}).items():
            os.symlink(target, link, dir_fd=fd)
    finally:
        os.close(fd)
    return files


@contextlib.contextmanager
def few_fds(spare: int = 12):
    """Lower RLIMIT_NOFILE to what is open now plus ``spare``: proves the walk keeps O(1) fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = max(int(n) for n in os.listdir("/proc/self/fd")) + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + spare, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_tree_3000_deep_is_walked_measured_and_removed_with_few_fds(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    root = str(tmp_path / "deep")
    files = make_deep(root, bottom={"out": str(outside), "keep": str(outside / "keep.txt")})
    os.mkfifo("fifo", dir_fd=(fd := treewalk.open_beneath(root, "/".join(["d"] * DEPTH), os.O_RDONLY | os.O_DIRECTORY)))
    os.close(fd)
    assert len("/".join(["d"] * DEPTH)) > 4096 * 1.4
    with few_fds():
        walked = list(treewalk.walk(root))
        assert [d.path for d in walked] == ["/".join(["d"] * i) for i in range(DEPTH + 1)]
        assert sum(len(d.files) for d in walked) == DEPTH
        bottom = walked[-1]
        assert sorted(bottom.symlinks) == ["keep", "out"] and bottom.other == ["fifo"] and bottom.dirs == []
        assert treewalk.disk_usage(root) == 10 * DEPTH  # the link to the outside file is not counted
        treewalk.rmtree(root)
    assert not os.path.lexists(root)
    assert (outside / "keep.txt").read_text() == "precious", "rmtree followed a link out"


def test_walk_and_disk_usage_never_follow_links(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "big").write_bytes(b"x" * 5000)
    root = tmp_path / "entry"
    root.mkdir()
    (root / "a").write_bytes(b"abc")
    (root / "dirlink").symlink_to(outside)
    (root / "filelink").symlink_to(outside / "sub" / "big")
    walked = list(treewalk.walk(str(root)))
    assert [(d.path, d.dirs, d.files, sorted(d.symlinks)) for d in walked] == [("", [], ["a"], ["dirlink", "filelink"])]
    assert treewalk.disk_usage(str(root)) == 3
    # A root that is itself a link is neither walked nor measured through.
    (tmp_path / "rootlink").symlink_to(outside)
    assert list(treewalk.walk(str(tmp_path / "rootlink"))) == []
    assert treewalk.disk_usage(str(tmp_path / "rootlink")) == 0


def test_rmtree_of_a_link_removes_the_link_only_and_a_missing_path_is_fine(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("x")
    (tmp_path / "link").symlink_to(outside)
    treewalk.rmtree(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link") and (outside / "x").exists()
    treewalk.rmtree(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("f")
    treewalk.rmtree(str(tmp_path / "file"))
    assert not (tmp_path / "file").exists()


def test_rmtree_removes_links_fifos_and_unreadable_names(tmp_path):
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "loop").symlink_to("loop")
    (root / "a" / "up").symlink_to("../..")
    os.mkfifo(root / "a" / "b" / "pipe")
    (root / "a" / "b" / "f").write_bytes(b"1")
    treewalk.rmtree(str(root))
    assert not os.path.lexists(root) and tmp_path.exists()


def test_walk_editing_dirs_prunes_it(tmp_path):
    for name in ("keep/x", "skip/y"):
        (tmp_path / "t" / name).mkdir(parents=True)
    seen = []
    for d in treewalk.walk(str(tmp_path / "t")):
        seen.append(d.path)
        if "skip" in d.dirs:
            d.dirs.remove("skip")
    assert seen == ["", "keep", "keep/x"]


def test_walk_never_climbs_out_of_a_directory_moved_away_meanwhile(tmp_path):
    """Going back up is checked against the inode seen on the way down: a directory moved out of
    the tree while the walk is inside it does not lead the walk into its new parent."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x").mkdir()
    (root / "a" / "x" / "mine").write_text("1")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "x").mkdir(parents=True)
    (elsewhere / "x" / "secret").write_text("2")
    seen = {}
    for d in treewalk.walk(str(root)):
        seen[d.path] = d.files
        if d.path == "a":
            d.dirs[:] = ["b", "x"]  # b first
        if d.path == "a/b":
            os.rename(root / "a" / "b", elsewhere / "b")  # '..' of b is now `elsewhere`
    assert seen == {"": [], "a": [], "a/b": [], "a/x": ["mine"]}


def test_open_beneath_refuses_every_link_on_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "entry"
    (root / "real").mkdir(parents=True)
    (root / "real" / "f").write_text("ok")
    (root / "via").symlink_to(outside)
    (root / "real" / "fl").symlink_to(outside / "secret")
    os.mkfifo(root / "pipe")
    fd = treewalk.open_beneath(str(root), "real/f")
    assert os.read(fd, 10) == b"ok"
    os.close(fd)
    for rel, code in (("via/secret", (errno.ELOOP, errno.ENOTDIR)), ("real/fl", (errno.ELOOP,)),
                      ("../outside/secret", (errno.EINVAL,)), ("real/../f", (errno.EINVAL,)),
                      ("/etc/passwd", (errno.EINVAL,)), ("", (errno.EINVAL,))):
        with pytest.raises(OSError) as caught:
            treewalk.open_beneath(str(root), rel)
        assert caught.value.errno in code, rel
    with treewalk.Beneath(str(root)) as tree:
        with pytest.raises(OSError) as caught:
            tree.open_file("pipe")  # a FIFO: refused at once, never blocks
        assert caught.value.errno == errno.EINVAL
        assert stat.S_ISLNK(tree.lstat("real/fl").st_mode) and tree.readlink("real/fl") == str(outside / "secret")
    # The root itself is opened without following a link.
    (tmp_path / "rootlink").symlink_to(root)
    with pytest.raises(OSError):
        treewalk.open_beneath(str(tmp_path / "rootlink"), "real/f")


def test_beneath_reads_a_3000_deep_tree_in_one_pass(tmp_path):
    root = str(tmp_path / "deep")
    files = make_deep(root)
    with few_fds(), treewalk.Beneath(root) as tree:
        for rel in sorted(files) + files:  # deepest first, then shallowest first: both orders
            fd = tree.open_file(rel)
            assert os.read(fd, 100) == b"0123456789"
            os.close(fd)
            assert tree.lstat(rel).st_size == 10
