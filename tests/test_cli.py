"""The ``hubcache`` command, run as users run it: the installed script and ``python -m hubcache``
in subprocesses, against a real local origin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hubcache import __version__, cli
from hubcache.core.handles import cache_key
from hubcache.plugins.registry import get_registry
from hubcache.testing import archive_of, tree_of

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hubcache")
ENTRY_POINTS = {"script": [SCRIPT], "module": [sys.executable, "-m", "hubcache"]}


def run(*args: str, how: str = "script", env: dict[str, str] | None = None,
        drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env or {})
    return subprocess.run([*ENTRY_POINTS[how], *args], capture_output=True, text=True, timeout=60,
                          env=full_env, stdin=subprocess.DEVNULL)


def assert_clean_failure(out: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 1, exactly one line on stderr naming what failed, no traceback anywhere."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("hubcache: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


# -- help and version ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_help_lists_every_command(how):
    out = run("--help", how=how)
    assert out.returncode == 0 and out.stderr == ""
    names = commands()
    assert {"resolve", "config"} <= set(names)
    listed = out.stdout.split("commands:", 1)[1]
    for name in names:
        assert f"\n    {name} " in listed, f"`hubcache --help` does not list {name!r}"
    assert "TFHUB_CACHE_DIR" in out.stdout and "HUBCACHE_BACKEND" in out.stdout


def test_every_command_has_its_own_help(capsys):
    for name in commands():
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: hubcache {name}"), text[:80]


@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_version(how):
    out = run("--version", how=how)
    assert out.returncode == 0 and out.stdout.strip() == f"hubcache {__version__}"


def test_no_command_prints_usage_and_exits_2():
    out = run()
    assert out.returncode == 2 and "usage: hubcache" in out.stdout


def test_an_unknown_command_is_a_usage_error():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr


# -- resolve ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ENTRY_POINTS)
def test_resolve_prints_one_path_a_line_in_order(origin, model, how):
    a = origin.add("/a.tar.zst", archive_of(model, "zst"))
    b = origin.add_tfhub_model("/google/b/1", archive_of(model, "gz"))
    out = run("resolve", a, b, model, how=how)
    assert out.returncode == 0, out.stderr
    root = os.path.join(os.environ["TMPDIR"], "tfhub_modules")
    assert out.stdout.splitlines() == [os.path.join(root, cache_key(a)), os.path.join(root, cache_key(b)), model]
    assert tree_of(out.stdout.splitlines()[0]) == tree_of(model)
    # A second run in another process is a pure hit.
    origin.reset_counts()
    again = run("resolve", a, b, how=how)
    assert again.stdout.splitlines() == out.stdout.splitlines()[:2] and origin.count() == 0


def test_no_progress_output_when_stderr_is_not_a_terminal(origin, model):
    url = origin.add("/a.tar.gz", archive_of(model))
    out = run("resolve", url, drop=("HUBCACHE_NO_PROGRESS",))
    assert out.returncode == 0 and out.stderr == ""


def test_resolve_json(origin, model):
    good = origin.add("/a.tar.gz", archive_of(model))
    bad = origin.url("/missing.tar.gz")
    out = run("resolve", "--json", good, bad)
    assert out.returncode == 1
    results = json.loads(out.stdout)
    assert results[0] == {"handle": good, "path": os.path.join(os.environ["TMPDIR"], "tfhub_modules",
                                                               cache_key(good))}
    assert results[1]["handle"] == bad and results[1]["kind"] == "DownloadError"
    assert "404" in results[1]["error"]


def test_one_failing_handle_does_not_stop_the_others(origin, model):
    good = origin.add("/a.tar.gz", archive_of(model))
    bad = origin.url("/missing.tar.gz")
    out = run("resolve", bad, good)
    assert_clean_failure(out, bad, "HTTP 404")
    assert out.stdout.splitlines() == [os.path.join(os.environ["TMPDIR"], "tfhub_modules", cache_key(good))]


# -- errors: one line, exit 1, no traceback ----------------------------------------------------------


def test_404(origin):
    url = origin.url("/missing.tar.gz")
    assert_clean_failure(run("resolve", url), url, "HTTP 404")


def test_500_without_retries(origin):
    url = origin.add("/broken.tar.gz", b"", status=500)
    out = run("resolve", url, how="module", env={"HUBCACHE_RETRIES": "0"})
    assert_clean_failure(out, url, "HTTP 500", "1 attempt")
    assert origin.count() == 1


def test_html_instead_of_an_archive(origin):
    url = origin.add("/m.tar.gz", b"<!DOCTYPE html><html>Sign in</html>")
    assert_clean_failure(run("resolve", url), url, "HTML")


def test_unsafe_archive_names_the_member(origin):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    url = origin.add("/evil.tar", buf.getvalue())
    assert_clean_failure(run("resolve", url), url, "../../escape.txt")


def test_a_cut_connection(origin, model):
    data = archive_of(model)
    url = origin.add("/cut.tar.gz", data, ranges=False)
    origin.fail("/cut.tar.gz", ("cut", len(data) // 2))
    assert_clean_failure(run("resolve", url, env={"HUBCACHE_RETRIES": "0"}), url)


def test_unknown_backend_lists_the_installed_ones(origin):
    out = run("resolve", origin.url("/m.tar.gz"), env={"HUBCACHE_BACKEND": "nosuch"})
    assert_clean_failure(out, "nosuch", *sorted(get_registry().backends))
    assert origin.count() == 0


def test_invalid_load_format(origin):
    out = run("resolve", origin.url("/m.tar.gz"), env={"TFHUB_MODEL_LOAD_FORMAT": "fast"})
    assert_clean_failure(out, "TFHUB_MODEL_LOAD_FORMAT", "'fast'")


def test_missing_local_path(tmp_path):
    missing = str(tmp_path / "nothing-here")
    assert_clean_failure(run("resolve", missing), missing, "no such file or directory")


def test_wrong_pin(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    assert_clean_failure(run("resolve", f"{url}#sha256={'0' * 64}"), url, "sha256")


def test_unknown_scheme():
    assert_clean_failure(run("resolve", "nosuchproto://bucket/m.tar.gz"), "nosuchproto://")
