"""Every failure is a ``HubcacheError``: what a user can get wrong or an attacker can send, given
to the ``hubcache`` command as a real process: a redirect to ``file://``, a local path that is not
valid UTF-8, a ``TFHUB_CACHE_DIR`` that is a file or blank, an archive with a NUL byte in a member
or link name (pax headers, which can hold any byte). Each must end in exit status 1 and one line on
stderr (``hubcache: error: …`` naming the handle and what to do), never a traceback, with nothing
committed. And every maintenance command (``ls``, ``verify --full``, ``rm``) must work on whatever a
cache can hold: an entry nested 3,000 directories deep (legal on Linux; ``os.walk`` and
``shutil.rmtree`` recurse, and its full paths pass ``PATH_MAX``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest

import hubcache
from hubcache import ConfigError, UnsafeArchiveError
from hubcache.stores.treewalk import rmtree
from hubcache.testing import archive_of
from hostile_inputs import assert_one_line_error, run_cli
from hostile_tar_builders import header, member, pax, pax_records, tar
from local_layout import committed_names

SCENARIO = "16. Every failure is a HubcacheError"


def timed_cli(*args: str | bytes, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    out = run_cli(*args, env=env)
    return out, time.monotonic() - began


def cli_figures(out: subprocess.CompletedProcess, seconds: float) -> dict:
    """What the user saw: exit status, stderr's lines (the one error line shown), no traceback."""
    return {"exit_status": out.returncode, "stderr_lines": out.stderr.count(b"\n"),
            "traceback": b"Traceback" in out.stderr, "seconds": round(seconds, 2),
            "stderr": out.stderr.decode(errors="replace").strip()}


def committed(root: str) -> list[str]:
    return committed_names(root)


def test_a_redirect_to_file_through_the_cli(origin, figures):
    """The origin answers 302 to ``file:///etc/passwd``: refused at once, not retried."""
    url = origin.redirect("/models/m.tar.gz", "file:///etc/passwd")
    out, seconds = timed_cli("resolve", url)
    assert_one_line_error(out, url.encode(), b"file://")
    assert origin.count() == 1
    figures.update(run="`hubcache resolve` of a URL whose origin redirects to file:///etc/passwd",
                   origin_requests=origin.count(), **cli_figures(out, seconds))
    figures["stderr"] = figures["stderr"].replace(url, "URL")


def test_a_path_that_is_not_utf8_through_the_cli(model, tmp_path, figures):
    """A local archive whose name has the byte 0xff: a HandleError naming the byte."""
    raw = os.fsencode(str(tmp_path)) + b"/\xff.tar.gz"
    with open(raw, "wb") as f:
        f.write(archive_of(model))
    out, seconds = timed_cli("resolve", raw)
    assert_one_line_error(out, b"not valid UTF-8", b"0xff")
    figures.update(run="`hubcache resolve` of a local .tar.gz whose name holds the byte 0xff",
                   **cli_figures(out, seconds))
    figures["stderr"] = figures["stderr"].replace(str(tmp_path), "DIR")


@pytest.mark.parametrize("where", ["the file", "under the file"])
def test_a_cache_dir_that_is_a_file_is_a_config_error(origin, model, tmp_path, monkeypatch, where, figures):
    """TFHUB_CACHE_DIR names a file, or a path under one: a ConfigError naming the handle and the
    variable, from the API and from the command; the file is untouched, nothing is fetched."""
    afile = tmp_path / "not-a-dir"
    afile.write_text("hello")
    cache_dir = str(afile) if where == "the file" else str(afile / "cache")
    monkeypatch.setenv("TFHUB_CACHE_DIR", cache_dir)
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(ConfigError, match="is not a directory") as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert message.startswith(repr(url)) and "TFHUB_CACHE_DIR" in message and "\n" not in message
    assert origin.count() == 0 and afile.read_text() == "hello"
    out, seconds = timed_cli("resolve", url, env={"TFHUB_CACHE_DIR": cache_dir})
    assert_one_line_error(out, b"TFHUB_CACHE_DIR", url.encode())
    figures.update(run=f"TFHUB_CACHE_DIR={'a file' if where == 'the file' else 'a path under a file'}; "
                       "resolve (API, then `hubcache resolve`)",
                   error="ConfigError", origin_requests=origin.count(), **cli_figures(out, seconds))
    figures["stderr"] = figures["stderr"].replace(url, "URL").replace(str(tmp_path), "DIR")


