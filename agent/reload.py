"""Config reload on SIGHUP: apply what can change in a running daemon, report what cannot.

Live keys take effect at once: the log level here, the telemetry keys through every component
that has ``reconfigure(config)``. Every other changed key is named in a warning and in the
result (it needs ``systemctl restart inferd``); the running daemon keeps its old value, so the
config it reports is the one in effect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgspec

from agent import logsetup
from agent.config import Config, load_config

log = logging.getLogger(__name__)

LIVE_KEYS = frozenset(
    {
        "log_level",
        "telemetry.metrics_interval_s",
        "telemetry.prediction_sample_rate",
    }
)


@runtime_checkable
class Reconfigurable(Protocol):
    """A component that takes live config changes (telemetry intervals, sampling)."""

    def reconfigure(self, config: Config) -> None: ...


@dataclass(frozen=True)
class ReloadResult:
    config: Config
    """The configuration now in effect: the old one with the live keys taken from the file."""
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(node, (list, tuple)) and any(isinstance(v, dict) for v in node):
        out[f"{prefix}#count"] = len(node)
        for i, value in enumerate(node):
            _flatten(value, f"{prefix}[{i}]", out)
    else:
        out[prefix] = node


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted paths (``models[0].threads``) whose values differ between two configs."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(msgspec.to_builtins(old), "", a)
    _flatten(msgspec.to_builtins(new), "", b)
    changed = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    # A list that grew or shrank (models) is reported as a whole, not entry by entry.
    for counted in [k for k in changed if k.endswith("#count")]:
        whole = counted.removesuffix("#count")
        changed = {k for k in changed if not k.startswith(f"{whole}[") and k != counted}
        changed.add(whole)
    return sorted(changed)


def plan_reload(current: Config, new: Config) -> ReloadResult:
    """Split the differences into live keys (applied to the result) and restart-only keys."""
    changed = changed_keys(current, new)
    applied = tuple(k for k in changed if k in LIVE_KEYS)
    effective = current
    for key in applied:
        section, _, field = key.rpartition(".")
        if section:
            part = msgspec.structs.replace(
                getattr(effective, section), **{field: getattr(getattr(new, section), field)}
            )
            effective = msgspec.structs.replace(effective, **{section: part})
        else:
            effective = msgspec.structs.replace(effective, **{field: getattr(new, field)})
    restart = tuple(k for k in changed if k not in LIVE_KEYS)
    return ReloadResult(effective, applied, restart)


def reload_config(
    path: str | os.PathLike[str], current: Config, components: Iterable[object]
) -> ReloadResult:
    """Re-read ``path`` and apply its live keys; raises ConfigError (nothing applied) if invalid."""
    result = plan_reload(current, load_config(path))
    if "log_level" in result.applied:
        logsetup.set_level(result.config.log_level)
    if result.applied:
        for component in components:
            if isinstance(component, Reconfigurable):
                try:
                    component.reconfigure(result.config)
                except Exception:
                    log.exception("%r could not take the reloaded config", component)
        log.info("config reloaded: %s", ", ".join(result.applied))
    else:
        log.info("config reloaded: nothing to change live")
    if result.needs_restart:
        log.warning(
            "config keys changed that take effect only after a restart (systemctl restart "
            "inferd): %s",
            ", ".join(result.needs_restart),
        )
    return result
