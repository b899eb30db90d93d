"""What a model target carries besides its bytes: the custom metadata signed into targets.json.

The operator's ``inferctl model add`` writes it under ``custom.inferd`` of the model's target;
the device reads it back only from verified metadata. Signatures use the KServe v2 metadata
form (``{"name", "datatype", "shape"}`` with ``-1`` for a dynamic dimension), the same form
the agent's backends report, so the two compare directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from runtime.tensors import Signature
from telemetry.shares import FULL, joins

CUSTOM_KEY = "inferd"
KIND_MODEL = "model"
KIND_GOLDEN = "golden"
KIND_STATS = "reference_stats"


class Rollout(msgspec.Struct, frozen=True, kw_only=True):
    """A staged rollout: per group (``"*"``: any other) the basis points of devices that join.

    ``halted`` says why a rollout was stopped (its shares are then all 0).
    """

    shares: dict[str, int]
    halted: str | None = None

    def __post_init__(self) -> None:
        if any(not 0 <= v <= FULL for v in self.shares.values()):
            raise ValueError(f"rollout shares are basis points between 0 and {FULL}")


class ModelMeta(msgspec.Struct, frozen=True, kw_only=True):
    """The signed description of one published model version.

    ``seq`` is the targets metadata version that published it: the order in which versions
    were published, which is what "newer" means to a device (version strings are labels).
    ``golden`` and ``reference_stats`` name other targets (verified like the model). TUF's
    canonical JSON has no floats, so tolerances are decimal strings and the budget is in us.
    """

    kind: str = KIND_MODEL
    name: str
    version: str
    seq: int
    runtime: str
    signature: Signature
    groups: tuple[str, ...] = ()
    golden: str | None = None
    reference_stats: str | None = None
    rtol: str = "1e-3"
    atol: str = "1e-4"
    latency_budget_us: int | None = None
    rollout: Rollout | None = None
    """A staged rollout; None: every device in ``groups`` installs this version."""

    @property
    def tolerance(self) -> tuple[float, float]:
        """(rtol, atol) for comparing golden outputs."""
        return float(self.rtol), float(self.atol)

    def for_device(self, groups: tuple[str, ...]) -> bool:
        """Whether a device in ``groups`` should install this (no groups: every device)."""
        return not self.groups or bool(set(self.groups) & set(groups))

    def joins(self, device_id: str, groups: tuple[str, ...]) -> bool:
        """Whether this device is in the version's rollout (see :mod:`telemetry.shares`)."""
        shares = None if self.rollout is None else self.rollout.shares
        return joins(shares, device_id, groups, self.name, self.version)


def meta_to_custom(meta: ModelMeta) -> dict[str, Any]:
    """The ``custom`` field of the model's TargetFile."""
    return {CUSTOM_KEY: msgspec.json.decode(msgspec.json.encode(meta))}


def meta_from_custom(custom: Mapping[str, Any] | None) -> ModelMeta | None:
    """The model metadata in a target's ``custom`` field; None when it is not a model target."""
    if not custom:
        return None
    data = custom.get(CUSTOM_KEY)
    if not isinstance(data, dict) or data.get("kind") != KIND_MODEL:
        return None
    try:
        return msgspec.convert(data, ModelMeta, strict=False)
    except msgspec.ValidationError:
        return None
