"""Who joins a staged rollout: stable device buckets and per-group shares.

A published model version may carry rollout shares: per device group (``"*"`` for any group
not named) the part of the fleet that installs it, in basis points (10000 = every device).
A device joins when :func:`bucket` of its id, the slot and the version falls under its share.
The hash is stable, so raising a share keeps every device that had joined, and salted with
the slot and version, so each rollout starts on different devices. The device's updater,
``inferctl rollout`` and the fleet tally all decide with these functions, so they live here in
the wire contract both sides import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

ALL = "*"
"""The share key for devices in none of the named groups (and devices without groups)."""
FULL = 10_000
"""Basis points of a whole fleet."""


def bucket(device_id: str, slot: str, version: str) -> int:
    """The device's stable place in ``[0, FULL)`` for this slot and version."""
    digest = hashlib.sha256(f"{slot}\0{version}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % FULL


def share_of(shares: Mapping[str, int], groups: Sequence[str]) -> int:
    """The share (basis points) for a device in ``groups``: its most generous group's."""
    default = shares.get(ALL, 0)
    return max((shares.get(g, default) for g in groups), default=default)


def joins(
    shares: Mapping[str, int] | None, device_id: str, groups: Sequence[str], slot: str, version: str
) -> bool:
    """Whether the device installs this version (no shares: every device does)."""
    if shares is None:
        return True
    return bucket(device_id, slot, version) < share_of(shares, groups)


def basis_points(pct: float) -> int:
    """An operator's percentage (0-100, two decimals count) as basis points; ValueError else."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"{pct:g} is not a percentage between 0 and 100")
    return round(pct * 100)


def percent(bp: int) -> str:
    """Basis points as an operator reads them: ``12.5 %``."""
    return f"{bp / 100:g} %"


def shares_text(shares: Mapping[str, int] | None) -> str:
    """``10 % (canary 100 %)``; ``100 %`` for a version without staged rollout."""
    if shares is None:
        return "100 % (not staged)"
    named = ", ".join(f"{g} {percent(v)}" for g, v in sorted(shares.items()) if g != ALL)
    head = percent(shares.get(ALL, 0))
    return f"{head} ({named})" if named else head


# -- the tally ----------------------------------------------------------------------------------
