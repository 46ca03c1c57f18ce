"""Unit tests of safe extraction (``hubcache.archive.extract``): member names, links, specials, limits.

Archives are built member by member with :mod:`tarfile` and unpacked with the real extractor into
a real :class:`~hubcache.stores.localstore.LocalWriter` temp dir, so every rule is checked against
what actually lands on disk. The conformance suite checks the hostile archives end to end; these
tests cover each rule's edges, including what must be *allowed*.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from hubcache import ArchiveError, UnsafeArchiveError
from hubcache.archive.extract import Contents, Limits, extract, member_path
from hubcache.stores.localstore import LocalStore

Member = tuple[tarfile.TarInfo, bytes | None]


def f(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def d(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def tar_of(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


MODEL = f("saved_model.pb", b"model bytes")


@pytest.fixture
def sandbox(tmp_path):
    """The directory that holds the cache and nothing else: anything else in it escaped."""
    path = tmp_path / "sandbox"
    path.mkdir()
    return path


@pytest.fixture
def unpack(sandbox):
    """Extract archive bytes into a fresh LocalWriter; returns ``(contents, temp dir)``."""
    store = LocalStore(str(sandbox / "cache"))

    def run(data: bytes, limits: Limits = Limits()) -> tuple[Contents, Path]:
        writer = store.writer("0" * 40, "test://handle")
        return extract(io.BytesIO(data), writer, limits), Path(writer.tmp)

    return run


def outside_is_untouched(sandbox: Path) -> None:
    """Nothing exists in the sandbox but the cache dir and the writers' temp dirs in it."""
    for path in sandbox.rglob("*"):
        parts = path.relative_to(sandbox).parts
        assert parts == ("cache",) or (parts[0] == "cache" and parts[1].endswith(".tmp")), path


# -- member names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("saved_model.pb", "saved_model.pb"),
    ("./variables/variables.index", "variables/variables.index"),
    ("variables//x/", "variables/x"),
    ("variables/./x", "variables/x"),
    ("assets\\vocab.txt", "assets/vocab.txt"),
    ("./", None),
    (".", None),
    ("", None),
    ("..data", "..data"),  # dots inside a name are fine
])
def test_member_path_normalises_safe_names(name, expected):
    assert member_path(name) == expected


@pytest.mark.parametrize("name", [
    "/etc/passwd", "\\windows\\system32", "C:evil", "c:\\evil", "//server/share",
    "..", "../escape", "a/../../escape", "variables\\..\\..\\escape",
    "a/../b",  # stays inside, but '..' is refused outright: no member name needs it
])
def test_member_path_refuses_absolute_and_dotdot(name):
    with pytest.raises(UnsafeArchiveError) as info:
        member_path(name)
    assert info.value.member == name and repr(name) in str(info.value)


# -- regular files and directories ----------------------------------------------------------------


def test_files_dirs_and_modes_land_where_they_should(unpack):
    contents, root = unpack(tar_of(
        d("./"), MODEL, d("./variables/"), f("./variables/variables.index", b"idx"),
        f("bin/run.sh", b"#!/bin/sh\n", mode=0o755), d("assets.extra/"),
    ))
    assert (root / "saved_model.pb").read_bytes() == b"model bytes"
    assert (root / "variables" / "variables.index").read_bytes() == b"idx"
    assert os.access(root / "bin" / "run.sh", os.X_OK)
    assert not os.access(root / "saved_model.pb", os.X_OK)
    assert (root / "assets.extra").is_dir()
    assert sorted(contents.files) == ["bin/run.sh", "saved_model.pb", "variables/variables.index"]
    assert contents.dirs == {"variables", "bin", "assets.extra"}
    assert contents.files["variables/variables.index"].size == 3
    assert contents.format == "tar"


def test_a_later_member_of_the_same_name_replaces_the_earlier(unpack):
    contents, root = unpack(tar_of(MODEL, f("saved_model.pb", b"second")))
    assert (root / "saved_model.pb").read_bytes() == b"second"
    assert contents.files["saved_model.pb"].size == 6


def test_a_file_may_not_replace_a_directory(unpack):
    with pytest.raises(UnsafeArchiveError, match="replaces a directory"):
        unpack(tar_of(d("variables/"), f("variables", b"flat")))


def test_a_member_under_a_file_is_refused(unpack):
    with pytest.raises(UnsafeArchiveError, match="needs 'saved_model.pb' to be a directory"):
        unpack(tar_of(MODEL, f("saved_model.pb/inner")))


def test_compressed_input_is_detected_and_recorded(unpack):
    contents, root = unpack(gzip.compress(tar_of(MODEL)))
    assert contents.format == "gz" and (root / "saved_model.pb").exists()


# -- symlinks ------------------------------------------------------------------------------------


def test_symlinks_that_stay_inside_are_kept(unpack, sandbox):
    contents, root = unpack(tar_of(
        MODEL, f("assets/vocab.txt", b"a\nb\n"), d("variables/"),
        sym("model.pb", "saved_model.pb"),
        sym("variables/vocab", "../assets/vocab.txt"),
        sym("assets_alias", "assets"),
        sym("dangling", "not-yet-there"),  # a link to a missing name inside is harmless
    ))
    assert os.readlink(root / "model.pb") == "saved_model.pb"
    assert (root / "variables" / "vocab").read_bytes() == b"a\nb\n"
    assert (root / "assets_alias" / "vocab.txt").read_bytes() == b"a\nb\n"
    assert contents.symlinks == {"model.pb": "saved_model.pb", "variables/vocab": "../assets/vocab.txt",
                                 "assets_alias": "assets", "dangling": "not-yet-there"}
    outside_is_untouched(sandbox)


