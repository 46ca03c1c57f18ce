"""The plugin manager: registers the built-in plugins and the ``hubcache`` entry points, and
collects their backends.

The built-ins are registered by module name (:data:`hubcache.plugins.builtin.DEFAULT_PLUGINS`),
so a source tree without installed metadata has them; an entry point naming the same module under
the same name is the same plugin and skipped. Loading is lazy (first use), thread-safe, and
fault-isolated: a plugin that fails to import, implements a hook hubcache does not have, or whose
backends cannot be registered is recorded with its error, unregistered and skipped, never
breaking hubcache. ``HUBCACHE_DISABLE_PLUGINS=a,b`` blocks plugins (built-in or not) by name.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

from ..core.errors import ConfigError
from ..core.events import QUIET, Event, log_line
from .builtin import DEFAULT_PLUGINS, LOCATOR
from .hookspecs import PROJECT, HookSpecs

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from ..core.backend import Backend

logger = logging.getLogger("hubcache")

ENTRY_POINT_GROUP = "hubcache"
ENV_DISABLE = "HUBCACHE_DISABLE_PLUGINS"
#: The hooks a plugin may implement (the specifications' names).
KNOWN_HOOKS: tuple[str, ...] = tuple(sorted(n for n in vars(HookSpecs) if n.startswith(PROJECT + "_")))


@dataclass
class PluginInfo:
    """One loaded (or failed, or disabled) plugin.

    Attributes:
        name: the plugin's name (its entry-point name, or its built-in name).
        value: the module it was loaded from (an entry point's ``module:attr`` target).
        distribution: the distribution that declares it, and its version (empty for built-ins,
            which are registered by module name, whatever metadata is installed).
        backends: names of the backends it registered.
        hooks: names of the hooks it implements.
        error: why it could not be loaded, if it could not.
        disabled: true when blocked by ``HUBCACHE_DISABLE_PLUGINS``.
        builtin: shipped inside hubcache (registered by module name, or declared by the
            ``hubcache`` distribution itself; never by module name alone, so a third party's
            ``hubcache.x`` namespace module is not mistaken for one).
    """

    name: str
    value: str
    distribution: str = ""
    version: str = ""
    backends: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str = ""
    disabled: bool = False
    builtin: bool = False


class Registry:
    """The loaded plugins and the backends they registered.

    Args:
        builtins: plugin name -> module of the plugins registered without metadata (default:
            :data:`hubcache.plugins.builtin.DEFAULT_PLUGINS`).
    """

    def __init__(self, builtins: Mapping[str, str] | None = None) -> None:
        self.builtins: dict[str, str] = dict(DEFAULT_PLUGINS if builtins is None else builtins)
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(HookSpecs)
        # By module name, as every built-in: the registry itself does not import the domain modules.
        self.pm.register(importlib.import_module(LOCATOR[1]), name=LOCATOR[0])
        self.plugins: dict[str, PluginInfo] = {}
        self.backends: dict[str, type[Backend]] = {}
        self.backend_plugin: dict[str, str] = {}
        #: every environment variable a registered backend declared (Backend.settings)
        self.setting_names: tuple[str, ...] = ()

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.pm.hook

    def load_builtins(self) -> None:
        """Register the built-in plugins by module name (no metadata needed)."""
        disabled = _disabled()
        for name, module in self.builtins.items():
            info = PluginInfo(name, module, builtin=True)
            load: Callable[[], Any] = functools.partial(importlib.import_module, module)
            self._load(info, load, disabled)

    def load_entry_points(self) -> None:
        """Register the plugins of the ``hubcache`` entry-point group, skipping the built-ins."""
        from importlib import metadata  # ~30 ms: only when plugins are first needed

        disabled = _disabled()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            known = self.plugins.get(ep.name)
            if known is not None and known.value == ep.value:
                # A built-in that hubcache's metadata declares too, or the same entry point seen
                # twice (an editable install and a site copy): one plugin, registered once.
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist else ""
            info = PluginInfo(ep.name, ep.value, dist_name, dist.version if dist else "",
                              builtin=dist_name == "hubcache")
            if known is not None:  # a different module claiming a name that is taken
                info.error = str(ConfigError(
                    f"plugin name {ep.name!r} ({ep.value}) is already taken by {known.value}",
                    hint=f"rename the entry point in {dist_name or 'its distribution'}"))
                self.plugins[f"{ep.name} ({dist_name or ep.value})"] = info
                continue
            self._load(info, ep.load, disabled)

    def _load(self, info: PluginInfo, load: Callable[[], Any], disabled: set[str]) -> None:
        self.plugins[info.name] = info
        if info.name in disabled:
            info.disabled = True
            self.pm.set_blocked(info.name)
            return
        try:
            self.register(load(), info.name)
        except Exception as error:  # a broken plugin is reported, never fatal
            info.error = f"{type(error).__name__}: {error}"

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object or module and collect its backends.

        All or nothing: on any error the plugin is unregistered and its backends forgotten.

        Raises:
            ConfigError: the plugin implements a hook hubcache does not have (a misspelt name),
                with arguments its specification lacks, or registers a backend that is unnamed
                or whose name another plugin registered.
        """
        info = self.plugins.setdefault(name, PluginInfo(name, getattr(plugin, "__name__", repr(plugin))))
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as error:  # arguments the hook's spec does not have
            lines = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ConfigError(f"plugin {name!r} has an invalid hook implementation: {lines}",
                              hint=f"the hooks and their arguments: {', '.join(KNOWN_HOOKS)} "
                                   "in hubcache/plugins/hookspecs.py") from None
        settings_before = self.setting_names
        try:
            self._check_pending(plugin, name)
            info.hooks = sorted(caller.name for caller in (self.pm.get_hookcallers(plugin) or []))

            def register_backend(cls: type[Backend]) -> None:
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

            # Through the hook, so only @hookimpl-marked functions run; the subset caller is
            # pm.hook.hubcache_register_backends without the other plugins, which attributes
            # each backend to its plugin and isolates one plugin's failure from the rest.
            # (list_name_plugin, not get_plugins: that builds a set, and a plugin object need not
            # be hashable, e.g. a dataclass instance.)
            others = [p for _, p in self.pm.list_name_plugin() if p is not None and p is not plugin]
            self.pm.subset_hook_caller("hubcache_register_backends", others)(register=register_backend)
        except BaseException:
            self.pm.unregister(plugin)
            for backend_name in info.backends:
                self.backends.pop(backend_name, None)
                self.backend_plugin.pop(backend_name, None)
            info.backends.clear()
            self.setting_names = settings_before
            raise

    def _check_pending(self, plugin: object, name: str) -> None:
        """pluggy's ``check_pending``: every hook implementation must match a specification."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            # Every plugin is checked as it is registered, so the culprit is normally ``plugin``;
            # one registered with ``pm.register`` directly is named as itself.
            culprit = error.plugin
            culprit_name = self.pm.get_name(culprit) or name
            unknown = sorted(caller.name for caller in (self.pm.get_hookcallers(culprit) or [])
                             if not caller.has_spec())
            close = [m for hook in unknown for m in difflib.get_close_matches(hook, KNOWN_HOOKS, n=1)]
            guess = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"plugin {culprit_name!r} implements unknown hook{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}",
                hint=f"{guess}known hooks: {', '.join(KNOWN_HOOKS)}") from None

    def backend_class(self, name: str) -> type[Backend]:
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
            registry.load_builtins()
            registry.load_entry_points()
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in a running process)."""
    global _registry
    with _lock:
        _registry = None


def _disabled() -> set[str]:
    """The plugin names ``HUBCACHE_DISABLE_PLUGINS`` blocks."""
    return {n.strip() for n in os.environ.get(ENV_DISABLE, "").split(",") if n.strip()}


def emit(kind: str, handle: str, backend: str = "", **data: Any) -> None:
    """Send an event to every ``hubcache_event`` implementation and to the log."""
    event = Event(kind, handle, backend, data)
    if kind not in QUIET and logger.isEnabledFor(logging.INFO):
        logger.info("%s", log_line(event))
    hook = get_registry().hook.hubcache_event
    for impl in hook.get_hookimpls():
        try:
            impl.function(event=event)
        except Exception:  # an observer must never break a resolve
            logger.exception("hubcache_event of plugin %r failed", impl.plugin_name)
