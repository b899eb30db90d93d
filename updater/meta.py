"""What a model target carries besides its bytes: the custom metadata signed into targets.json.

The operator's ``inferctl model add`` writes it under ``custom.inferd`` of the model's target;
the device reads it back only from verified metadata. Signatures use the KServe v2 metadata
form (``{"name", "datatype", "shape"}`` with ``-1`` for a dynamic dimension), the same form
the agent's backends report, so the two compare directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from runtime.tensors import Signature
from telemetry.shares import ALL, FULL, joins

CUSTOM_KEY = "inferd"
KIND_MODEL = "model"
KIND_GOLDEN = "golden"
KIND_STATS = "reference_stats"

LABEL_RULE = "1-64 letters, digits, '_', '.', '+', '-', starting with a letter or digit"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def label_error(what: str, value: object) -> str | None:
    """Why ``value`` cannot be a model name, version or group; None when it can.

    The one rule for both sides: ``inferctl`` refuses to publish such a label and the device
    refuses signed metadata carrying one, because the device builds folder names from them
    (``models/<name>/<seq>-<version>``). ``fullmatch``: ``$`` would let a trailing newline in.
    """
    if isinstance(value, str) and _LABEL.fullmatch(value):
        return None
    return f"{what} {value!r} must be {LABEL_RULE}"


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


def _file_name_error(what: str, path: str, prefix: str) -> str | None:
    head, _, base = path.rpartition("/")
    if head != prefix or base in ("", ".", "..") or "\0" in base:
        return f"{what} {path!r} must be a file directly under {prefix}/"
    return None


def meta_error(meta: ModelMeta, path: str, published: int) -> str | None:
    """Why a signed model target breaks the rules ``inferctl`` publishes by; None when it is fine.

    ``path`` is the model's target path and ``published`` the version of the targets metadata
    that lists it: a version's ``seq`` is the targets version that published it, so it lies in
    ``1..published`` (0 is the config's own model on a device). Every target a version names
    lives under ``<name>/<version>/``, as ``inferctl model add`` writes it.
    """
    for what, value in (("model name", meta.name), ("version", meta.version)):
        if (err := label_error(what, value)) is not None:
            return err
    shared = () if meta.rollout is None else tuple(g for g in meta.rollout.shares if g != ALL)
    for group in (*meta.groups, *shared):
        if (err := label_error("group", group)) is not None:
            return err
    if not 1 <= meta.seq <= published:
        return f"seq {meta.seq} is outside 1..{published} (the targets version listing it)"
    prefix = f"{meta.name}/{meta.version}"
    for what, target in (("model", path), ("golden", meta.golden), ("stats", meta.reference_stats)):
        if target is not None and (err := _file_name_error(f"{what} target", target, prefix)):
            return err
    return None


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
