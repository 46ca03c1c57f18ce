"""The plugin manager: loads the ``hubcache`` entry points and collects their backends.

Loading is lazy (first use), thread-safe, and fault-isolated: a plugin that fails to import is
recorded with its error and skipped, never breaking hubcache. ``HUBCACHE_DISABLE_PLUGINS=a,b``
blocks plugins by entry-point name.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pluggy

from .errors import ConfigError
from .hookspecs import PROJECT, HookSpecs
from .locate import DefaultLocator

ENTRY_POINT_GROUP = "hubcache"
ENV_DISABLE = "HUBCACHE_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    """One loaded (or failed, or disabled) plugin.

    Attributes:
        name: the entry-point name.
        value: the entry point's target (``module:attr``).
        distribution: the distribution that declares it, and its version.
        backends: names of the backends it registered.
        hooks: names of the hooks it implements.
        error: why it could not be loaded, if it could not.
        disabled: true when blocked by ``HUBCACHE_DISABLE_PLUGINS``.
    """

    name: str
    value: str
    distribution: str = ""
    version: str = ""
    backends: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str = ""
    disabled: bool = False

    @property
    def builtin(self) -> bool:
        """True for plugins shipped inside hubcache itself (by distribution, not module name, so a
        third party's ``hubcache.x`` namespace module is not mistaken for one)."""
        return self.distribution == "hubcache" or (not self.distribution and self.value.startswith("hubcache."))


class Registry:
    """The loaded plugins and the backends they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        self.pm.register(DefaultLocator(), name="hubcache.locate")
        self.plugins: dict[str, PluginInfo] = {}
        self.backends: dict[str, type] = {}
        self.backend_plugin: dict[str, str] = {}
        #: every environment variable a registered backend declared (Backend.settings)
        self.setting_names: tuple[str, ...] = ()

    @property
    def hook(self):
        return self.pm.hook

    def load_entry_points(self) -> None:
        from importlib import metadata  # ~30 ms: only when plugins are first needed

        disabled = {n.strip() for n in os.environ.get(ENV_DISABLE, "").split(",") if n.strip()}
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.plugins:  # the same entry point seen twice (e.g. editable + site)
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, ep.value, dist.metadata["Name"] if dist else "",
                              dist.version if dist else "")
            self.plugins[ep.name] = info
            if ep.name in disabled:
                info.disabled = True
                self.pm.set_blocked(ep.name)
                continue
            try:
                self.register(ep.load(), ep.name)
            except Exception as error:  # a broken plugin is reported, never fatal
                info.error = f"{type(error).__name__}: {error}"

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object or module and collect its backends."""
        info = self.plugins.setdefault(name, PluginInfo(name, getattr(plugin, "__name__", repr(plugin))))
        self.pm.register(plugin, name=name)
        info.hooks = sorted(impl.name for impl in (self.pm.get_hookcallers(plugin) or []))
        impl = getattr(plugin, "hubcache_register_backends", None)
        if impl is None:
            return

        def register_backend(cls: type) -> None:
            backend_name = getattr(cls, "name", "")
            if not backend_name:
                raise ConfigError(f"plugin {name!r} registered a backend class without a name")
            owner = self.backend_plugin.get(backend_name)
            if owner is not None and owner != name:
                raise ConfigError(f"backend {backend_name!r} is registered by both {owner!r} and {name!r}",
                                  hint=f"disable one with {ENV_DISABLE}")
            self.backends[backend_name] = cls
            self.backend_plugin[backend_name] = name
            info.backends.append(backend_name)
            declared = tuple(getattr(cls, "settings", None) or ())
            self.setting_names += tuple(n for n in declared if n not in self.setting_names)

        impl(register=register_backend)

    def backend_class(self, name: str) -> type:
        """The backend class called ``name``.

        Raises:
            ConfigError: naming the installed backends, when there is none of that name.
        """
        try:
            return self.backends[name]
        except KeyError:
            installed = ", ".join(sorted(self.backends)) or "none"
            raise ConfigError(f"no backend named {name!r}",
                              hint=f"installed backends: {installed}") from None


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use (thread-safe)."""
    registry = _registry
    if registry is not None:
        return registry
    return _load()


def _load() -> Registry:
    global _registry
    with _lock:
        if _registry is None:
            registry = Registry()
            registry.load_entry_points()
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in a running process)."""
    global _registry
    with _lock:
        _registry = None
