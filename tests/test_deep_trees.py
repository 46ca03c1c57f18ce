"""Trees of any depth: ``hubcache.stores.treewalk`` and every maintenance command on an entry
nested thousands of directories deep (legal on Linux; ``os.walk``/``shutil.rmtree`` recurse and
full paths pass ``PATH_MAX`` there).

Deep trees are built with ``dir_fd`` loops, as an attacker (or a strange model) would.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import stat
import subprocess
import sys
import time
import zlib

import pytest

from hubcache.stores import treewalk
from hubcache.core.handles import cache_key
from hubcache.core.manifest import FileRecord, Manifest, crc_hex
from hubcache.testing import SETTINGS, archive_of, tree_of
from local_layout import write_manifest_json

DEPTH = 3000


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """pytest removes old temp dirs with ``shutil.rmtree``, which a deep tree crashes
    (``RecursionError``), in this session and in every later one: remove them here."""
    yield
    for name in os.listdir(tmp_path):
        treewalk.rmtree(os.path.join(tmp_path, name), ignore_errors=True)


def make_deep(root: str, depth: int = DEPTH, *, name: str = "d", payload: bytes = b"0123456789",
              bottom: dict[str, str] | None = None, every: int = 1) -> list[str]:
    """A chain of ``depth`` directories ``name`` under ``root``, a file ``f`` holding ``payload``
    every ``every`` levels, and at the bottom the symlinks in ``bottom`` (name -> target).
    Returns the relative paths of the files."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    files = []
    try:
        for level in range(depth):
            if level % every == 0:
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
    files = make_deep(root, every=10, bottom={"out": str(outside), "keep": str(outside / "keep.txt")})
    os.mkfifo("fifo", dir_fd=(fd := treewalk.open_beneath(root, "/".join(["d"] * DEPTH), os.O_RDONLY | os.O_DIRECTORY)))
    os.close(fd)
    assert len("/".join(["d"] * DEPTH)) > 4096 * 1.4
    with few_fds():
        walked = list(treewalk.walk(root))
        assert [d.path for d in walked] == ["/".join(["d"] * i) for i in range(DEPTH + 1)]
        assert sum(len(d.files) for d in walked) == len(files) == DEPTH // 10
        bottom = walked[-1]
        assert sorted(bottom.symlinks) == ["keep", "out"] and bottom.other == ["fifo"] and bottom.dirs == []
        assert treewalk.disk_usage(root) == 10 * len(files)  # the link to the outside file is not counted
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
    files = make_deep(root, every=10)
    with few_fds(), treewalk.Beneath(root) as tree:
        for rel in sorted(files) + files:  # deepest first, then shallowest first: both orders
            fd = tree.open_file(rel)
            assert os.read(fd, 100) == b"0123456789"
            os.close(fd)
            assert tree.lstat(rel).st_size == 10


# -- every maintenance command, as a real process, on entries 3000 directories deep --------------

HUBCACHE = [sys.executable, "-m", "hubcache"]
HANDLES = {state: f"https://models.invalid/deep-{state}.tar.gz"
           for state in ("committed", "damaged", "foreign", "leftover")}


#: The deepest entry hubcache can commit: its paths stay within PATH_MAX (4096 bytes), as
#: every archive member's must; still far beyond the recursion limit of os.walk/shutil.rmtree,
#: and the full paths of its files pass PATH_MAX once the cache root is put in front.
COMMIT_DEPTH = 2000


def _plant(root: str, handle: str, state: str, outside: str) -> str:
    """A deep entry for ``handle`` in the cache at ``root``, in ``state``; returns its path.

    ``committed`` and ``damaged`` (one byte flipped deep down, same size, which only ``--full``
    sees) entries are :data:`COMMIT_DEPTH` deep with a manifest; ``foreign`` (tensorflow_hub's)
    and ``leftover`` (a dead writer's temp dir) ones are :data:`DEPTH` deep, with a link to
    ``outside`` at the bottom, never to be followed.
    """
    key = cache_key(handle)
    path = os.path.join(root, key if state != "leftover" else f"{key}.hc99999-0badc0de.tmp")
    committed = state in ("committed", "damaged")
    depth = COMMIT_DEPTH if committed else DEPTH
    files = make_deep(path, depth, every=100, bottom=None if committed else {"out": outside})
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"pb")
    writer = "Writer: hubcache 0.0\n" if state != "foreign" else ""
    with open(os.path.join(root, f"{key}.descriptor.txt"), "w") as f:
        f.write(f"Module: {handle}\n{writer}")
    if committed:
        manifest = Manifest(handle=handle, source=handle, creator="test")
        manifest.files = sorted([FileRecord(rel, 10, crc_hex(zlib.crc32(b"0123456789"))) for rel in files]
                                + [FileRecord("saved_model.pb", 2, crc_hex(zlib.crc32(b"pb")))],
                                key=lambda r: r.path)
        manifest.dirs = ["/".join(["d"] * i) for i in range(1, depth + 1)]
        write_manifest_json(root, key, manifest.to_json())
    if state == "damaged":
        fd = treewalk.open_beneath(path, files[-1], os.O_WRONLY)
        os.write(fd, b"X")
        os.close(fd)
    return path


