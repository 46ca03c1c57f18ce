"""The package as published: the sdist and the wheel ``python -m build`` makes from this tree.

The build runs offline and without isolation (``--no-isolation``: the build backend is the one
installed in this environment, from the ``test`` extra), on a copy of the tree, so the shared
working tree gets no ``build/`` or ``*.egg-info``. ``build`` makes the sdist first and then the
wheel *from the unpacked sdist*, so a file the sdist forgets fails the wheel too. Then the unpacked
sdist collects its own test suite: what an index user who downloads the sdist would run.
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.specifiers import SpecifierSet

from hubcache.core.handles import cache_key
from hubcache.testing import archive_of

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: What the sdist must hold beyond the package for its tests to run: the tests and their helpers,
#: the examples (and the S3 plugin's own tests), the benchmark harness a smoke test runs, the
#: scripts and docs the tests name, and the Makefile that runs them.
TEST_TREES = ("tests", "examples", "benchmarks", "scripts", "docs")
TEST_FILES = ("CONTRIBUTING.md", "Makefile", "LICENSE", "README.md", "pyproject.toml")
#: Local leftovers that belong in no distribution: anywhere, and at these paths.
JUNK_NAMES = ("__pycache__", ".pytest_cache")
JUNK_PATHS = (".venv", ".git", "build", "dist", "benchmarks/out")
#: What the wheel puts at the top of site-packages for HUBCACHE_PATCH_TFHUB (setup.py).
STARTUP_FILES = ("_hubcache_autopatch.py", "hubcache-autopatch.pth", "hubcache-autopatch.start")


def _ignore(directory: str, names: list[str]) -> set[str]:
    here = os.path.relpath(directory, ROOT)
    return {n for n in names if n in JUNK_NAMES or n.endswith((".egg-info", ".pyc"))
            or os.path.normpath(os.path.join(here, n)) in JUNK_PATHS}


def _tree_files(top: Path) -> set[str]:
    """Every file under ``top`` (relative to ROOT) that a distribution may hold."""
    found = set()
    for base, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in _ignore(base, dirs)]
        found.update(os.path.relpath(os.path.join(base, f), ROOT) for f in files if f not in _ignore(base, files))
    return found


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    assert importlib.util.find_spec("build") is not None, "pip install -e '.[test]' (it installs `build`)"
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "dist"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    # Offline: nothing is downloaded; build checks that the backend's requirements are installed.
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "base": base}


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode("utf-8"))


def _sdist_members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    """The sdist's members, relative to its one top-level directory."""
    with tarfile.open(sdist) as tf:
        members = tf.getmembers()
    top = members[0].name.split("/")[0]
    assert all(m.name == top or m.name.startswith(top + "/") for m in members), "one top-level directory"
    return {m.name[len(top) + 1:]: m for m in members if m.name != top}


