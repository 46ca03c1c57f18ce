"""The 0.4 restructure: old module paths still import, warn once, and are the new modules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import hubcache
from hubcache._moved import MOVED, MovedFinder


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_is_the_new_module(old):
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        f"new = importlib.import_module({MOVED[old]!r})\n"
        "try:\n"
        f"    importlib.import_module({old!r})\n"
        "except DeprecationWarning as w:\n"
        "    print('warned', w)\n"
        "warnings.simplefilter('ignore')\n"
        f"print(importlib.import_module({old!r}) is new)\n"
    )
    out = subprocess.run([sys.executable, "-c", "import hubcache\n" + code], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith(f"warned {old} moved to {MOVED[old]}"), out
    assert out[1] == "True"


def test_from_import_of_an_old_path_gives_the_same_objects():
    with pytest.warns(DeprecationWarning, match="hubcache.core.plugins moved to hubcache.plugins.registry"):
        sys.modules.pop("hubcache.core.plugins", None)
        from hubcache.core.plugins import get_registry  # noqa: PLC0415 - the old path under test
    from hubcache.plugins.registry import get_registry as new

    assert get_registry is new


def test_the_finder_answers_only_for_moved_names():
    finder = MovedFinder()
    assert finder.find_spec("hubcache.core.resolver") is None
    assert finder.find_spec("json") is None
    assert finder.find_spec("hubcache.core.fetch") is not None
    assert sum(isinstance(f, MovedFinder) for f in sys.meta_path) == 1
    hubcache._moved.install()
    assert sum(isinstance(f, MovedFinder) for f in sys.meta_path) == 1


def test_every_new_home_exists_and_no_old_file_is_left():
    src = os.path.dirname(os.path.dirname(os.path.abspath(hubcache.__file__)))
    for old, new in MOVED.items():
        assert os.path.isfile(os.path.join(src, *new.split(".")) + ".py"), new
        # a stale file at the old path would shadow the finder and fork the module in two
        assert not os.path.exists(os.path.join(src, *old.split(".")) + ".py"), old