def _env(base: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    os.makedirs(os.path.join(base, "tmp"), exist_ok=True)
    env.update(TMPDIR=os.path.join(base, "tmp"), XDG_CACHE_HOME=os.path.join(base, "home-cache"),
               HUBCACHE_BACKEND="home", HUBCACHE_NO_PROGRESS="1")
    return env


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str, float]:
    """Run ``hubcache *args`` as a real process; no traceback allowed."""
    started = time.perf_counter()
    done = subprocess.run([*HUBCACHE, *args], capture_output=True, text=True, timeout=300, env=env)
    seconds = time.perf_counter() - started
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stdout, done.stderr, seconds


def _world(base: str) -> tuple[dict[str, str], str, dict[str, str], str]:
    env = _env(base)
    root = json.loads(cli(env, "config", "--json")[1])["backend_details"]["root"]
    os.makedirs(root)
    outside = os.path.join(base, "outside.txt")
    with open(outside, "w") as f:
        f.write("not the cache's")
    paths = {state: _plant(root, handle, state, outside) for state, handle in HANDLES.items()}
    return env, root, paths, outside


@pytest.fixture(scope="module")
def deep_world(tmp_path_factory):
    """A home cache with one 3000-deep entry in each state, shared by the read-only tests.
    Yields (environment, cache root, {state: entry path}, a file outside every entry)."""
    base = str(tmp_path_factory.mktemp("deep-world"))
    yield _world(base)
    treewalk.rmtree(base, ignore_errors=True)


def test_ls_lists_deep_entries_in_every_state(deep_world):
    env = deep_world[0]
    code, out, err, _ = cli(env, "ls", "--json")
    assert code == 0, err
    listed = {e["key"]: e for e in json.loads(out)["entries"]}
    assert {state: listed[cache_key(h)]["state"] for state, h in HANDLES.items()} == {
        "committed": "committed", "damaged": "committed",  # the sizes are right
        "foreign": "foreign", "leftover": "in progress"}
    # A foreign entry's size is measured on disk: 30 files of 10 bytes and saved_model.pb.
    assert listed[cache_key(HANDLES["foreign"])]["bytes"] == 30 * 10 + 2
    assert listed[cache_key(HANDLES["committed"])]["files"] == 21
    code, out, err, _ = cli(env, "ls")
    assert code == 0 and "home: 4 entries" in out, out + err


def test_verify_and_verify_full_check_deep_entries(deep_world):
    env, _, paths, _ = deep_world
    assert len(os.path.join(paths["committed"], *["d"] * COMMIT_DEPTH)) > 4096  # beyond PATH_MAX
    code, out, err, _ = cli(env, "verify", "--json")
    by_key = {r["key"]: r for r in json.loads(out)}
    assert {state: by_key[cache_key(h)]["status"] for state, h in HANDLES.items()} == {
        "committed": "ok", "damaged": "ok", "foreign": "foreign", "leftover": "leftover"}
    assert code == 1  # the leftover
    code, out, err, _ = cli(env, "verify", "--full", "--json", HANDLES["committed"], HANDLES["damaged"])
    by_key = {r["key"]: r for r in json.loads(out)}
    damaged = by_key[cache_key(HANDLES["damaged"])]
    assert by_key[cache_key(HANDLES["committed"])]["status"] == "ok" and damaged["status"] == "damaged"
    assert len(damaged["problems"]) == 1 and "has CRC-32" in damaged["problems"][0]
    assert damaged["problems"][0].startswith("/".join(["d"] * 1900) + "/f ")
    assert code == 1


