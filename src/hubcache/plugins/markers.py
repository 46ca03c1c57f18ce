"""The hook markers: the one module a plugin's hook implementations need at import time.

A leaf (it imports nothing of hubcache), so marking a function costs a plugin nothing more than
pluggy itself, and every other module can import the markers without an import cycle.
"""

from __future__ import annotations

import pluggy

#: The pluggy project name: the hooks' prefix and the entry-point group.
PROJECT = "hubcache"

#: Marks a function as a hook specification (used only in :mod:`hubcache.plugins.hookspecs`).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin function as a hook implementation: ``@hookimpl`` (``from hubcache.plugin
#: import hookimpl``; also ``hubcache.hookimpl``).
hookimpl = pluggy.HookimplMarker(PROJECT)
