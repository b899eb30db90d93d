"""``inferctl evaluate``: metrics equal scikit-learn's on a real model; thresholds set the exit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto
from sklearn import metrics as skm

from telemetry.quality.drift import DriftTracker, load_reference
from tests.support.lifecycle import mlp, mlp_forward, mlp_weights
from tests.support.models import classifier, classifier_weights, elementwise
from updater.inferctl.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["evaluate", *argv, "--latency-runs", "5"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def labelled(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 3-class classifier, 300 labelled rows; (model, data, y, probs)."""
    model = classifier(tmp_path / "clf.onnx", n_features=4, n_classes=3, seed=5)
    w, b = classifier_weights(4, 3, seed=5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    logits = x @ w + b
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # truth agrees with the model 80 % of the time
    y = np.where(rng.uniform(size=300) < 0.8, probs.argmax(axis=1), rng.integers(0, 3, 300))
    data = tmp_path / "eval.npz"
    np.savez(data, x=x, y=y.astype(np.int64))
    return model, data, y, probs


def test_json_report_equals_sklearn_and_passes(capsys, labelled) -> None:
    model, data, y, probs = labelled
    code, out, _ = run(
        capsys, str(model), "--data", str(data), "--json", "--threshold", "accuracy=0.5"
    )
    assert code == 0
    report = json.loads(out)
    pred = probs.argmax(axis=1)
    m = report["metrics"]
    assert report["samples"] == 300 and report["task"] == "classification"
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), rel=1e-5)
    assert report["classification"]["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert m["latency_p50_ms"] > 0 and m["throughput_per_s"] > 0
    assert report["thresholds"] == [
        {"metric": "accuracy", "op": ">=", "limit": 0.5, "value": m["accuracy"], "ok": True}
    ]


def test_missed_threshold_exits_3_with_the_reason(capsys, labelled) -> None:
    model, data, _, _ = labelled
    code, out, _ = run(
        capsys,
        str(model),
        "--data",
        str(data),
        "--labels",
        "cat,dog,eel",
        "--threshold",
        "f1_macro>=0.99",
        "--threshold",
        "latency_p99_ms=10000",
    )
    assert code == 3
    assert "threshold f1_macro >= 0.99:" in out and "FAILED" in out
    assert "threshold latency_p99_ms <= 10000:" in out
    assert "cat" in out and "confusion" in out


def test_regression_metrics(capsys, tmp_path) -> None:
    model = mlp(tmp_path / "reg.onnx", n_in=6, hidden=8, n_out=1, seed=2)
    w = mlp_weights(6, 8, 1, seed=2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (mlp_forward(w, x)[:, 0] + rng.normal(scale=0.1, size=200)).astype(np.float32)
    data = tmp_path / "reg.npz"
    np.savez(data, x=x, y=y)
    code, out, _ = run(capsys, str(model), "--data", str(data), "--json", "--threshold", "rmse=0")
    report = json.loads(out)
    pred = mlp_forward(w, x)[:, 0]
    assert code == 3  # nobody predicts noise to 1e-6
    assert report["task"] == "regression"
    assert report["metrics"]["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-4)
    assert report["metrics"]["rmse"] == pytest.approx(
        math.sqrt(skm.mean_squared_error(y, pred)), rel=1e-4
    )


def test_fixed_batch_model_is_run_sample_by_sample(capsys, tmp_path) -> None:
    model = elementwise(tmp_path / "relu.onnx", "Relu", TensorProto.FLOAT, [1, 3])
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    y = np.maximum(x, 0).argmax(axis=1)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    code, out, _ = run(capsys, str(model), "--data", str(data), "--json")
    assert code == 0
    assert json.loads(out)["metrics"]["accuracy"] == 1.0


def test_reference_out_is_usable_for_drift(capsys, labelled, tmp_path) -> None:
    model, data, _, _ = labelled
    ref_path = tmp_path / "clf.ref.json"
    code, _, _ = run(capsys, str(model), "--data", str(data), "--reference-out", str(ref_path))
    assert code == 0
    ref = load_reference(ref_path)
    assert {t.name for t in ref.tensors} == {"x", "probs"}
    x = np.load(data)["x"]
    tracker = DriftTracker(ref, window=300, threshold=0.2)
    report = tracker.observe({"x": x})
    assert report is not None and not report.drifted
    report = tracker.observe({"x": x + 2.0})
    assert report is not None and report.drifted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "mae=0.1"], "no such metric for a classification model"),
        (["--threshold", "accuracy~0.1"], "must look like accuracy=0.9"),
    ],
)
def test_bad_thresholds_are_one_line_errors(capsys, labelled, args, message) -> None:
    model, data, _, _ = labelled
    code, _, err = run(capsys, str(model), "--data", str(data), *args)
    assert code == 1
    assert message in err
    assert "Traceback" not in err


def test_data_without_labels_is_refused(capsys, tmp_path, labelled) -> None:
    model = labelled[0]
    data = tmp_path / "nolabels.npz"
    np.savez(data, x=np.zeros((3, 4), np.float32))
    code, _, err = run(capsys, str(model), "--data", str(data))
    assert code == 1
    assert "no labels; put the truth in an array named 'y'" in err


def test_tflite_twin_scores_like_the_onnx_model(capsys) -> None:
    """Batched scoring then single-sample latency: the interpreter is resized both ways."""
    pytest.importorskip("ai_edge_litert")
    demo = Path(__file__).resolve().parents[3] / "examples" / "models"
    data = str(demo / "demo.eval.npz")
    code, out, _ = run(capsys, str(demo / "demo.tflite"), "--data", data, "--json")
    assert code == 0, out
    lite = json.loads(out)
    _, out, _ = run(capsys, str(demo / "demo.onnx"), "--data", data, "--json")
    assert lite["runtime"] == "tflite"
    assert lite["metrics"]["accuracy"] == pytest.approx(json.loads(out)["metrics"]["accuracy"])
    assert lite["latency"]["runs"] == 5
