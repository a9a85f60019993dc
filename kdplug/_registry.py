"""Plugin discovery: every method, built-in or not, arrives through the ``kdplug`` entry-point group."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import os
import re
import threading
import warnings
from typing import Any

import pluggy

from . import hookspecs
from .spec import Method

ENTRY_POINT_GROUP = "kdplug"
# Used only when the kdplug distribution's own entry points are missing (a source tree on
# sys.path without `pip install`): the same modules its pyproject declares.
DEFAULT_PLUGINS = tuple(
    f"kdplug.plugins.{name}"
    for name in ("fkl", "rkl", "symmetric_kl", "tvd", "gjsd", "skl", "srkl", "abkd", "akl",
                 "taid", "amid", "distillm2")
)


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin module (``kdplug list`` prints these)."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    methods: tuple[str, ...]
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What :func:`kdplug.list_methods` returns for one method."""

    name: str
    aliases: tuple[str, ...]
    parameters: dict[str, Any]
    summary: str
    reference: str
    plugin: str
    distribution: str | None
    compiled: bool  # expressible as a Recipe (the compiled core can run it)


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._loaded = False
        self.pm: pluggy.PluginManager | None = None
        self.methods: dict[str, Method] = {}   # canonical name -> Method
        self.names: dict[str, str] = {}        # name or alias -> canonical name
        self.owner: dict[str, str] = {}        # canonical name -> plugin name
        self.plugins: dict[str, PluginInfo] = {}

    def reset(self) -> None:
        """Forget everything; the next lookup loads the plugins again (used by tests)."""
        with self._lock:
            self.__init__()

    def load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._load()
            self._loaded = True

    def _load(self) -> None:
        # Start from nothing, so that a load that raised (a built-in failing, check_pending) is
        # retried from scratch rather than on top of a half-filled registry.
        self.methods, self.names, self.owner, self.plugins = {}, {}, {}, {}
        pm = pluggy.PluginManager("kdplug")
        pm.add_hookspecs(hookspecs)
        self.pm = pm
        allowed = os.environ.get("KDPLUG_LOAD_PLUGINS")
        allowed = None if allowed is None else {_dist_key(d) for d in allowed.split(",") if d.strip()}
        found_builtin = False
        seen: dict[str, tuple[str | None, str]] = {}  # plugin name -> (distribution, module)
        # Built-ins first (their method names are reserved), then the others in a fixed order.
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_order):
            dist = ep.dist.name if ep.dist is not None else None
            builtin = dist is not None and _dist_key(dist) == "kdplug"
            if not builtin and allowed is not None and _dist_key(dist or "") not in allowed:
                continue
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in seen:
                if seen[ep.name] != (dist, ep.value):  # the same distribution twice on sys.path is fine
                    self._fail(ep.name, ep.value, dist, version,
                               f"was not loaded: the plugin name {ep.name!r} is already used by "
                               f"{seen[ep.name][1]!r} from distribution {seen[ep.name][0]!r}",
                               key=f"{dist}:{ep.name}")
                continue
            seen[ep.name] = (dist, ep.value)
            found_builtin |= builtin
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the others down
                if builtin:
                    raise
                self._fail(ep.name, ep.value, dist, version, f"failed to import: {_describe(exc)}")
                continue
            self._add(pm, ep.name, module, dist, version, builtin)
        if not found_builtin:
            for path in DEFAULT_PLUGINS:
                self._add(pm, path.rsplit(".", 1)[1], importlib.import_module(path), "kdplug", None, True)
        pm.check_pending()
        self._collect(pm)

    def _fail(self, name, module, dist, version, message, key=None) -> None:
        self.plugins[key or name] = PluginInfo(name, module, dist, version, (), message)
        warnings.warn(f"kdplug: plugin {name!r} (distribution {dist!r}) {message}; "
                      "the other plugins are loaded", RuntimeWarning, stacklevel=4)

    def _add(self, pm, name, module, dist, version, builtin) -> None:
        try:
            pm.register(module, name=name)
        except Exception as exc:
            if builtin:
                raise
            self._fail(name, getattr(module, "__name__", str(module)), dist, version,
                       f"could not be registered: {_describe(exc)}")
            return
        self.plugins[name] = PluginInfo(name, getattr(module, "__name__", str(module)), dist, version, ())

    def _collect(self, pm) -> None:
        for impl in pm.hook.register_methods.get_hookimpls():  # in registration order
            plugin = impl.plugin_name
            registered: list[str] = []

            def register(method: Method, _plugin=plugin, _registered=registered) -> None:
                self._register(method, _plugin)
                _registered.append(method.name)

            info = self.plugins.get(plugin)
            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:
                if info is not None and info.distribution == "kdplug":
                    raise
                for name in registered:  # roll back a half-registered plugin
                    self._unregister(name)
                registered.clear()
                self._fail(plugin, info.module if info else plugin, info and info.distribution,
                           info and info.version, f"raised in register_methods: {_describe(exc)}")
                continue
            if info is not None:
                self.plugins[plugin] = dataclasses.replace(info, methods=tuple(registered))

    def _register(self, method: Method, plugin: str) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"plugin {plugin!r}: register() expects a kdplug.Method, "
                            f"got {type(method).__name__}")
        for key in (method.name, *method.aliases):
            key = _normalize(key)
            if key in self.names:
                other = self.owner[self.names[key]]
                raise ValueError(
                    f"kdplug: the method name {key!r} is registered by both plugin {other!r} "
                    f"and plugin {plugin!r}; uninstall one of them or leave one out with "
                    "KDPLUG_LOAD_PLUGINS=<comma-separated distributions to load>")
        self.methods[method.name] = method
        self.owner[method.name] = plugin
        for key in (method.name, *method.aliases):
            self.names[_normalize(key)] = method.name

    def _unregister(self, name: str) -> None:
        method = self.methods.pop(name)
        self.owner.pop(name)
        for key in (method.name, *method.aliases):
            self.names.pop(_normalize(key), None)

    def lookup(self, name: str) -> Method:
        self.load()
        if not isinstance(name, str):
            raise TypeError(f"kdplug.get: name must be a string, got {type(name).__name__}")
        key = _normalize(name)
        if key in self.names:
            return self.methods[self.names[key]]
        available = sorted(self.methods)
        close = difflib.get_close_matches(key, list(self.names), n=1)
        hint = f" Did you mean {self.names[close[0]]!r}?" if close else ""
        raise ValueError(f"kdplug: unknown method {name!r}.{hint} Available: {', '.join(available)}")

    def infos(self) -> list[MethodInfo]:
        self.load()
        out = []
        for name in sorted(self.methods):
            method = self.methods[name]
            plugin = self.owner[name]
            info = self.plugins.get(plugin)
            params = {k: (None if v is inspect.Parameter.empty else v)
                      for k, v in method.parameters().items()}
            out.append(MethodInfo(name, method.aliases, params, method.summary, method.reference,
                                  plugin, info.distribution if info else None,
                                  method.build is not None))
        return out


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _dist_key(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``KDPlug_Jeffreys`` == ``kdplug-jeffreys``."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _ep_order(ep) -> tuple:
    dist = _dist_key(ep.dist.name) if ep.dist is not None else ""
    return (dist != "kdplug", dist, ep.name)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


REGISTRY = Registry()


def list_methods() -> list[MethodInfo]:
    """Every registered method: name, aliases, parameters with defaults, summary, reference."""
    return REGISTRY.infos()


def list_plugins() -> list[PluginInfo]:
    """Every plugin module found, with its distribution and version (and error, if it failed)."""
    REGISTRY.load()
    return sorted(REGISTRY.plugins.values(), key=lambda p: (p.distribution != "kdplug", p.name))
