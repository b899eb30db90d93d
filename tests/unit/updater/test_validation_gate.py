"""The validation gate without golden inputs times the candidate on inputs that fit it.

Zeros with every dynamic dimension at 1 (what the gate used before) are no valid input for
many real models; the gate now takes the inputs the candidate itself warmed up on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ModelConfig
from agent.slots import ModelSlot
from agent.updates import LoadedCandidate
from runtime.errors import ValidationError
from runtime.tensors import Signature
from tests.support.models import reshape_15, vad_like
from updater.device.validation import validate
from updater.meta import ModelMeta


def candidate(path: Path) -> LoadedCandidate:
    slot = ModelSlot(ModelConfig(name="m", path=str(path)))
    return LoadedCandidate(slot.load(path, "2"))


def meta_for(c: LoadedCandidate, budget_us: int | None) -> ModelMeta:
    sig = Signature.from_json(c.signature())
    return ModelMeta(
        name="m", version="2", seq=2, runtime="onnxruntime", signature=sig,
        latency_budget_us=budget_us,
    )  # fmt: skip


def test_a_vad_shaped_model_is_timed_on_its_warm_up_inputs(tmp_path: Path) -> None:
    c = candidate(vad_like(tmp_path / "vad.onnx"))
    try:
        report = validate(c, meta_for(c, 60_000_000), None, None, runs=5)
    finally:
        c.close()
    assert report.runs == 5 and report.golden_checked == 0
    assert 0 < report.p50_ms <= report.p99_ms


def test_no_input_fits_refuses_a_latency_budget_and_skips_timing_without(
    tmp_path: Path,
) -> None:
    c = candidate(reshape_15(tmp_path / "never.onnx"))
    try:
        assert c.warmup_feeds() is None  # the premise: nothing the search tried ran
        with pytest.raises(ValidationError, match="publish it with golden inputs"):
            validate(c, meta_for(c, 60_000_000), None, None, runs=5)
        report = validate(c, meta_for(c, None), None, None, runs=5)
    finally:
        c.close()
    assert report.runs == 0
