"""The built-in locator plugin: :func:`hubcache.core.locate.locate` as the last
``hubcache_locate`` implementation, so any plugin can answer a handle shape first."""

from __future__ import annotations

from ..core.handles import Handle
from ..core.locate import Location, locate
from .markers import hookimpl


@hookimpl(trylast=True)
def hubcache_locate(handle: Handle, load_format: str) -> Location:
    return locate(handle, load_format)
