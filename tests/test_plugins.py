"""Plugins as a third party ships them: a distribution on sys.path with `hubcache` entry points.

The distributions are real ``*.dist-info`` directories placed on ``PYTHONPATH`` of a child
process, which is exactly how importlib.metadata discovers installed packages; no mocks.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hubcache
from hubcache.plugins.hookspecs import HookSpecs
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


# -- how plugins are loaded (issue 13) ------------------------------------------------------------


def isolated_source_tree(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """A command prefix and environment running hubcache from a bare copy of ``src/`` with no
    ``hubcache`` distribution metadata anywhere on ``sys.path``.

    The venv installs hubcache editable: ``site`` reads ``__editable__.hubcache-*.pth`` (which puts
    the checkout's ``src`` on the path) and ``hubcache-*.dist-info`` sits in site-packages (which
    is where importlib.metadata finds the entry points). So the child runs with ``-S`` (no
    ``site``: no .pth file is processed) and gets, on ``PYTHONPATH``, the copy of the package and a
    directory of links to every other site-packages entry, so its dependencies (pluggy, fsspec,
    ...) still import while hubcache's own metadata and editable finders are left out.
    """
    src = tmp_path / "bare-src"
    shutil.copytree(ROOT / "src" / "hubcache", src / "hubcache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    deps = tmp_path / "deps"
    deps.mkdir()
    for site_dir in {p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir()}:
        for entry in site_dir.iterdir():
            if entry.name.lower().startswith(("hubcache", "__editable__")) or entry.suffix == ".pth":
                continue
            if not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(deps)])
    return [sys.executable, "-S"], env


def test_source_tree_without_metadata_still_has_the_builtins(tmp_path, model):
    prefix, env = isolated_source_tree(tmp_path)
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(archive_of(model))
    script = textwrap.dedent("""
        import json, sys
        from importlib import metadata
        import hubcache
        from hubcache.plugins.registry import get_registry
        registry = get_registry()
        print(json.dumps({
            "file": hubcache.__file__,
            "entry_points": [ep.value for ep in metadata.entry_points(group="hubcache")],
            "backends": sorted(registry.backends),
            "errors": {p.name: p.error for p in registry.plugins.values() if p.error},
            "path": hubcache.resolve(sys.argv[1]),
        }))
    """)
    result = subprocess.run([*prefix, "-c", script, str(archive)], capture_output=True, text=True,
                            env=dict(env, TMPDIR=str(tmp_path)), cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # The isolation holds: the copy is imported and no metadata declares its plugins.
    assert seen["file"] == str(tmp_path / "bare-src" / "hubcache" / "__init__.py")
    assert seen["entry_points"] == []
    assert {"tmp", "home", "gcs", "remote"} <= set(seen["backends"]) and not seen["errors"]
    assert os.path.isfile(os.path.join(seen["path"], "saved_model.pb"))
    # `hubcache plugins` says they are built in, from no distribution.
    listed = subprocess.run([*prefix, "-m", "hubcache", "plugins", "--all", "--json"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"tmp", "home", "gcs", "remote", "progress"}
    for name, row in rows.items():
        assert (row["builtin"], row["status"], row["distribution"]) == (True, "loaded", ""), row
    assert rows["progress"]["hooks"] == ["hubcache_event"] and rows["tmp"]["backends"] == ["tmp"]
    # HUBCACHE_DISABLE_PLUGINS blocks a built-in by its name, as before.
    blocked = subprocess.run([*prefix, "-m", "hubcache", "plugins", "--all", "--json"], capture_output=True,
                             text=True, env=dict(env, HUBCACHE_DISABLE_PLUGINS="gcs"), cwd=tmp_path,
                             timeout=60)
    rows = {row["name"]: row for row in json.loads(blocked.stdout)}
    assert rows["gcs"]["status"] == "disabled" and rows["tmp"]["status"] == "loaded"


def test_builtins_are_listed_once_and_as_builtin_when_also_entry_points(site):
    # The installed hubcache distribution declares its built-ins as entry points too.
    from importlib import metadata

    declared = {ep.name for ep in metadata.entry_points(group="hubcache") if ep.value.startswith("hubcache.")}
    assert {"tmp", "progress"} <= declared, "this test needs hubcache's own entry points installed"
    rows = json.loads(run(site, "plugins", "--all", "--json").stdout)
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names))
    by_name = {row["name"]: row for row in rows}
    for name in ("tmp", "home", "gcs", "remote", "progress"):
        assert by_name[name]["builtin"] and by_name[name]["distribution"] == "", by_name[name]
    assert not by_name["echo"]["builtin"]


def test_unmarked_register_backends_does_not_run():
    from hubcache.core.backend import Backend
    from hubcache.plugins.registry import Registry

    calls = []

    class Unmarked(Backend):
        name = "unmarked"

    class Plugin:
        """Names the hook but forgot ``@hubcache.hookimpl``: pluggy does not see it, nor may we."""

        def hubcache_register_backends(self, register):
            calls.append("ran")
            register(Unmarked)

    registry = Registry()  # a fresh one: the process-wide registry is left alone
    registry.register(Plugin(), "forgot-the-marker")
    assert calls == []
    assert "unmarked" not in registry.backends
    assert registry.plugins["forgot-the-marker"].hooks == []


SPELLING_SOURCE = '''
import hubcache
from hubcache.core.backend import Backend


class Never(Backend):
    name = "never"


@hubcache.hookimpl
def hubcache_register_backend(register):  # misspelt: the hook is hubcache_register_backends
    register(Never)


@hubcache.hookimpl
def hubcache_event(event):
    print("TYPO-PLUGIN-SAW", event.kind, flush=True)
'''


def test_misspelt_hook_is_reported_and_the_plugin_skipped(tmp_path, model):
    site = tmp_path / "site"
    make_distribution(site, "hubcache-typo", "0.1", {"typo": "hubcache_typo"}, {"hubcache_typo": SPELLING_SOURCE})
    result = run(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    row = {row["name"]: row for row in json.loads(result.stdout)}["typo"]
    assert row["status"] == "failed", row
    for word in ("'typo'", "'hubcache_register_backend'", "hubcache_register_backends", "hubcache_locate",
                 "hubcache_event"):
        assert word in row["error"], (word, row["error"])
    assert "\n" not in row["error"]
    assert "hubcache_register_backend'" in run(site, "plugins").stdout
    # Skipped entirely: hubcache still resolves, and none of the plugin's hooks runs.
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(archive_of(model))
    resolved = run(site, "resolve", str(archive), TMPDIR=str(tmp_path))
    assert resolved.returncode == 0, resolved.stderr
    assert "TYPO-PLUGIN-SAW" not in resolved.stdout
    assert os.path.isfile(os.path.join(resolved.stdout.strip(), "saved_model.pb"))


def test_misspelt_hook_registered_in_process_is_a_config_error():
    from hubcache.core.errors import ConfigError
    from hubcache.plugins.registry import Registry

    class Typo:
        @hubcache.hookimpl
        def hubcache_evnet(self, event):
            pass

    registry = Registry()
    with pytest.raises(ConfigError, match=r"'in-process'.*'hubcache_evnet'.*hubcache_event"):
        registry.register(Typo(), "in-process")
    assert registry.pm.get_plugin("in-process") is None  # not left half-registered


def test_verbose_configures_the_hubcache_logger_not_the_root_logger(tmp_path, model):
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(archive_of(model))
    script = textwrap.dedent("""
        import json, logging, sys
        from hubcache import cli
        root = logging.getLogger()
        before = (root.level, list(root.handlers))
        status = cli.main(["-v", "resolve", sys.argv[1]])
        print(json.dumps({"status": status, "root_unchanged": (root.level, list(root.handlers)) == before,
                          "root_level": root.level, "root_handlers": len(root.handlers)}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(archive)], capture_output=True, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == {"status": 0, "root_unchanged": True, "root_level": logging.WARNING, "root_handlers": 0}
    # -v still shows hubcache's own log lines.
    assert "hubcache: " in result.stderr and str(archive) in result.stderr


def test_entry_point_claiming_a_builtin_name_is_reported_not_shadowing(tmp_path, model):
    site = tmp_path / "site"
    make_distribution(site, "hubcache-impostor", "9.9", {"tmp": "hubcache_impostor"},
                      {"hubcache_impostor": PLUGIN_SOURCE})
    rows = json.loads(run(site, "plugins", "--all", "--json").stdout)
    tmp = [row for row in rows if row["name"] == "tmp"]
    assert [(row["builtin"], row["status"]) for row in tmp] == [(True, "loaded"), (False, "failed")], tmp
    assert "already taken by hubcache.backends.tmp" in tmp[1]["error"]
    assert tmp[1]["distribution"] == "hubcache-impostor"
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(archive_of(model))
    resolved = run(site, "resolve", str(archive), TMPDIR=str(tmp_path))
    assert resolved.returncode == 0, resolved.stderr
    assert "EVENT committed" not in resolved.stdout  # the impostor's hooks never run


def test_an_unhashable_plugin_object_registers_and_hears_events(model):
    """A plugin may be any object, hashable or not (a dataclass instance with ``eq`` is not):
    registering one must work, and its hooks run."""
    import dataclasses

    from hubcache.plugins.registry import get_registry

    @dataclasses.dataclass
    class Recorder:
        kinds: list = dataclasses.field(default_factory=list)

        @hubcache.hookimpl
        def hubcache_event(self, event) -> None:
            self.kinds.append(event.kind)

    recorder = Recorder()
    registry = get_registry()
    registry.register(recorder, "test-unhashable")
    try:
        from hubcache.plugins.registry import emit

        emit("waiting", "h", "tmp", path="p", holder="x")
    finally:
        registry.pm.unregister(name="test-unhashable")
    assert recorder.kinds == ["waiting"]
