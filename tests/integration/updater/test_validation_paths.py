"""The validation gate's refusals end to end: a published candidate whose interface does not fit
the slot's clients (an input missing, another dtype, an extra input, an output missing), and a
latency budget in whole milliseconds on both sides of the candidate's measured time.

Real signed repository over HTTP, real device updater and slot, real ONNX models; each refusal
keeps the serving version and names the cause in the failed update event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.support.models import classifier, multi_io, save, spin
from tests.support.tuf_repo import Device, TufRepo


def _failed(device: Device) -> str:
    assert device.version == "1"
    assert device.states()[-2:] == ["failed", "idle"], device.states()
    (reason,) = [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]
    return reason


def _f(name: str, shape: list[int | str], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _first_3_of_axis_1() -> list[onnx.TensorProto]:
    """The starts, ends and axes (``s0``, ``s1``, ``ax``) of a Slice that keeps ``[:, 0:3]``."""
    return [
        onnx.numpy_helper.from_array(np.array([0], np.int64), "s0"),
        onnx.numpy_helper.from_array(np.array([3], np.int64), "s1"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "ax"),
    ]


def _sum_only(path: Path) -> Path:
    """multi_io without its ``k`` input: a, b -> sum, scaled (= a + a)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Add", ["a", "a"], ["scaled"]),
        ],
        "no_k",
        [_f("a", ["N", 3]), _f("b", ["N", 3])],
        [_f("sum", ["N", 3]), _f("scaled", ["N", 3])],
    )
    return save(graph, path)


def _double_input(path: Path) -> Path:
    """x as FP64 (cast to float inside), probs [N, 3] float32 as the slot's."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Slice", ["xf", "s0", "s1", "ax"], ["xf3"]),
            helper.make_node("Softmax", ["xf3"], ["probs"], axis=-1),
        ],
        "double",
        [_f("x", ["N", 4], TensorProto.DOUBLE)],
        [_f("probs", ["N", 3])],
        initializer=_first_3_of_axis_1(),
    )
    return save(graph, path)


def _extra_input(path: Path) -> Path:
    """x [N, 4] and a ``temperature`` [1] the slot's clients never send."""
    graph = helper.make_graph(
        [
            helper.make_node("Div", ["x", "temperature"], ["xt"]),
            helper.make_node("Slice", ["xt", "s0", "s1", "ax"], ["x3"]),
            helper.make_node("Softmax", ["x3"], ["probs"], axis=-1),
        ],
        "extra",
        [_f("x", ["N", 4]), _f("temperature", [1])],
        [_f("probs", ["N", 3])],
        initializer=_first_3_of_axis_1(),
    )
    return save(graph, path)


def _other_output(path: Path) -> Path:
    """x [N, 4] -> ``scores`` where the slot's clients read ``probs``."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["scores"], axis=-1)],
        "other_output",
        [_f("x", ["N", 4])],
        [_f("scores", ["N", 4])],
    )
    return save(graph, path)


@pytest.mark.parametrize(
    ("serving", "candidate", "reason"),
    [
        (multi_io, _sum_only, "input 'k' is missing from the candidate"),
        (classifier, _double_input, "input 'x' is FP64 in the candidate, FP32 in the slot"),
        (classifier, _extra_input, "the candidate needs input(s) the slot lacks: ['temperature']"),
        (classifier, _other_output, "output 'probs' is missing from the candidate"),
    ],
    ids=["missing-input", "dtype-mismatch", "extra-input", "missing-output"],
)
def test_a_candidate_that_does_not_fit_the_slots_clients_is_refused(
    tuf_repo: TufRepo,
    update_device: Callable[..., Device],
    tmp_path: Path,
    serving: Callable[[Path], Path],
    candidate: Callable[[Path], Path],
    reason: str,
) -> None:
    device = update_device(serving(tmp_path / "v1.onnx"))
    meta = tuf_repo.publish(candidate(tmp_path / "v2.onnx"), "2")
    device.check()
    assert _failed(device) == f"validating -> failed: {reason}"
    assert device.updater.store.active("classifier") is None
    device.events.clear()
    device.check()
    assert device.states() == ["checking", "idle"], f"seq {meta.seq} is not tried again"


def _spin(path: Path) -> Path:
    spin(path)
    model = onnx.load(str(path))
    model.doc_string = path.name  # its own bytes: not the serving model's digest
    onnx.save(model, str(path))
    return path


def _spin_count(seconds: float, model: Path) -> int:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    n = 100_000
    start = time.perf_counter()
    session.run(None, {"n": np.array(n, np.int64)})
    return max(n, int(n * seconds / (time.perf_counter() - start)))


@pytest.mark.parametrize(("budget_ms", "passes"), [(1, False), (500, True)])
def test_a_latency_budget_in_whole_milliseconds_is_judged_in_milliseconds(
    tuf_repo: TufRepo,
    update_device: Callable[..., Device],
    tmp_path: Path,
    budget_ms: int,
    passes: bool,
) -> None:
    """The candidate's golden run takes about 5 ms here. A 1 ms budget (1000 us in the signed
    metadata, far from rounding to 0) refuses it, 500 ms admits it: read 1000x too large or too
    small, one of the two would go the other way."""
    device = update_device(_spin(tmp_path / "v1.onnx"))
    n = _spin_count(0.005, tmp_path / "v1.onnx")
    golden = tmp_path / "golden.npz"
    np.savez(golden, n=np.array(n, np.int64), count=np.array([min(n, 2**24)], np.float32))
    meta = tuf_repo.publish(
        _spin(tmp_path / "v2.onnx"), "2", golden=golden, latency_budget_ms=budget_ms
    )
    assert meta.latency_budget_us == budget_ms * 1000
    device.check()
    if passes:
        assert device.version == "2"
        (report,) = [f for k, _, f in device.events if k == "validation-passed"]
        assert report["budget_ms"] == budget_ms and 0.5 < report["p99_ms"] < budget_ms, report
    else:
        reason = _failed(device)
        assert reason.startswith("validating -> failed: p99 latency "), reason
        assert reason.endswith(" ms is over the budget of 1 ms"), reason
