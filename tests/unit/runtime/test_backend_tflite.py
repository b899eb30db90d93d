"""The LiteRT/TFLite backend through the real runtime, on TFLite models written in the tests."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.slots import ModelSlot
from runtime.backends import open_backend
from runtime.errors import BackendError, InputError, ModelLoadError
from tests.support import tflite_models as tm
from tests.support.child import run_python

HAVE_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
HAVE_TFLITE_RUNTIME = importlib.util.find_spec("tflite_runtime") is not None
pytestmark = pytest.mark.skipif(
    not (HAVE_LITERT or HAVE_TFLITE_RUNTIME), reason="no TFLite runtime (the tflite extra)"
)


def cfg(path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(name="m", path=str(path), runtime="tflite", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_float_classifier_matches_numpy(tflite_factory, threads: int) -> None:
    w, b = tm.classifier_weights(n_features=5, n_classes=3, seed=7)
    path = tflite_factory("classifier", w=w, b=b)
    backend = open_backend(path, cfg(path, threads=threads))
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    out = backend.run({"x": x})
    np.testing.assert_allclose(out["probs"], tm.softmax(x @ w + b), rtol=1e-5, atol=1e-7)
    assert backend.runtime == "tflite"
    assert [(s.name, s.dtype, s.shape) for s in backend.inputs] == [("x", "float32", (None, 5))]
    assert [(s.name, s.dtype, s.shape) for s in backend.outputs] == [
        ("probs", "float32", (None, 3))
    ]
    assert backend.inputs[0].scale is None, "a float tensor reports no quantization"
    assert backend.stats.runs == 1, "warm-up is not counted as a served run"


def test_dynamic_batch_resizes_both_ways(tflite_factory) -> None:
    w, b = tm.classifier_weights(seed=3)
    path = tflite_factory("classifier", w=w, b=b)
    backend = open_backend(path, cfg(path))
    rng = np.random.default_rng(2)
    for batch in (1, 5, 5, 1, 5):
        x = rng.normal(size=(batch, 4)).astype(np.float32)
        probs = backend.run({"x": x})["probs"]
        assert probs.shape == (batch, 3)
        np.testing.assert_allclose(probs, tm.softmax(x @ w + b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_quantized_model_reports_scale_zero_point_and_runs(tflite_factory, dtype: str) -> None:
    path = tflite_factory("quantized_fc", dtype=dtype)
    q = tm.quantized_fc_params(dtype)
    backend = open_backend(path, cfg(path))
    sig = backend.signature()
    assert sig["inputs"] == [
        {
            "name": "x",
            "datatype": dtype.upper(),
            "shape": [-1, 6],
            "parameters": {"scale": 0.05, "zero_point": q.x_zero},
        }
    ]
    assert sig["outputs"][0]["parameters"] == {"scale": 0.1, "zero_point": q.y_zero}
    # inputs around the zero point, so that few outputs saturate
    rng = np.random.default_rng(5)
    x_q = (q.x_zero + rng.integers(-40, 41, size=(3, 6))).astype(dtype)
    y = backend.run({"x": x_q})["y"]
    assert y.dtype == np.dtype(dtype)
    expected = q.reference(x_q)
    assert np.abs(y.astype(int) - expected.astype(int)).max() <= 1, "off by more than 1 LSB"
    info = np.iinfo(dtype)
    assert ((expected > info.min) & (expected < info.max)).mean() > 0.5, "test inputs saturate"


def test_two_inputs_two_outputs_and_output_selection(tflite_factory) -> None:
    path = tflite_factory("add_mul")
    backend = open_backend(path, cfg(path))
    assert [s.name for s in backend.inputs] == ["a", "b"]
    assert [s.name for s in backend.outputs] == ["sum", "prod"]
    assert backend.inputs[0].shape == (2, 3), "static dimensions stay as they are"
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 3)).astype(np.float32)
    b = rng.normal(size=(2, 3)).astype(np.float32)
    out = backend.run({"a": a, "b": b})
    np.testing.assert_allclose(out["sum"], a + b, rtol=1e-6)
    np.testing.assert_allclose(out["prod"], a * b, rtol=1e-6)
    only = backend.run({"b": b, "a": a}, ["prod"])
    assert list(only) == ["prod"]
    np.testing.assert_allclose(only["prod"], a * b, rtol=1e-6)


def test_missing_or_unknown_tensors_are_input_errors_not_stale_data(tflite_factory) -> None:
    path = tflite_factory("add_mul")
    backend = open_backend(path, cfg(path))
    a = np.ones((2, 3), np.float32)
    with pytest.raises(InputError, match=r"missing input 'b'"):
        backend.run({"a": a})
    with pytest.raises(InputError, match=r"unknown input 'c'; the model takes a, b"):
        backend.run({"a": a, "b": a, "c": a})
    with pytest.raises(InputError, match=r"unknown output 'diff'; the model gives prod, sum"):
        backend.run({"a": a, "b": a}, ["sum", "diff"])
    assert backend.stats.errors == 0, "a request that does not fit is not a failed run"


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_concurrent_runs_from_8_threads_are_correct(tflite_factory, max_concurrency: int) -> None:
    w, b = tm.classifier_weights(seed=11)
    path = tflite_factory("classifier", w=w, b=b)
    backend = open_backend(path, cfg(path, max_concurrency=max_concurrency))
    rng = np.random.default_rng(4)
    # different batch sizes per thread so interpreters are resized while others run
    inputs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(8)]
    start = threading.Barrier(8)
    wrong: list[str] = []

    def work(i: int) -> None:
        x = inputs[i]
        expected = tm.softmax(x @ w + b)
        start.wait()
        for _ in range(200):
            got = backend.run({"x": x})["probs"]
            if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-6):
                wrong.append(f"thread {i}: got {got}, expected {expected}")
                return

    threads = [threading.Thread(target=work, args=(i,), name=f"tflite-run-{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
    assert backend.stats.runs == 8 * 200 and backend.stats.errors == 0
    assert 1 <= backend._created <= max_concurrency, "the interpreter pool stays bounded"


def test_run_failures_are_backend_errors_and_the_backend_recovers(tflite_factory) -> None:
    w, b = tm.classifier_weights()
    path = tflite_factory("classifier", w=w, b=b)
    backend = open_backend(path, cfg(path, max_concurrency=1))
    with pytest.raises(InputError, match="datatype FP64, the model expects FP32"):
        backend.run({"x": np.ones((2, 4), np.float64)})
    with pytest.raises(InputError, match=r"shape \[2, 7\], the model expects \[-1, 4\]"):
        backend.run({"x": np.ones((2, 7), np.float32)})  # only the batch dimension is dynamic
    assert backend.stats.errors == 0, "requests that do not fit never reach the runtime"
    # what LiteRT itself rejects (the checks skipped) is a counted one-line BackendError
    backend.check_feeds = lambda feeds: None  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="tflite run failed") as wrong_dtype:
        backend.run({"x": np.ones((2, 4), np.float64)})
    with pytest.raises(BackendError, match="tflite run failed") as fixed_dim:
        backend.run({"x": np.ones((2, 7), np.float32)})
    assert "\n" not in str(wrong_dtype.value) and "\n" not in str(fixed_dim.value)
    assert backend.stats.errors == 2
    assert wrong_dtype.value.latency_ns is not None and wrong_dtype.value.latency_ns > 0
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(backend.run({"x": x})["probs"], tm.softmax(x @ w + b), rtol=1e-5)


def test_warm_up_runs_the_model_on_load(tflite_factory) -> None:
    w, b = tm.classifier_weights(seed=9)
    path = tflite_factory("classifier", w=w, b=b)
    expected = tm.softmax(b[None, :])  # what zero inputs give
    for runs, warmed in ((1, True), (0, False)):
        backend = open_backend(path, cfg(path, warmup_runs=runs))
        worker = backend._idle.get_nowait()
        out = worker.interpreter.get_tensor(backend._output_index["probs"])
        assert np.allclose(out, expected) is warmed, f"warmup_runs={runs}"


def test_a_tflite_file_given_only_a_name_and_a_path_runs_on_litert(tflite_factory) -> None:
    """The runtime follows the file, as on the operator side: no ``runtime: tflite`` needed."""
    w, b = tm.classifier_weights(seed=5)
    path = tflite_factory("classifier", w=w, b=b)
    config = ModelConfig(name="m", path=str(path))
    assert config.runtime == "tflite"
    slot = ModelSlot(config)
    slot.swap(slot.load(path, "1"))
    x = np.ones((2, 4), np.float32)
    out, _model, _rid = slot.predict({"x": x})
    np.testing.assert_allclose(out["probs"], tm.softmax(x @ w + b), rtol=1e-5)
    slot.close()
    assert ModelConfig(name="m", path="m.onnx").runtime == "onnxruntime"


def test_load_errors_are_one_line(tflite_factory, tmp_path: Path) -> None:
    good = tflite_factory("classifier").read_bytes()
    cases = {
        "missing": None,
        "empty": b"",
        "garbage": b"not a flatbuffer at all" * 8,
        "truncated": good[: len(good) // 2],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tflite"
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ModelLoadError) as info:
            open_backend(path, cfg(path))
        message = str(info.value)
        assert "\n" not in message and str(path) in message, message
    path = tflite_factory("unsupported_op")
    with pytest.raises(ModelLoadError, match="InferdNoSuchOp") as info:
        open_backend(path, cfg(path))
    assert "\n" not in str(info.value)


def test_demo_twin_writer_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    b1 = rng.normal(size=16).astype(np.float32)
    w2 = rng.normal(size=(16, 3)).astype(np.float32)
    b2 = rng.normal(size=3).astype(np.float32)
    path = tm.write_tflite_classifier(tmp_path / "demo.tflite", w1, b1, w2, b2)
    backend = open_backend(path, cfg(path))
    assert backend.inputs[0].shape == (None, 8) and backend.outputs[0].name == "probs"
    x = rng.normal(size=(6, 8)).astype(np.float32)
    expected = tm.softmax(np.maximum(x @ w1 + b1, 0) @ w2 + b2)
    np.testing.assert_allclose(backend.run({"x": x})["probs"], expected, rtol=1e-5, atol=1e-6)


def test_slot_swaps_tflite_models_under_load_without_failures(tflite_factory) -> None:
    weights = {v: tm.classifier_weights(seed=s) for v, s in (("1", 20), ("2", 21))}
    paths = {v: tflite_factory("classifier", w=w, b=b) for v, (w, b) in weights.items()}
    slot = ModelSlot(cfg(paths["1"]))
    slot.swap(slot.load(paths["1"], "1"))
    x = np.random.default_rng(8).normal(size=(2, 4)).astype(np.float32)
    expected = {v: tm.softmax(x @ w + b) for v, (w, b) in weights.items()}
    stop = threading.Event()
    swapped = threading.Event()
    served: list[str] = []
    wrong: list[str] = []
    started_after_swap: list[str] = []

    def work() -> None:
        while not stop.is_set():
            after = swapped.is_set()
            outputs, model, _rid = slot.predict({"x": x})
            served.append(model.version)
            if after:
                started_after_swap.append(model.version)
            if not np.allclose(outputs["probs"], expected[model.version], atol=1e-6):
                wrong.append(model.version)

    def served_at_least(n: int) -> None:
        deadline = time.monotonic() + 20
        while len(served) < n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(served) >= n, "the predicting threads stalled or died"

    threads = [threading.Thread(target=work, name=f"tflite-load-{i}") for i in range(4)]
    for t in threads:
        t.start()
    try:
        served_at_least(200)
        old = slot.swap(slot.load(paths["2"], "2"))
        swapped.set()
        served_at_least(len(served) + 200)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert wrong == []
    # a request that began before the swap may finish on 1; every one begun after it serves 2
    assert started_after_swap and set(started_after_swap) == {"2"}
    assert old is not None and "_idle" not in vars(old.backend), "the old model was closed"


def test_no_tflite_runtime_is_backend_unavailable_naming_the_extra() -> None:
    proc = run_python(
        """
        import sys
        sys.modules["ai_edge_litert"] = None  # makes `import ai_edge_litert...` fail
        sys.modules["tflite_runtime"] = None
        from runtime.backends import backend_class
        from runtime.errors import BackendUnavailableError
        try:
            backend_class("tflite")
        except BackendUnavailableError as err:
            print(err)
            sys.exit(3)
        """
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "pip install inferd[tflite]" in lines[0]


@pytest.mark.skipif(not HAVE_LITERT, reason="simulates tflite-runtime with ai-edge-litert")
def test_falls_back_to_tflite_runtime_when_litert_is_absent(tflite_factory) -> None:
    # The device has only tflite-runtime: here its module name carries the LiteRT interpreter
    # (the same Python API), so the fallback import path is exercised with a real runtime.
    path = tflite_factory("add_mul")
    proc = run_python(
        """
        import sys, types
        import numpy as np
        import ai_edge_litert.interpreter as litert
        package = types.ModuleType("tflite_runtime")
        package.interpreter = litert
        sys.modules["tflite_runtime"] = package
        sys.modules["tflite_runtime.interpreter"] = litert
        sys.modules["ai_edge_litert"] = sys.modules["ai_edge_litert.interpreter"] = None
        from runtime.backends import open_backend, tflite
        from agent.config import ModelConfig
        path = sys.argv[1]
        backend = open_backend(path, ModelConfig(name="m", path=path, runtime="tflite"))
        a, b = np.full((2, 3), 2, np.float32), np.full((2, 3), 3, np.float32)
        out = backend.run({"a": a, "b": b})
        print(tflite.RUNTIME_PACKAGE, float(out["prod"].sum()))
        """,
        str(path),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tflite-runtime", "36.0"]
