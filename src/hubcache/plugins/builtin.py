"""The plugins shipped inside hubcache, registered by module name.

They need no installed metadata: ``PYTHONPATH=src python -c 'import hubcache; ...'`` from a source
tree has them too. The same names in the ``hubcache`` entry-point group (hubcache's own
``pyproject.toml`` declares them) are skipped as duplicates.
"""

from __future__ import annotations

#: Plugin name (what ``HUBCACHE_DISABLE_PLUGINS`` and ``hubcache plugins`` use) -> module.
DEFAULT_PLUGINS: dict[str, str] = {
    "tmp": "hubcache.backends.tmp",
    "home": "hubcache.backends.home",
    "gcs": "hubcache.backends.gcs",
    "remote": "hubcache.backends.remote",
    "progress": "hubcache.progress",
}

#: The built-in ``hubcache_locate`` (it runs last, so a plugin can claim any handle shape first).
#: Always registered, whatever ``HUBCACHE_DISABLE_PLUGINS`` says: without it no handle resolves.
LOCATOR: tuple[str, str] = ("hubcache.locate", "hubcache.plugins.locator")
