"""The validation gate: a candidate must prove itself on this device before it serves.

The candidate is already loaded (and warmed up) in a fresh backend beside the serving one. It
must take the inputs and give the outputs the slot's clients use, match the signature the
operator signed, reproduce the golden outputs within tolerance, and keep its p99 latency
within the signed budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runtime import bundle
from runtime.errors import BundleError, ValidationError
from runtime.tensors import Signature, TensorMeta
from updater.meta import ModelMeta

log = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]


class CandidateModel(Protocol):
    """A loaded model that is not serving yet (the agent wraps its LoadedModel in one)."""

    version: str

    def signature(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
        """Inputs and outputs in the v2 metadata form."""
        ...

    def run(self, feeds: Feeds) -> Mapping[str, np.ndarray]:
        """Run once; raises on failure."""
        ...

    def warmup_feeds(self) -> Feeds | None:
        """Inputs the model warmed up on (they fit it and ran); None when none did."""
        ...

    def close(self) -> None:
        """Release it without ever serving it."""
        ...


@dataclass(frozen=True)
class Report:
    """What the gate measured (published in the validation event)."""

    golden_checked: int
    runs: int
    p50_ms: float
    p99_ms: float
    budget_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "golden_checked": self.golden_checked,
            "runs": self.runs,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "budget_ms": self.budget_ms,
        }


def _dims_fit(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _fits(need: Sequence[TensorMeta], have: Sequence[TensorMeta], what: str) -> None:
    by_name = {t.name: t for t in have}
    for t in need:
        other = by_name.get(t.name)
        if other is None:
            raise ValidationError(f"{what} {t.name!r} is missing from the candidate")
        if other.datatype != t.datatype:
            raise ValidationError(
                f"{what} {t.name!r} is {other.datatype} in the candidate, {t.datatype} in the slot"
            )
        if not _dims_fit(t.shape, other.shape):
            raise ValidationError(
                f"{what} {t.name!r} has shape {list(other.shape)} in the candidate, "
                f"{list(t.shape)} in the slot"
            )


def check_signature(candidate: Signature, declared: Signature, serving: Signature | None) -> None:
    """The candidate is what was signed, and fits the slot's clients (same inputs, outputs)."""
    if candidate != declared:
        raise ValidationError(
            "the candidate's signature differs from the one signed into its target "
            f"({_short(candidate)} vs {_short(declared)})"
        )
    if serving is None:
        return
    in_names = {t.name for t in candidate.inputs}
    extra = in_names - {t.name for t in serving.inputs}
    if extra:
        raise ValidationError(f"the candidate needs input(s) the slot lacks: {sorted(extra)}")
    _fits(serving.inputs, candidate.inputs, "input")
    _fits(serving.outputs, candidate.outputs, "output")


def _short(sig: Signature) -> str:
    def one(t: TensorMeta) -> str:
        return f"{t.name}:{t.datatype}{list(t.shape)}"

    return f"in {', '.join(map(one, sig.inputs))}; out {', '.join(map(one, sig.outputs))}"


def load_golden(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) from a published golden.npz (:mod:`runtime.bundle`'s format)."""
    try:
        golden = bundle.read_golden(data)
    except BundleError as err:
        raise ValidationError(f"golden file unreadable: {err}") from err
    return golden.inputs, golden.expected


def validate(
    candidate: CandidateModel,
    meta: ModelMeta,
    serving: Signature | None,
    golden: bytes | None,
    runs: int = 20,
) -> Report:
    """Run the gate; ValidationError naming the first check that failed."""
    try:
        sig = Signature.from_json(candidate.signature())
    except (KeyError, TypeError, ValueError) as err:
        raise ValidationError(f"candidate signature unreadable: {err}") from err
    check_signature(sig, meta.signature, serving)
    checked = 0
    if golden is not None:
        feeds: Feeds
        feeds, expected = load_golden(golden)
        outputs = _run(candidate, feeds, "golden inputs")
        rtol, atol = meta.tolerance
        for name, want in expected.items():
            got = outputs.get(name)
            if got is None:
                raise ValidationError(f"golden output {name!r} was not produced")
            got = np.asarray(got)
            if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
                worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else None
                raise ValidationError(
                    f"golden output {name!r} differs beyond rtol={rtol}, atol={atol}"
                    + (f" (max abs diff {worst:.3g})" if worst is not None else " (shape)")
                )
            checked += 1
    else:
        # Zeros with every dynamic dimension at 1 are no valid input for many real models (audio
        # frames, images with a minimum size): time the inputs the candidate warmed up on.
        found = candidate.warmup_feeds()
        budget_set = meta.latency_budget_us is not None
        if found is None and budget_set:
            raise ValidationError(
                "no input fits the model to time it against the latency budget: "
                "publish it with golden inputs (inferctl model add --golden)"
            )
        if found is None:
            log.warning("%s: no golden inputs and no input fits it: not timed", meta.version)
            return Report(checked, 0, 0.0, 0.0, None)
        feeds = found
    _run(candidate, feeds, "warm-up")
    lat = np.empty(max(1, runs), dtype=np.float64)
    for i in range(len(lat)):
        start = time.perf_counter_ns()
        _run(candidate, feeds, "timed run")
        lat[i] = (time.perf_counter_ns() - start) / 1e6
    p50, p99 = (float(x) for x in np.percentile(lat, [50, 99]))
    budget = None if meta.latency_budget_us is None else meta.latency_budget_us / 1000
    if budget is not None and p99 > budget:
        raise ValidationError(f"p99 latency {p99:.2f} ms is over the budget of {budget:g} ms")
    return Report(checked, len(lat), p50, p99, budget)


def _run(candidate: CandidateModel, feeds: Feeds, what: str) -> Mapping[str, np.ndarray]:
    try:
        return candidate.run(feeds)
    except Exception as err:
        raise ValidationError(f"{what} failed: {err}") from err
