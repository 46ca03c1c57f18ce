"""Ship hubcache's start-up files at the top of site-packages; all other metadata is in pyproject.toml.

``HUBCACHE_PATCH_TFHUB=1`` works through ``hubcache-autopatch.pth`` (an ``import`` line that does
nothing unless the variable is set) and ``hubcache-autopatch.start`` (its PEP 829 successor, read
instead of the ``.pth``'s ``import`` line from Python 3.15 on). Both must sit directly in
site-packages, beside the packages rather than inside one, and setuptools has no pyproject.toml
setting for that: ``package-data`` is per package, and ``data-files`` install under ``sys.prefix``,
not site-packages. So ``build_py`` copies them to the root of the build directory, which becomes
the root of the wheel (what pytest-cov did for its ``.pth`` up to version 6). An editable install
(PEP 660) builds a wheel of its own from a separate directory: there they go to that wheel's root.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

#: The start-up files, in src/, copied to the top of site-packages.
STARTUP_FILES = ("hubcache-autopatch.pth", "hubcache-autopatch.start")
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_startup_files(build_py):
    """``build_py`` that also puts :data:`STARTUP_FILES` at the root of what it builds."""

    def _startup_root(self) -> str:
        if getattr(self, "editable_mode", False):
            # setuptools' editable_wheel points `install` at the directory it zips into the
            # editable wheel; the build directory of an editable build is thrown away.
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self) -> None:
        super().run()
        root = self._startup_root()
        self.mkpath(root)
        for name in STARTUP_FILES:
            self.copy_file(os.path.join(HERE, "src", name), os.path.join(root, name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [os.path.join(self.build_lib, name) for name in STARTUP_FILES]
        return outputs


setup(cmdclass={"build_py": build_py_with_startup_files})
