"""The plugin manager: built-ins, entry-point plugins and the registries.

Built-in plugins are the modules in :data:`DEFAULT_PLUGINS`; third-party ones
come through the entry-point group ``auditor``. ``AUDITOR_LOAD_PLUGINS``, a
comma-separated list of entry-point or distribution names, limits which
third-party plugins load (empty: none); built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from auditor import hookspecs
from auditor.bases import Attack, Detector, Embedder, Format, PluginComponent, Restorer
from auditor.errors import PluginError

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "Registered",
    "get_plugin_manager",
    "registered",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "auditor"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "auditor.formats.safetensors",
    "auditor.formats.pytorch",
    "auditor.formats.onnx",
    "auditor.formats.gguf",
    "auditor.plugins.greedy_residuals.detector",
    "auditor.plugins.greedy_residuals.embedder",
    "auditor.plugins.greedy_residuals.attacks",
    "auditor.plugins.hufunet.generate",
    "auditor.plugins.hufunet.embedder",
    "auditor.plugins.hufunet.detector",
    "auditor.plugins.hufunet.attacks",
    "auditor.plugins.lineage.detector",
    "auditor.plugins.restore.plugin",
    "auditor.plugins.attacks.plugin",
    "auditor.plugins.attacks.cli",
)

#: Capability hooks and the base class each one's components must subclass.
KINDS: dict[str, tuple[str, type[PluginComponent]]] = {
    "formats": ("register_formats", Format),
    "detectors": ("register_detectors", Detector),
    "restorers": ("register_restorers", Restorer),
    "embedders": ("register_embedders", Embedder),
    "attacks": ("register_attacks", Attack),
}

C = TypeVar("C", bound=PluginComponent)

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None


@dataclass(frozen=True)
class Registered:
    """A registered component and the plugin that supplied it."""

    component: PluginComponent
    plugin: str


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    wanted_env = os.environ.get("AUDITOR_LOAD_PLUGINS")
    wanted = None if wanted_env is None else {w.strip() for w in wanted_env.split(",") if w.strip()}
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else ""
        if wanted is not None and ep.name not in wanted and dist not in wanted:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not show a traceback
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                " (set AUDITOR_LOAD_PLUGINS to skip it)"
            ) from exc
        pm.register(module, name=ep.name)
        _PLUGIN_ORIGINS[ep.name] = f"entry point {ep.value}" + (f" from {dist} {ep.dist.version}" if ep.dist else "")


_PLUGIN_ORIGINS: dict[str, str] = {}


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("auditor")
            pm.add_hookspecs(hookspecs)
            for name in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(name), name=name)
                _PLUGIN_ORIGINS[name] = "built-in"
            _load_entry_points(pm)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin defines an unknown hook: {exc}") from exc
            _pm = pm
        return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager (tests; after changing AUDITOR_LOAD_PLUGINS)."""
    global _pm
    with _lock:
        _pm = None
        _PLUGIN_ORIGINS.clear()


def plugin_origin(name: str) -> str:
    """Where plugin ``name`` came from: ``built-in`` or its entry point and distribution."""
    get_plugin_manager()
    return _PLUGIN_ORIGINS.get(name, "registered at run time")


def _collect(kind: str) -> dict[str, Registered]:
    hook_name, base = KINDS[kind]
    pm = get_plugin_manager()
    found: dict[str, Registered] = {}

    def make_register(plugin_name: str) -> Callable[[Any], None]:
        def register(component: Any) -> None:
            if not isinstance(component, base):
                raise PluginError(
                    f"plugin {plugin_name!r} registered {component!r} with {hook_name}, "
                    f"which takes {base.__module__}.{base.__qualname__} instances"
                )
            cid = component.id
            if not cid or not isinstance(cid, str):
                raise PluginError(f"plugin {plugin_name!r} registered a {base.__name__} without an id")
            if cid in found:
                raise PluginError(
                    f"plugin {plugin_name!r} registered {base.__name__.lower()} {cid!r}, "
                    f"which plugin {found[cid].plugin!r} already registered"
                )
            found[cid] = Registered(component, plugin_name)

        return register

    hook = getattr(pm.hook, hook_name)
    impls = sorted(hook.get_hookimpls(), key=lambda impl: impl.plugin_name)
    for impl in impls:
        impl.function(register=make_register(impl.plugin_name))
    return dict(sorted(found.items()))


def registered(kind: str) -> Mapping[str, Registered]:
    """Components of one kind (``formats``, ``detectors``...) by id, in id order."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {', '.join(KINDS)}")
    # Not cached: registration is cheap by contract, and collecting afresh means a
    # plugin registered or unregistered at run time is always seen as it is now.
    return _collect(kind)


def components(kind: str, base: type[C]) -> list[C]:
    """The registered components of one kind, in id order, typed as ``base``."""
    return [r.component for r in registered(kind).values() if isinstance(r.component, base)]