def test_wheel_ships_the_license_and_the_typing_marker(dists):
    names = _wheel_names(dists["wheel"])
    assert "hubcache/py.typed" in names, "PEP 561: type checkers read hubcache's annotations only with py.typed"
    licenses = [n for n in names if ".dist-info/licenses/" in n]
    assert [n.rsplit("/licenses/", 1)[1] for n in licenses] == ["LICENSE"], licenses
    with zipfile.ZipFile(dists["wheel"]) as zf:
        assert zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    # Only the package, its start-up hook (HUBCACHE_PATCH_TFHUB) and its metadata: no tests,
    # examples or build leftovers.
    assert {n.split("/")[0] for n in names} == {"hubcache", next(n for n in names if ".dist-info/" in n).split("/")[0],
                                                *STARTUP_FILES}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_metadata_declares_license_and_classifiers(dists):
    meta = _metadata(dists["wheel"])
    assert meta["Name"] == "hubcache"
    assert meta["License-Expression"] == PYPROJECT["project"]["license"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert meta["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    classifiers = meta.get_all("Classifier") or []
    assert classifiers == PYPROJECT["project"]["classifiers"]
    for wanted in ("Typing :: Typed", "Topic :: Scientific/Engineering :: Artificial Intelligence",
                   "Programming Language :: Python :: 3 :: Only"):
        assert wanted in classifiers
    assert [c for c in classifiers if c.startswith("Development Status :: ")], classifiers
    assert [c for c in classifiers if c.startswith("Operating System :: ")], classifiers
    # PEP 639: the license is the expression; a "License ::" classifier beside it is an error.
    assert not [c for c in classifiers if c.startswith("License ::")]
    # Every Python version named is one requires-python allows, and its floor is named.
    requires = SpecifierSet(meta["Requires-Python"])
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers
                if c.startswith("Programming Language :: Python :: 3.")]
    assert versions and all(v in requires for v in versions), versions
    floor = min(versions, key=lambda v: tuple(map(int, v.split("."))))
    assert f"{floor}.0" in requires and f"3.{int(floor.split('.')[1]) - 1}" not in requires


def test_sdist_holds_the_license_and_everything_its_tests_need(dists):
    members = _sdist_members(dists["sdist"])
    needed = {f for f in TEST_FILES} | {"src/hubcache/py.typed", "tests/conftest.py", "tests/reliability/conftest.py",
                                         "tests/reliability/helpers.py", "tests/reliability/_child.py",
                                         "examples/hubcache-s3/tests/conftest.py", "examples/hubcache-s3/setup.cfg",
                                         "scripts/test_gcs_floor.sh", "benchmarks/run.py"}
    for tree in TEST_TREES:
        needed |= _tree_files(ROOT / tree)
    missing = sorted(needed - set(members))
    assert not missing, f"missing from the sdist: {missing}"
    junk = sorted(n for n in members if "__pycache__" in n or n.endswith(".pyc") or "/benchmarks/out/" in f"/{n}"
                  or (".egg-info" in n and not n.startswith("src/hubcache.egg-info")))
    assert not junk, f"build leftovers in the sdist: {junk}"
    # The scripts the tests and the Makefile run keep their executable bit.
    for script in ("scripts/test_gcs_floor.sh",):
        assert members[script].mode & 0o111 == (ROOT / script).stat().st_mode & 0o111


def test_unpacked_sdist_collects_its_own_test_suite(dists):
    """An unpacked sdist, installed with the test extra (this environment), finds and imports every
    test module and conftest of its own: helpers, reliability scenarios, the S3 example's tests."""
    unpacked = dists["base"] / "unpacked"
    with tarfile.open(dists["sdist"]) as tf:
        tf.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    # The sdist's own package, ahead of the editable install of this tree.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(top / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            cwd=top, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    collected = result.stdout
    assert f"{top}/src/hubcache/__init__.py" in subprocess.run(
        [sys.executable, "-c", "import hubcache; print(hubcache.__file__)"], cwd=top, env=env,
        capture_output=True, text=True, timeout=60).stdout, "the collection imported another hubcache"
    for part in ("tests/test_packaging.py::", "tests/reliability/test_crash.py::",
                 "examples/hubcache-s3/tests/test_s3_conformance.py::", "tests/test_benchmark_smoke.py::"):
        assert part in collected, f"the unpacked sdist does not collect {part}"


# -- HUBCACHE_PATCH_TFHUB: the start-up hook, as a pip-installed wheel has it -------------------


def test_wheel_ships_the_start_up_hook(dists):
    """The ``.pth`` line imports nothing unless the variable is set; the ``.start`` file (PEP 829,
    Python >= 3.15, read instead of the ``.pth``'s import line) names the same function."""
    import pkgutil

    with zipfile.ZipFile(dists["wheel"]) as zf:
        pth = zf.read("hubcache-autopatch.pth").decode()
        start = zf.read("hubcache-autopatch.start").decode()
    assert pth == (ROOT / "src" / "hubcache-autopatch.pth").read_text()
    (line,) = pth.splitlines()
    assert line.startswith("import os; 'HUBCACHE_PATCH_TFHUB' in os.environ and __import__(")
    (entry,) = start.split()
    assert entry == "_hubcache_autopatch:startup"
    assert callable(pkgutil.resolve_name(entry))
    with zipfile.ZipFile(dists["wheel"]) as zf:
        (record,) = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        recorded = {row.split(",")[0] for row in zf.read(record).decode().splitlines()}
    assert set(STARTUP_FILES) <= recorded, "pip uninstall removes only what RECORD lists"


def _venv(base: Path) -> tuple[Path, Path]:
    """A fresh virtual environment without pip; this environment's packages (TensorFlow,
    tensorflow_hub, hubcache's dependencies) are reachable through a path line, which runs none
    of the ``.pth`` files there (this tree's editable hubcache stays out)."""
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    import sysconfig

    (site / "zz-test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python, site


def _pip(python: Path, *args: str) -> None:
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check",
                             *args], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def _env(patch: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HUBCACHE_PATCH_TFHUB")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if patch is not None:
        env["HUBCACHE_PATCH_TFHUB"] = patch
    return env


_AT_START = """
import json, sys
seen = {"modules": [m for m in ("_hubcache_autopatch", "hubcache", "tensorflow", "tensorflow_hub", "absl")
                    if m in sys.modules],
        "finders": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "PostImportFinder"]}
"""


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory):
    """The wheel, ``pip install``ed into a fresh virtual environment."""
    python, site = _venv(tmp_path_factory.mktemp("wheel-venv"))
    _pip(python, "install", "--no-deps", str(dists["wheel"]))
    return SimpleNamespace(python=python, site=site)


@pytest.mark.parametrize("value, armed", [(None, False), ("", False), ("0", False), ("1", True), ("true", True)])
def test_installed_wheel_arms_the_hook_only_when_asked(installed, value, armed):
    """At start-up, without the variable (or with a false value) nothing of hubcache is imported;
    with it, only the small hook module, and neither hubcache nor tensorflow_hub."""
    assert {f.name for f in installed.site.iterdir()} >= set(STARTUP_FILES)
    result = subprocess.run([str(installed.python), "-c", _AT_START + "print(json.dumps(seen))"],
                            capture_output=True, text=True, env=_env(value), timeout=60)
    assert result.returncode == 0, result.stderr
    # The .pth line only asks whether the variable is there; the hook module reads its value.
    assert json.loads(result.stdout) == {"modules": [] if value is None else ["_hubcache_autopatch"],
                                         "finders": ["PostImportFinder"] if armed else []}


@pytest.mark.slow  # two fresh interpreters import TensorFlow (in parallel): 15-30 s here
def test_installed_wheel_patches_tensorflow_hub_on_import_with_the_variable(installed, origin, model):
    """``import tensorflow_hub`` in a fresh interpreter of the environment the wheel was installed
    into: with ``HUBCACHE_PATCH_TFHUB=1`` tensorflow_hub's registry ends with hubcache's resolver and
    ``hub.resolve`` goes through hubcache (one request, hubcache's manifest); without it,
    tensorflow_hub is as it was."""
    url = origin.add("/models/m.tar.gz", archive_of(model))
    script = _AT_START + f"""
import os
import tensorflow_hub as hub
from tensorflow_hub import registry
seen["impls"] = [type(i).__name__ for i in registry.resolver._impls]
if seen["impls"][-1] == "HubcacheResolver":
    path = hub.resolve({url!r})
    from hubcache.core import entry
    with open(path + ".descriptor.txt", "rb") as f:
        seen["manifest"] = entry.descriptor_manifest(f.read()) is not None  # hubcache's commit
    seen["path"] = path
import hubcache
seen["hubcache"] = hubcache.__file__
print(json.dumps(seen))
"""
    runs = {value: subprocess.Popen([str(installed.python), "-c", script], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=_env(value))
            for value in ("1", None)}
    seen = {}
    for value, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        seen[value] = json.loads(out.strip().splitlines()[-1])
    defaults = ["PathResolver", "HttpUncompressedFileResolver", "GcsCompressedFileResolver",
                "HttpCompressedFileResolver"]
    for found in seen.values():
        assert found["hubcache"].startswith(str(installed.site)), "the installed wheel's hubcache, not this tree's"
    assert seen["1"]["modules"] == ["_hubcache_autopatch"] and seen["1"]["finders"] == ["PostImportFinder"]
    assert seen["1"]["impls"] == defaults + ["HubcacheResolver"]
    assert seen["1"]["manifest"] is True
    assert seen["1"]["path"] == os.path.join(os.environ["TMPDIR"], "tfhub_modules", cache_key(url))
    assert origin.count("/models/m.tar.gz") == 1
    assert seen[None]["modules"] == [] and seen[None]["impls"] == defaults


def test_uninstall_removes_the_start_up_hook(dists, tmp_path):
    python, site = _venv(tmp_path)
    _pip(python, "install", "--no-deps", str(dists["wheel"]))
    assert {f.name for f in site.iterdir()} >= set(STARTUP_FILES)
    _pip(python, "uninstall", "--yes", "hubcache")
    assert not {f.name for f in site.iterdir()} & set(STARTUP_FILES)


def test_editable_install_has_the_start_up_hook_too(dists, tmp_path):
    """``pip install -e`` (PEP 660) builds a wheel of its own: the start-up files are in it."""
    python, site = _venv(tmp_path)
    tree = dists["base"] / "src"  # the copy of this tree the sdist was built from
    _pip(python, "install", "--no-deps", "--no-build-isolation", "--editable", str(tree))
    assert {f.name for f in site.iterdir()} >= {"hubcache-autopatch.pth", "hubcache-autopatch.start"}
    result = subprocess.run([str(python), "-c", _AT_START + "import hubcache; seen['file'] = hubcache.__file__; "
                             "print(json.dumps(seen))"], capture_output=True, text=True, env=_env("1"), timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["modules"] == ["_hubcache_autopatch"] and seen["finders"] == ["PostImportFinder"]
    assert seen["file"] == str(tree / "src" / "hubcache" / "__init__.py")


def test_every_readme_link_works_on_a_package_index_page_too():
    """The README is the package's page on an index (its long description), where a relative link
    (``docs/x.md``) or image resolves against the index's own URL and breaks. So the README links
    only to its own sections (``#...``) or to absolute ``https://`` addresses, and names files of
    the repository (shipped in the sdist too) as plain paths. The project has no public address
    yet; with one, these can become absolute links."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors = {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    assert targets, "the README has links (its first screen points at sections)"
    for target in targets:
        if target.startswith("#"):
            assert target[1:] in anchors, f"no section for the link {target}"
        else:
            assert target.startswith("https://"), f"a link that breaks on an index page: {target}"


def _anchor(heading: str) -> str:
    """The anchor GitHub and PyPI's renderer give a heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