@pytest.mark.parametrize("value", [" ", "\t \n"], ids=["space", "tab-space-newline"])
def test_a_blank_cache_dir_is_a_config_error(origin, model, monkeypatch, value, figures):
    """TFHUB_CACHE_DIR of white space only: a ConfigError that says to unset it, from ``resolve``
    and from ``config`` (an empty value means unset, as for tensorflow_hub)."""
    monkeypatch.setenv("TFHUB_CACHE_DIR", value)
    url = origin.add("/m.tar.gz", archive_of(model))
    with pytest.raises(ConfigError, match="TFHUB_CACHE_DIR.* is blank") as info:
        hubcache.resolve(url)
    assert "unset TFHUB_CACHE_DIR" in str(info.value) and "\n" not in str(info.value)
    out, seconds = timed_cli("resolve", url, env={"TFHUB_CACHE_DIR": value})
    assert_one_line_error(out, b"is blank")
    config = run_cli("config", env={"TFHUB_CACHE_DIR": value})
    assert_one_line_error(config, b"is blank")
    figures.update(run=f"TFHUB_CACHE_DIR={value!r}; resolve (API, `hubcache resolve`), `hubcache config`",
                   error="ConfigError", config_exit_status=config.returncode, **cli_figures(out, seconds))
    figures["stderr"] = figures["stderr"].replace(url, "URL")


NUL_MEMBERS = {
    "member name": pax(pax_records(path="saved\x00model.pb")) + member("x", b"1"),
    "symlink target": pax(pax_records(linkpath="saved\x00model.pb")) + header("l", 0, b"2"),
    "hard link target": pax(pax_records(linkpath="x\x00")) + header("h", 0, b"1"),
}


@pytest.mark.parametrize("where", sorted(NUL_MEMBERS))
def test_a_nul_in_a_member_name_through_the_cli(origin, where, figures):
    """A served .tar whose pax header puts a NUL byte in a name or a link target (before: a
    ``ValueError: embedded null byte`` from ``os.open``): an UnsafeArchiveError, nothing committed."""
    url = origin.add(f"/nul-{where.replace(' ', '-')}.tar",
                     tar(member("saved_model.pb", b"model"), NUL_MEMBERS[where]))
    with pytest.raises(UnsafeArchiveError, match="NUL"):
        hubcache.resolve(url)
    out, seconds = timed_cli("resolve", url)
    assert_one_line_error(out, url.encode(), b"NUL")
    root = os.path.join(tempfile.gettempdir(), "tfhub_modules")
    assert committed(root) == []
    figures.update(run=f"`hubcache resolve` of a .tar with a NUL byte in a {where} (pax header)",
                   error="UnsafeArchiveError", entries_committed=len(committed(root)), **cli_figures(out, seconds))
    figures["stderr"] = figures["stderr"].replace(url, "URL")


def test_maintenance_commands_on_a_3000_deep_entry(tmp_path, figures):
    """A cache holding 3,000-deep entries (tensorflow_hub's, a dead writer's leftover) and 2,000-deep
    committed ones, one damaged deep down, built as in ``tests/test_deep_trees.py``: ``ls``,
    ``verify --full`` and ``rm`` as real processes, no ``RecursionError``, nothing outside touched."""
    from test_deep_trees import HANDLES, cli, _world

    env, root, paths, outside = _world(str(tmp_path / "w"))
    try:
        code_ls, out, err, ls_seconds = cli(env, "ls")
        assert code_ls == 0 and "home: 4 entries" in out, out + err
        code_verify, out, err, verify_seconds = cli(env, "verify", "--full", HANDLES["committed"], HANDLES["damaged"])
        assert code_verify == 1 and "has CRC-32" in out, out + err  # the damaged one
        code_rm, out, err, rm_seconds = cli(env, "rm", HANDLES["committed"], HANDLES["foreign"])
        assert code_rm == 0, out + err
        assert not os.path.lexists(paths["committed"]) and not os.path.lexists(paths["foreign"])
        with open(outside) as f:
            assert f.read() == "not the cache's"
    finally:
        rmtree(str(tmp_path / "w"), ignore_errors=True)
    figures.update(run="`hubcache ls`, `verify --full` (one entry damaged 1,900 levels down), `rm` of a "
                       "3,000-deep tensorflow_hub entry and a 2,000-deep committed one",
                   depth=3000, ls_exit_status=code_ls, ls_seconds=round(ls_seconds, 2),
                   verify_full_exit_status=code_verify, verify_full_seconds=round(verify_seconds, 2),
                   rm_exit_status=code_rm, rm_seconds=round(rm_seconds, 2), traceback=False,
                   file_outside_changed=False)