def test_verify_full_names_what_a_deep_entry_holds_beyond_its_manifest_in_one_pass(tmp_path):
    """What ``verify --full`` reports as not in the manifest of a 2000-deep entry: a file and a
    folder planted 1500 levels down, nothing else. The folders above the manifest's names are
    built once each (one pass over the names): rebuilding every prefix of every name took 17-24 s
    for one such entry, the whole of ``verify --full``'s time."""
    from hubcache.stores.localstore import LocalStore
    from hubcache.maintenance.verify import _ancestors, unlisted

    store = LocalStore(str(tmp_path / "cache"))
    key = cache_key("https://models.invalid/deep-planted.tar.gz")
    files = make_deep(store.entry_path(key), COMMIT_DEPTH, every=100)
    planted = "/".join(["d"] * 1500)
    fd = treewalk.open_beneath(store.entry_path(key), planted, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir("planted-dir", dir_fd=fd)
        os.close(os.open("planted-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    manifest = Manifest(handle="h", source="h", creator="test")
    manifest.files = [FileRecord(rel, 10, crc_hex(zlib.crc32(b"0123456789"))) for rel in files]
    manifest.dirs = ["/".join(["d"] * i) for i in range(1, COMMIT_DEPTH + 1)]
    started = time.perf_counter()
    found = unlisted(store, key, manifest)
    seconds = time.perf_counter() - started
    assert found == [f"{planted}/planted-dir/", f"{planted}/planted-file"]
    assert seconds < 5, f"{seconds:.1f} s"
    # The same folders as every prefix of every name, odd names included.
    names = ["a/b/c", "a/b/d", "a//b", "/x/y", "e/", "f", *files[:5]]
    assert _ancestors(names) == {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}


def test_info_describes_deep_entries(deep_world):
    env = deep_world[0]
    code, out, err, _ = cli(env, "info", HANDLES["committed"])
    assert code == 0 and "committed, 202 B in 21 files" in out, out + err
    code, out, err, _ = cli(env, "info", HANDLES["foreign"], "--json")
    assert code == 0 and json.loads(out)["tiers"][0]["state"] == "foreign"


def test_repair_prune_and_rm_deep_entries(tmp_path, origin, model):
    env, root, paths, outside = _world(str(tmp_path / "w"))
    url = origin.add("/deep-damaged.tar.gz", archive_of(model))
    bad = _plant(root, url, "damaged", outside)
    # verify --repair: the damaged deep entry is replaced by a fresh download, the leftover goes.
    code, out, err, _ = cli(env, "verify", "--full", "--repair", url, cache_key(HANDLES["leftover"]))
    assert code == 0, out + err
    assert f"repaired      {url}" in out and "cleaned" in out
    assert tree_of(bad) == tree_of(model) and origin.count() == 1
    assert not os.path.lexists(paths["leftover"])
    # prune: a deep entry damaged by size (a file gone) is debris; the others are kept.
    os.unlink(os.path.join(paths["damaged"], "saved_model.pb"))
    code, out, err, _ = cli(env, "prune")
    assert code == 0, out + err
    assert not os.path.lexists(paths["damaged"])
    assert os.path.isdir(paths["committed"]) and os.path.isdir(paths["foreign"])
    # rm: committed and foreign deep entries.
    code, out, err, _ = cli(env, "rm", HANDLES["committed"], HANDLES["foreign"])
    assert code == 0, out + err
    assert not os.path.lexists(paths["committed"]) and not os.path.lexists(paths["foreign"])
    left = [n for n in os.listdir(root) if n.startswith((cache_key(HANDLES["committed"]), cache_key(HANDLES["foreign"])))]
    assert left == [], left
    assert not [n for n in os.listdir(root) if ".hc" in n], "no temp or trash dir left"
    with open(outside) as f:
        assert f.read() == "not the cache's"


@pytest.mark.parametrize("where", ["descriptor", "older manifest file"])
def test_a_manifest_nested_200000_levels_deep_breaks_no_command(tmp_path, where):
    """JSON nesting is a tree too: ``json.loads`` recurses and raises ``RecursionError`` (not a
    ``ValueError``) on ``[[[[…`` 200000 deep, a 400 KB file anyone who can write the cache can plant
    (as the descriptor's manifest, or as the ``.manifest.json`` an older hubcache kept)."""
    env = _env(str(tmp_path))
    root = json.loads(cli(env, "config", "--json")[1])["backend_details"]["root"]
    os.makedirs(root)
    handle = "https://models.invalid/nested-json.tar.gz"
    key = cache_key(handle)
    os.makedirs(os.path.join(root, key))
    with open(os.path.join(root, key, "saved_model.pb"), "wb") as f:
        f.write(b"pb")
    with open(os.path.join(root, f"{key}.descriptor.txt"), "w") as f:
        f.write(f"Module: {handle}\nWriter: hubcache 0.0\n")
    nested = '{"format": 1, "handle": "h", "files": [], "archive": ' + "[" * 200_000 + "]" * 200_000 + "}"
    if where == "descriptor":
        write_manifest_json(root, key, nested)
    else:
        with open(os.path.join(root, f"{key}.manifest.json"), "w") as f:
            f.write(nested)
    for argv in (["ls"], ["verify"], ["info", handle], ["prune", "--dry-run"], ["rm", handle]):
        code, out, err, _ = cli(env, *argv)
        assert code in (0, 1), (argv, err)


def test_the_full_path_fallback_never_follows_links_either(tmp_path, monkeypatch):
    """Platforms without ``dir_fd`` (Windows) get path-based twins; run them here on POSIX."""
    monkeypatch.setattr(treewalk, "_FD_BASED", False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    root = str(tmp_path / "t")
    files = make_deep(root, 300, every=10, bottom={"out": str(outside), "f2": str(outside / "keep.txt")})
    walked = list(treewalk.walk(root))
    assert len(walked) == 301 and walked[-1].symlinks and walked[-1].dir_fd is None
    assert treewalk.disk_usage(root) == 10 * len(files)
    with treewalk.Beneath(root) as tree:
        fd = tree.open_file(files[-1])
        assert os.read(fd, 20) == b"0123456789"
        os.close(fd)
        with pytest.raises(OSError):
            tree.open_file("/".join(["d"] * 300) + "/out/keep.txt")
    treewalk.rmtree(root)
    assert not os.path.lexists(root) and (outside / "keep.txt").read_text() == "precious"
