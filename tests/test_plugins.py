"""Plugins as a third party ships them: a distribution on sys.path with `hubcache` entry points.

The distributions are real ``*.dist-info`` directories placed on ``PYTHONPATH`` of a child
process, which is exactly how importlib.metadata discovers installed packages; no mocks.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hubcache.core.hookspecs import HookSpecs
from hubcache.testing import archive_of

ROOT = Path(__file__).resolve().parents[1]

PLUGIN_SOURCE = '''
"""A third-party plugin: backend `echo` and handles `echo://NAME` mapped onto a directory."""
import os
import hubcache
from hubcache.core.backend import Backend
from hubcache.core.locate import Location


class EchoBackend(Backend):
    name = "echo"
    description = "returns where the handle was located"
    settings = {"ECHO_ROOT": "where echo:// handles point"}

    def resolve(self, handle, location):
        return "echo:" + location.url


@hubcache.hookimpl
def hubcache_register_backends(register):
    register(EchoBackend)


@hubcache.hookimpl
def hubcache_locate(handle, load_format):
    if handle.scheme == "echo":
        return Location(os.path.join(os.environ["ECHO_ROOT"], handle.url[7:]), "directory")
    return None


EVENTS = []


@hubcache.hookimpl
def hubcache_event(event):
    if event.kind == "committed":
        print("EVENT", event.kind, event.handle, flush=True)
'''


def make_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> None:
    # Wheels name the directory with underscores; a dash would make importlib.metadata read the
    # name as everything before the first dash (and hide hubcache itself).
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hubcache]\n{lines}\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    make_distribution(site, "hubcache-echo", "1.2.3", {"echo": "hubcache_echo"},
                      {"hubcache_echo": PLUGIN_SOURCE})
    make_distribution(site, "hubcache-broken", "0.0.1", {"broken": "hubcache_broken"},
                      {"hubcache_broken": "raise ImportError('needs libfoo, which is missing')\n"})
    return site


def run(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(site), **env)
    return subprocess.run([sys.executable, "-m", "hubcache", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_third_party_backend_and_locator_are_used(site, tmp_path):
    (tmp_path / "models" / "bert").mkdir(parents=True)
    result = run(site, "resolve", "echo://bert", HUBCACHE_BACKEND="echo", ECHO_ROOT=str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "echo:" + str(tmp_path / "models" / "bert")


def test_plugins_lists_distribution_backends_hooks_and_failures(site):
    result = run(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    # Other third-party plugins installed in the environment (the S3 example) are listed too.
    assert {"echo", "broken"} <= set(rows)
    assert not any(row["builtin"] for row in rows.values()), "built-ins are shown only with --all"
    echo = rows["echo"]
    assert (echo["distribution"], echo["version"], echo["status"]) == ("hubcache-echo", "1.2.3", "loaded")
    assert echo["backends"] == ["echo"]
    assert echo["hooks"] == ["hubcache_event", "hubcache_locate", "hubcache_register_backends"]
    assert rows["broken"]["status"] == "failed"
    assert "needs libfoo" in rows["broken"]["error"]
    everything = {row["name"] for row in json.loads(run(site, "plugins", "--all", "--json").stdout)}
    assert {"tmp", "home", "progress", "echo", "broken"} <= everything
    text = run(site, "plugins").stdout
    assert "hubcache-echo 1.2.3" in text and "needs libfoo" in text


def test_broken_plugin_does_not_break_resolving(site, tmp_path, model):
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(archive_of(model))
    result = run(site, "resolve", str(archive), TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    path = result.stdout.splitlines()[-1]  # the echo plugin's event line comes first
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))


def test_disabled_plugin_is_not_loaded(site, tmp_path):
    result = run(site, "plugins", "--json", HUBCACHE_DISABLE_PLUGINS="echo, broken")
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["echo"]["status"] == rows["broken"]["status"] == "disabled"
    result = run(site, "resolve", "echo://x", HUBCACHE_BACKEND="echo", HUBCACHE_DISABLE_PLUGINS="echo",
                 ECHO_ROOT=str(tmp_path))
    assert result.returncode == 1
    assert "no backend named 'echo'" in result.stderr
    assert re.search(r"installed backends: [^)]*\bhome\b[^)]*\btmp\b", result.stderr)
    assert "Traceback" not in result.stderr


def test_event_hook_reaches_plugins(site, tmp_path, model):
    archive = tmp_path / "m.tar.zst"
    archive.write_bytes(archive_of(model, "zst"))
    result = run(site, "resolve", str(archive), TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"EVENT committed {archive}" in result.stdout


HOOKS = [name for name, _ in inspect.getmembers(HookSpecs, inspect.isfunction)]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_typed_documented_and_tested(hook):
    spec = getattr(HookSpecs, hook)
    doc = inspect.getdoc(spec) or ""
    assert "Example::" in doc, f"{hook} needs an example in its docstring"
    assert "first result" in doc.lower() or "every implementation" in doc.lower(), \
        f"{hook}'s docstring must say whether the first result wins"
    annotations = inspect.get_annotations(spec)
    params = [p for p in inspect.signature(spec).parameters if p != "self"]
    assert set(params) <= set(annotations) and "return" in annotations, f"{hook} must be fully typed"
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    assert re.search(rf"^#+ `{hook}\(", contributing, re.M), f"CONTRIBUTING.md must document {hook}"
    here = Path(__file__).read_text()
    assert f"def {hook}(" in here, f"a test plugin must implement {hook}"


def test_backend_declared_settings_are_shown_and_invalidate_the_memo(site, tmp_path):
    (tmp_path / "a" / "bert").mkdir(parents=True)
    (tmp_path / "b" / "bert").mkdir(parents=True)
    config = run(site, "config", "--json", HUBCACHE_BACKEND="echo", ECHO_ROOT=str(tmp_path / "a"))
    declared = json.loads(config.stdout)["backend_settings"]
    assert declared == {"ECHO_ROOT": {"value": str(tmp_path / "a"), "source": "env",
                                      "help": "where echo:// handles point"}}
    # In one process: a declared variable changing must not return the memoised old path.
    script = (
        "import os, hubcache\n"
        f"os.environ['ECHO_ROOT'] = {str(tmp_path / 'a')!r}\n"
        "print(hubcache.resolve('echo://bert'))\n"
        f"os.environ['ECHO_ROOT'] = {str(tmp_path / 'b')!r}\n"
        "print(hubcache.resolve('echo://bert'))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(site), HUBCACHE_BACKEND="echo"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["echo:" + str(tmp_path / "a" / "bert"), "echo:" + str(tmp_path / "b" / "bert")]