# Links leaving the entry, links through links in either order, loops and '..foo' siblings are
# resolved end to end from a loopback origin in tests/reliability/test_escape.py.


def test_a_symlink_through_another_symlink_is_refused(unpack):
    # 'up' looks harmless alone, but 'up/..' would be resolved through a link by the OS.
    with pytest.raises(UnsafeArchiveError, match="through another symlink"):
        unpack(tar_of(MODEL, d("a/"), sym("a/up", ".."), sym("esc", "a/up/x")))


@pytest.mark.parametrize("second", [f("link/x.txt"), d("link/sub/"), sym("link/s", "y")])
def test_nothing_is_written_through_a_symlink(unpack, sandbox, second):
    with pytest.raises(UnsafeArchiveError, match="through the symlink 'link'"):
        unpack(tar_of(MODEL, d("variables/"), sym("link", "variables"), second))
    outside_is_untouched(sandbox)


def test_a_symlink_may_be_replaced_by_a_file_of_the_same_name(unpack):
    contents, root = unpack(tar_of(MODEL, sym("x", "saved_model.pb"), f("x", b"real")))
    assert not (root / "x").is_symlink() and (root / "x").read_bytes() == b"real"
    assert "x" not in contents.symlinks and "x" in contents.files


# -- hard links ------------------------------------------------------------------------------------


def test_a_hardlink_to_an_earlier_file_is_a_copy_of_it(unpack):
    contents, root = unpack(tar_of(MODEL, hard("copy.pb", "saved_model.pb"),
                                   hard("./sub/copy2.pb", "./saved_model.pb")))
    assert (root / "copy.pb").read_bytes() == b"model bytes"
    assert (root / "sub" / "copy2.pb").read_bytes() == b"model bytes"
    assert contents.files["copy.pb"].crc32 == contents.files["saved_model.pb"].crc32
    assert contents.files["sub/copy2.pb"].size == len(b"model bytes")


@pytest.mark.parametrize("members, linkname", [
    ([hard("early", "saved_model.pb"), MODEL], "saved_model.pb"),  # target comes later
    ([MODEL, hard("evil", "missing")], "missing"),
    ([MODEL, d("variables/"), hard("evil", "variables")], "variables"),  # a directory
    ([MODEL, sym("s", "saved_model.pb"), hard("evil", "s")], "s"),  # a symlink
    ([MODEL, hard("evil", "/etc/passwd")], "/etc/passwd"),
    ([MODEL, hard("evil", "../outside")], "../outside"),
    ([MODEL, hard("evil", "./")], "./"),
])
def test_hardlinks_to_anything_but_an_earlier_file_are_refused(unpack, sandbox, members, linkname):
    with pytest.raises(UnsafeArchiveError) as info:
        unpack(tar_of(*members))
    assert linkname in str(info.value) or info.value.member == linkname
    outside_is_untouched(sandbox)


# -- special files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, word", [
    (tarfile.CHRTYPE, "character device"),
    (tarfile.BLKTYPE, "block device"),
    (tarfile.FIFOTYPE, "fifo"),
    (b"Z", "special file"),  # a type tarfile does not know (CONTTYPE would be a regular file)
])
def test_devices_and_fifos_are_refused(unpack, sandbox, kind, word):
    with pytest.raises(UnsafeArchiveError, match=word) as info:
        unpack(tar_of(MODEL, special("dev/thing", kind)))
    assert info.value.member == "dev/thing"
    for path in sandbox.rglob("*"):
        assert not stat.S_ISCHR(path.lstat().st_mode) and not stat.S_ISFIFO(path.lstat().st_mode)


# -- limits and broken streams -----------------------------------------------------------------


def test_member_count_limit(unpack):
    members = [MODEL] + [f(f"f{i}") for i in range(4)]
    unpack(tar_of(*members), Limits(max_members=5))
    with pytest.raises(UnsafeArchiveError, match="more than 4 members"):
        unpack(tar_of(*members), Limits(max_members=4))


def test_size_limit_is_checked_before_the_member_is_written(unpack):
    members = [MODEL, f("weights.bin", bytes(5000))]
    unpack(tar_of(*members), Limits(max_bytes=5000 + len(b"model bytes")))
    with pytest.raises(UnsafeArchiveError, match="more than 5000 bytes") as info:
        unpack(tar_of(*members), Limits(max_bytes=5000))
    assert info.value.member == "weights.bin"


def test_too_much_data_after_the_tar_end_is_refused(unpack):
    # The tar ends early, but the compressed stream goes on: it is drained against the limit.
    # (tarfile reads ahead 1 MiB, so the tail must be longer than that to reach the drain.)
    body = gzip.compress(tar_of(MODEL) + bytes(4 << 20))
    with pytest.raises(UnsafeArchiveError, match="after its end"):
        unpack(body, Limits(max_bytes=1 << 20))
    contents, _ = unpack(body, Limits(max_bytes=8 << 20))
    assert list(contents.files) == ["saved_model.pb"]


def test_a_tar_cut_inside_a_member_is_an_archive_error(unpack):
    data = tar_of(MODEL, f("weights.bin", bytes(range(256)) * 100))
    with pytest.raises(ArchiveError, match="truncated|damaged"):
        unpack(data[:512 * 3 + 100])


@pytest.mark.parametrize("body, message", [
    (b"", "empty body"),
    (b"<html><body>Please sign in</body></html>", "HTML page"),
    (bytes(10240), "not a tar archive"),  # nothing but end-of-archive blocks
    (gzip.compress(b"plain text, not a tar\n" * 100, mtime=0), "not a tar archive"),  # mtime=0: the same id in every xdist worker
])
def test_non_archives_are_archive_errors(unpack, body, message):
    with pytest.raises(ArchiveError, match=message):
        unpack(body)
