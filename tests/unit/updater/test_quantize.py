"""``inferctl quantize``: int8 shrinks a real model with bounded error, and refuses a lossy one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.support.lifecycle import mlp, mlp_forward, mlp_weights
from updater.inferctl.main import main
from updater.operator.evaluate import open_model


@pytest.fixture
def float_model(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 256-256-10 MLP (~270 KB of float32 weights) and 200 labelled calibration rows."""
    model = mlp(tmp_path / "mlp.onnx", n_in=256, hidden=256, n_out=10, seed=1)
    w = mlp_weights(256, 256, 10, seed=1)
    x = np.random.default_rng(2).normal(size=(200, 256)).astype(np.float32)
    y = mlp_forward(w, x).argmax(axis=1)  # labels the float model gets right
    data = tmp_path / "calib.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    return model, data, x


def quantize(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main(["quantize", *argv, "--json", "--latency-runs", "5"])
    out = capsys.readouterr()
    return code, json.loads(out.out), out.err


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantize_shrinks_with_bounded_error(capsys, tmp_path, float_model, mode) -> None:
    model, data, x = float_model
    out = tmp_path / f"mlp-{mode}.onnx"
    code, report, _ = quantize(
        capsys, str(model), "--mode", mode, "--calibration", str(data), "--max-drop", "0.1",
        "-o", str(out),
    )  # fmt: skip
    assert code == 0
    assert report["written"] and out.is_file()
    assert report["size_after_bytes"] == out.stat().st_size
    assert out.stat().st_size < 0.4 * model.stat().st_size  # float32 -> int8 weights
    # the written model really is int8 and really runs close to the float one
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QuantizeLinear" in ops) if mode == "static" else ("MatMulInteger" in ops)
    # run by the backend devices run, as quantize itself judged them
    before = open_model(model).run({"x": x})["probs"]
    after = open_model(out).run({"x": x})["probs"]
    assert np.abs(after - before).max() < 0.05
    assert float(np.mean(after.argmax(1) == before.argmax(1))) >= 0.9
    # dynamic mode scales activations per batch, so the report's batches differ slightly
    assert 0 < report["max_abs_error"] < 0.05
    assert report["agreement"] >= 0.9
    assert report["metric"] == "accuracy" and report["metric_before"] == 1.0
    assert report["drop"] == pytest.approx(1.0 - report["metric_after"])
    assert report["latency_before"]["p50_ms"] > 0 and report["latency_after"]["p50_ms"] > 0


def test_quantize_refuses_beyond_max_drop(capsys, tmp_path, float_model) -> None:
    model, data, _ = float_model
    out = tmp_path / "never.onnx"
    # a drop of exactly zero is what an impossible limit demands; int8 always changes something
    code, report, err = quantize(
        capsys, str(model), "--calibration", str(data), "--max-drop", "-1", "-o", str(out)
    )
    assert code == 3
    assert not report["written"]
    assert not out.exists()
    assert list(tmp_path.glob(".never.onnx.*")) == []  # no temp file left behind
    assert "quantized model not written: accuracy lost is" in err
    assert "over --max-drop -1" in err


def test_without_labels_agreement_is_the_measure(capsys, tmp_path, float_model) -> None:
    model, _, x = float_model
    data = tmp_path / "unlabelled.npz"
    np.savez(data, x=x[:64])
    out = tmp_path / "q.onnx"
    code, report, _ = quantize(
        capsys, str(model), "--mode", "dynamic", "--calibration", str(data), "-o", str(out)
    )
    assert code == 0
    assert report["metric"] is None
    assert report["drop_basis"] == "share of changed top classes"
    assert report["drop"] == pytest.approx(1.0 - report["agreement"])


def test_tflite_and_overwrite_are_refused(capsys, tmp_path, float_model) -> None:
    model, data, _ = float_model
    assert main(["quantize", str(model), "--calibration", str(data), "-o", str(model)]) == 1
    assert "must not overwrite the input model" in capsys.readouterr().err
    fake = tmp_path / "m.tflite"
    fake.write_bytes(b"x")
    assert main(["quantize", str(fake), "--calibration", str(data), "-o", "q.onnx"]) == 1
    assert "only ONNX models can be quantized" in capsys.readouterr().err
