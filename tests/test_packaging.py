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
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from packaging.specifiers import SpecifierSet

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
    # Only the package and its metadata: no tests, examples or build leftovers.
    assert {n.split("/")[0] for n in names} == {"hubcache", next(n for n in names if ".dist-info/" in n).split("/")[0]}
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
