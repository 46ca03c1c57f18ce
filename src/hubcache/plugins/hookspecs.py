"""The hook specifications every hubcache plugin implements a subset of.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specifications below, advertised through the ``hubcache`` entry-point group::

    # pyproject.toml of a third-party package
    [project.entry-points.hubcache]
    s3 = "hubcache_s3.plugin"

The built-in backends are registered the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .markers import PROJECT, hookimpl, hookspec

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from ..core.backend import Backend
    from ..core.events import Event
    from ..core.handles import Handle
    from ..core.locate import Location

# hookimpl stays importable from here (its home before hubcache.plugins.markers).
__all__ = ["PROJECT", "HookSpecs", "hookimpl", "hookspec"]


class HookSpecs:
    """Hook specifications (the methods' bodies are never run)."""

    @hookspec
    def hubcache_register_backends(self, register: Callable[[type[Backend]], None]) -> None:
        """Add backend classes by calling ``register(BackendClass)`` once for each.

        Every implementation is called (no first-result). Names must be unique across plugins.

        Example::

            @hubcache.hookimpl
            def hubcache_register_backends(register):
                register(S3Backend)
        """

    @hookspec(firstresult=True)
    def hubcache_locate(self, handle: Handle, load_format: str) -> Location | None:
        """Say where a handle's bytes are, or return ``None`` to let the next plugin answer.

        First result wins; plugins run before the built-in locator, which always answers. Use it
        to map private handle schemes (``mymodels://name/3``) onto archive URLs.

        Args:
            handle: the parsed handle.
            load_format: ``COMPRESSED`` or ``UNCOMPRESSED`` (``AUTO`` arrives as ``COMPRESSED``).

        Example::

            @hubcache.hookimpl
            def hubcache_locate(handle, load_format):
                if handle.scheme == "mymodels":
                    return Location(url=f"https://models.example/{handle.url[11:]}.tar.zst",
                                    kind="archive")
                return None
        """

    @hookspec
    def hubcache_event(self, event: Event) -> None:
        """Observe progress: downloads, waits on other processes, extraction, commits, evictions.

        Every implementation is called for every event; exceptions are logged and ignored, so an
        observer can never break a resolve. The progress bar and logging are built on this hook.

        Example::

            @hubcache.hookimpl
            def hubcache_event(event):
                if event.kind == "download_finished":
                    print(event.handle, event.data["bytes"])
        """
