"""Configuration: backend selection, TFHUB_CACHE_DIR, the absl flags, precedence, bad values,
and what ``hubcache config`` reports.

The absl tests run in subprocesses: flags are process-global, and a real program defines and
parses them once at start-up, which is exactly what these tests need to reproduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import hubcache
from hubcache import ConfigError
from hubcache.core.config import load_config, parse_size
from hubcache.core.handles import cache_key
from hubcache.plugins.registry import get_registry
from hubcache.testing import archive_of, tree_of

HUBCACHE_CLI = os.path.join(os.path.dirname(sys.executable), "hubcache")


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=60, env=full_env)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([HUBCACHE_CLI, *args], capture_output=True, text=True, timeout=60, env=full_env)


# -- backend selection ---------------------------------------------------------------------------


def test_the_default_backend_is_tmp_in_the_temp_dir(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert path == os.path.join(tempfile.gettempdir(), "tfhub_modules", cache_key(url))


@pytest.mark.parametrize("name, root_env", [("tmp", "TMPDIR"), ("home", "XDG_CACHE_HOME")])
def test_hubcache_backend_selects_a_backend_by_name(origin, model, monkeypatch, name, root_env):
    monkeypatch.setenv("HUBCACHE_BACKEND", name)
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert path == os.path.join(os.environ[root_env], "tfhub_modules", cache_key(url))
    assert tree_of(path) == tree_of(model)


def test_an_unknown_backend_is_an_error_listing_the_installed_ones(origin, monkeypatch):
    monkeypatch.setenv("HUBCACHE_BACKEND", "nosuch")
    url = origin.add("/m.tar.gz", b"never fetched")
    with pytest.raises(ConfigError, match="no backend named 'nosuch'") as info:
        hubcache.resolve(url)
    message = str(info.value)
    installed = sorted(get_registry().backends)
    assert {"tmp", "home"} <= set(installed)
    assert all(name in message for name in installed), message
    assert origin.count() == 0


@pytest.mark.parametrize("as_url", [False, True])
def test_tfhub_cache_dir_moves_the_cache(origin, model, monkeypatch, tmp_path, as_url):
    cache = tmp_path / "shared cache"  # a space, to be sure paths are not split or quoted
    monkeypatch.setenv("TFHUB_CACHE_DIR", f"file://{cache}" if as_url else str(cache))
    monkeypatch.chdir(tmp_path)
    url = origin.add("/m.tar.gz", archive_of(model))
    path = hubcache.resolve(url)
    assert path == str(cache / cache_key(url))
    assert tree_of(path) == tree_of(model)
    assert not (tmp_path / "file:").exists(), "a file:// cache dir must not become a relative path"


def test_tfhub_cache_dir_applies_to_the_home_backend_too(origin, model, monkeypatch, tmp_path):
    monkeypatch.setenv("HUBCACHE_BACKEND", "home")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "c"))
    url = origin.add("/m.tar.gz", archive_of(model))
    assert hubcache.resolve(url) == str(tmp_path / "c" / cache_key(url))


def test_changing_settings_in_process_takes_effect_at_once(origin, model, monkeypatch, tmp_path):
    url = origin.add("/m.tar.gz", archive_of(model))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "a"))
    first = hubcache.resolve(url)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "b"))
    second = hubcache.resolve(url)
    assert first.startswith(str(tmp_path / "a")) and second.startswith(str(tmp_path / "b"))
    assert origin.count() == 2


# -- invalid values -------------------------------------------------------------------------------


def test_an_invalid_load_format_is_a_clear_error(origin, monkeypatch):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", "ZIPPED")
    url = origin.add("/m.tar.gz", b"never fetched")
    with pytest.raises(ConfigError) as info:
        hubcache.resolve(url)
    message = str(info.value)
    assert "TFHUB_MODEL_LOAD_FORMAT" in message and "'ZIPPED'" in message
    assert "COMPRESSED" in message and "UNCOMPRESSED" in message and "AUTO" in message
    assert "\n" not in message and origin.count() == 0


@pytest.mark.parametrize("value", ["compressed", " Compressed ", "auto"])
def test_load_format_is_case_insensitive(origin, model, monkeypatch, value):
    monkeypatch.setenv("TFHUB_MODEL_LOAD_FORMAT", value)
    assert load_config()["load_format"] == value.strip().upper()
    url = origin.add("/m.tar.gz", archive_of(model))
    assert tree_of(hubcache.resolve(url)) == tree_of(model)


@pytest.mark.parametrize("name, value", [
    ("HUBCACHE_RETRIES", "many"), ("HUBCACHE_RETRIES", "-1"), ("HUBCACHE_TIMEOUT", "soon"),
    ("HUBCACHE_MAX_EXTRACT_SIZE", "big"), ("HUBCACHE_MAX_MEMBERS", "1.5"),
    ("HUBCACHE_DOWNLOAD_DEADLINE", "later"), ("HUBCACHE_DOWNLOAD_DEADLINE", "0"),
    ("HUBCACHE_DOWNLOAD_DEADLINE", "-5"), ("HUBCACHE_DOWNLOAD_DEADLINE", "inf"),
    ("HUBCACHE_DOWNLOAD_DEADLINE", "nan"),
])
def test_invalid_numeric_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_config()


@pytest.mark.parametrize("text, expected", [
    ("1000", 1000), ("4K", 4096), ("512M", 512 << 20), ("20G", 20 << 30), ("1.5GiB", 3 << 29),
    (" 2 t ", 2 << 40), ("7MB", 7 << 20),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_every_setting_knows_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HUBCACHE_RETRIES", "2")
    settings = load_config().settings
    assert (settings["cache_dir"].source, settings["cache_dir"].origin) == ("env", "TFHUB_CACHE_DIR")
    assert (settings["retries"].value, settings["retries"].source) == (2, "env")
    assert (settings["load_format"].value, settings["load_format"].source) == ("AUTO", "default")
    assert settings["backend"].source == "default"


# -- absl flags (each case is a fresh process, as a real program is) ----------------------------


def run_with_flags(url: str, *argv: str, env: dict[str, str] | None = None) -> dict:
    program = """
        import json, sys
        from absl import flags
        import hubcache
        from hubcache.core.config import load_config

        argv = flags.FLAGS(sys.argv)  # what absl.app.run does at start-up
        settings = load_config().settings
        report = {name: [settings[name].value, settings[name].source, settings[name].origin]
                  for name in ("cache_dir", "load_format")}
        report["path"] = hubcache.resolve(argv[1])
        print(json.dumps(report))
    """
    out = run_python(program, *argv, url, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("case", ["flag", "env beats flag", "default"])
def test_precedence_env_then_flag_then_default(origin, model, tmp_path, case):
    url = origin.add("/m.tar.gz", archive_of(model))
    flag_dir, env_dir = tmp_path / "from-flag", tmp_path / "from-env"
    argv = [] if case == "default" else [f"--tfhub_cache_dir={flag_dir}"]
    env = {"TFHUB_CACHE_DIR": str(env_dir)} if case == "env beats flag" else {}
    report = run_with_flags(url, *argv, env=env)
    expected_dir, source, origin_name = {
        "flag": (flag_dir, "flag", "--tfhub_cache_dir"),
        "env beats flag": (env_dir, "env", "TFHUB_CACHE_DIR"),
        "default": (None, "default", ""),
    }[case]
    assert report["cache_dir"] == [str(expected_dir) if expected_dir else None, source, origin_name]
    root = expected_dir or Path(tempfile.gettempdir()) / "tfhub_modules"
    assert report["path"] == str(root / cache_key(url))
    assert tree_of(report["path"]) == tree_of(model)


def test_load_format_flag_and_its_precedence(origin, model):
    url = origin.add("/m.tar.gz", archive_of(model))
    report = run_with_flags(url, "--tfhub_model_load_format=COMPRESSED")
    assert report["load_format"] == ["COMPRESSED", "flag", "--tfhub_model_load_format"]
    report = run_with_flags(url, "--tfhub_model_load_format=COMPRESSED",
                            env={"TFHUB_MODEL_LOAD_FORMAT": "AUTO"})
    assert report["load_format"] == ["AUTO", "env", "TFHUB_MODEL_LOAD_FORMAT"]


def test_flags_defined_first_by_the_program_are_reused_not_redefined(origin, model, tmp_path):
    # What tensorflow_hub does when imported before hubcache: define both flags itself.
    program = """
        import sys
        from absl import flags
        flags.DEFINE_string("tfhub_cache_dir", None, "defined by the program")
        flags.DEFINE_enum("tfhub_model_load_format", "AUTO", ["COMPRESSED", "UNCOMPRESSED", "AUTO"], "ditto")
        import hubcache  # must not raise DuplicateFlagError
        assert flags.FLAGS["tfhub_cache_dir"].help == "defined by the program"
        argv = flags.FLAGS(sys.argv)
        print(hubcache.resolve(argv[1]))
    """
    url = origin.add("/m.tar.gz", archive_of(model))
    out = run_python(program, f"--tfhub_cache_dir={tmp_path / 'c'}", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "c" / cache_key(url))


def test_a_program_may_define_the_flags_after_importing_hubcache(tmp_path):
    # tensorflow_hub defines them unconditionally; `import hubcache` first must not break it.
    program = """
        import sys
        import hubcache
        from absl import flags
        flags.DEFINE_string("tfhub_cache_dir", None, "defined again")
        flags.DEFINE_enum("tfhub_model_load_format", "AUTO", ["COMPRESSED", "UNCOMPRESSED", "AUTO"], "again")
        flags.FLAGS(sys.argv)
        from hubcache.core.config import load_config
        print(load_config()["cache_dir"])
    """
    out = run_python(program, f"--tfhub_cache_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path)


def test_flags_parsed_by_absl_app_run_and_shown_by_hubcache_config(tmp_path):
    program = """
        from absl import app
        import hubcache
        from hubcache import cli

        def main(argv):
            return cli.main(["config", "--json"])

        app.run(main)
    """
    out = run_python(program, f"--tfhub_cache_dir={tmp_path / 'c'}", "--tfhub_model_load_format=COMPRESSED")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["settings"]["cache_dir"] == {"value": str(tmp_path / "c"), "source": "flag",
                                               "origin": "--tfhub_cache_dir"}
    assert report["settings"]["load_format"]["source"] == "flag"
    assert report["backend_details"]["root"] == str(tmp_path / "c")


# -- `hubcache config` ---------------------------------------------------------------------------------


def test_hubcache_config_shows_values_and_sources(tmp_path):
    out = run_cli("config", env={"TFHUB_CACHE_DIR": str(tmp_path / "c"), "HUBCACHE_BACKEND": "home"})
    assert out.returncode == 0, out.stderr

    def row(name: str) -> str:
        return next(line for line in out.stdout.splitlines() if line.startswith(name + " "))

    assert "  home  " in row("backend (selected)") and "HUBCACHE_BACKEND" in row("backend (selected)")
    assert row("cache_dir").split()[1:] == [str(tmp_path / "c"), "[env", "(TFHUB_CACHE_DIR)]"]
    assert row("load_format").split()[1:] == ["AUTO", "[default]"]
    assert row("backend.root").split()[1] == str(tmp_path / "c")
    assert "home" in row("installed backends") and "tmp" in row("installed backends")


def test_hubcache_config_shows_the_download_deadline():
    """The overall limit on one download: 6 h unless HUBCACHE_DOWNLOAD_DEADLINE says otherwise."""
    out = run_cli("config")
    row = next(line for line in out.stdout.splitlines() if line.startswith("download_deadline "))
    assert row.split()[1:] == ["21600.0", "[default]"]
    out = run_cli("config", "--json", env={"HUBCACHE_DOWNLOAD_DEADLINE": "90"})
    assert json.loads(out.stdout)["settings"]["download_deadline"] == {
        "value": 90.0, "source": "env", "origin": "HUBCACHE_DOWNLOAD_DEADLINE"}


def test_hubcache_config_json(tmp_path):
    out = run_cli("config", "--json", env={"TFHUB_MODEL_LOAD_FORMAT": "compressed"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backend"] == "tmp" and report["reason"] == "default"
    assert report["settings"]["load_format"] == {"value": "COMPRESSED", "source": "env",
                                                 "origin": "TFHUB_MODEL_LOAD_FORMAT"}
    assert report["settings"]["cache_dir"]["source"] == "default"
    assert report["backend_details"]["root"] == os.path.join(os.environ["TMPDIR"], "tfhub_modules")
    assert {"tmp", "home"} <= set(report["installed_backends"])


def test_hubcache_config_with_an_invalid_setting_fails_cleanly():
    out = run_cli("config", env={"TFHUB_MODEL_LOAD_FORMAT": "ZIPPED"})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "TFHUB_MODEL_LOAD_FORMAT" in out.stderr
    assert "Traceback" not in out.stderr


# -- typed settings -------------------------------------------------------------------------------


def test_typed_settings_have_their_defaults_and_types(monkeypatch):
    for name in ("HUBCACHE_TIMEOUT", "HUBCACHE_RETRIES", "HUBCACHE_MAX_SIZE", "HUBCACHE_OFFLINE",
                 "HUBCACHE_LEASE_TTL", "HUBCACHE_LOCK_TIMEOUT", "HUBCACHE_PINS", "TFHUB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    from hubcache.core.config import DEFAULTS, Config

    for config in (load_config(), Config()):  # read from the environment, or empty
        assert config.timeout == 60.0 and isinstance(config.timeout, float)
        assert config.retries == 4 and isinstance(config.retries, int)
        assert config.lease_ttl == 30.0 and config.lock_timeout == 3600.0
        assert config.max_size is None and config.pins is None and config.cache_dir is None
        assert config.offline is False and config.load_format == "AUTO"
        assert config.max_archive_bytes == DEFAULTS["max_archive_bytes"]
        assert config.download_deadline == DEFAULTS["download_deadline"]


def test_typed_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HUBCACHE_TIMEOUT", "2.5")
    monkeypatch.setenv("HUBCACHE_RETRIES", "7")
    monkeypatch.setenv("HUBCACHE_MAX_SIZE", "2M")
    monkeypatch.setenv("HUBCACHE_OFFLINE", "1")
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    config = load_config()
    assert (config.timeout, config.retries, config.max_size, config.offline) == (2.5, 7, 2 << 20, True)
    assert config.cache_dir == str(tmp_path)
    # an override (tests, embedding) may give a number for a number, or its text
    assert config.replace(timeout=3).timeout == 3.0
    assert config.replace(retries="2").retries == 2


def test_an_override_of_the_wrong_type_names_the_setting():
    from hubcache.core.config import Config

    with pytest.raises(ConfigError, match="timeout"):
        Config().replace(timeout=[1]).timeout
    with pytest.raises(ConfigError, match="retries"):
        Config().replace(retries=True).retries


def test_no_call_site_reads_hubcaches_own_settings_untyped():
    # config.get("timeout", 60.0) at call sites spread the defaults and the conversions about;
    # hubcache's own settings are read through Config's typed properties only.
    import re

    from hubcache.core.config import DEFAULTS

    src = os.path.dirname(os.path.abspath(hubcache.__file__))
    pattern = re.compile(r"config\.get\(\s*[\"'](%s)[\"']|config\[[\"'](%s)[\"']\]"
                         % ("|".join(DEFAULTS), "|".join(DEFAULTS)))
    found = []
    for dirpath, _, files in os.walk(src):
        for name in files:
            if name.endswith(".py") and name != "config.py":
                text = Path(dirpath, name).read_text(encoding="utf-8")
                found += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert found == []


def test_config_shows_whether_tensorflow_hub_is_patched_by_the_same_rule_as_the_start_up_hook(monkeypatch):
    # The hook reads HUBCACHE_PATCH_TFHUB at interpreter start; `hubcache config` must not say
    # "off" where the hook says "on", or the reverse.
    import _hubcache_autopatch

    for value in ("", "0", "false", "No", " off ", "1", "true", "yes", "anything"):
        monkeypatch.setenv("HUBCACHE_PATCH_TFHUB", value)
        assert load_config().settings["patch_tfhub"].value is _hubcache_autopatch.enabled(value), value
