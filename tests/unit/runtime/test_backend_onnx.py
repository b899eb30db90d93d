"""The ONNX Runtime backend through the real runtime, on models built here."""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from agent.config import ModelConfig
from agent.slots import ModelSlot
from runtime.backends import backend_class, open_backend
from runtime.errors import BackendError, BackendUnavailableError, InputError, ModelLoadError
from tests.support import models
from tests.support.child import run_python


def cfg(path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(name="m", path=str(path), **kw)  # type: ignore[arg-type]


def test_classifier_matches_numpy(model_factory) -> None:
    path = model_factory("classifier", seed=7)
    backend = open_backend(path, cfg(path))
    w, b = models.classifier_weights(seed=7)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    z = x @ w + b
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    out = backend.run({"x": x})
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-5)
    assert backend.inputs[0].shape == (None, 4), "dynamic batch is reported as None"
    assert backend.stats.runs == 1, "warm-up is not counted as a served run"


def test_multiple_inputs_outputs_and_int64_scalar(model_factory) -> None:
    path = model_factory("multi_io")
    backend = open_backend(path, cfg(path))
    a = np.ones((2, 3), np.float32)
    b = np.full((2, 3), 2.0, np.float32)
    out = backend.run({"a": a, "b": b, "k": np.array(3, dtype=np.int64)})
    np.testing.assert_array_equal(out["sum"], a + b)
    np.testing.assert_array_equal(out["scaled"], a * 3)
    assert {s.name: s.shape for s in backend.inputs}["k"] == ()
    only = backend.run({"a": a, "b": b, "k": np.array(5, dtype=np.int64)}, ["scaled"])
    assert list(only) == ["scaled"]


def test_stateful_model_state_fed_back_by_caller(model_factory) -> None:
    path = model_factory("stateful")
    backend = open_backend(path, cfg(path))
    state = np.zeros((1, 4), np.float32)
    for step in range(1, 4):
        out = backend.run({"x": np.ones((1, 4), np.float32), "state_in": state})
        state = out["state_out"]
        np.testing.assert_array_equal(out["y"], np.full((1, 4), 2.0 * step))


@pytest.mark.parametrize(
    ("onnx_type", "np_type", "op"),
    [
        (TensorProto.FLOAT, np.float32, "Neg"),
        (TensorProto.FLOAT16, np.float16, "Neg"),
        (TensorProto.INT8, np.int8, "Neg"),
        (TensorProto.UINT8, np.uint8, "Identity"),
        (TensorProto.INT32, np.int32, "Neg"),
        (TensorProto.INT64, np.int64, "Neg"),
    ],
)
def test_input_dtypes(tmp_path: Path, onnx_type: int, np_type: type, op: str) -> None:
    path = models.elementwise(tmp_path / "m.onnx", op, onnx_type, ["N", 3])
    backend = open_backend(path, cfg(path))
    assert backend.inputs[0].dtype == np.dtype(np_type).name
    x = np.array([[1, 2, 3]], dtype=np_type)
    out = backend.run({"x": x})["y"]
    assert out.dtype == np_type
    np.testing.assert_array_equal(out, -x if op == "Neg" else x)


def test_dynamic_dimensions_accept_any_batch(model_factory) -> None:
    path = model_factory("classifier")
    backend = open_backend(path, cfg(path))
    for n in (1, 7, 64):
        assert backend.run({"x": np.zeros((n, 4), np.float32)})["probs"].shape == (n, 3)


def test_check_feeds_explains_mismatches(model_factory) -> None:
    path = model_factory("classifier")
    backend = open_backend(path, cfg(path))
    with pytest.raises(InputError, match=r"shape \[2, 5\], the model expects \[-1, 4\]"):
        backend.check_feeds({"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(InputError, match="datatype FP64, the model expects FP32"):
        backend.check_feeds({"x": np.zeros((2, 4), np.float64)})
    with pytest.raises(InputError, match="unknown input 'y'"):
        backend.check_feeds({"y": np.zeros((2, 4), np.float32)})
    with pytest.raises(InputError, match="missing input 'x'"):
        backend.check_feeds({})


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        open_backend(tmp_path / "nope.onnx", cfg(tmp_path / "nope.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError) as info:
        open_backend(corrupt, cfg(corrupt))
    assert "\n" not in str(info.value) and "cannot load ONNX model" in str(info.value)
    unsupported = models.elementwise(tmp_path / "u.onnx", "Relu", TensorProto.FLOAT, [1])
    data = unsupported.read_bytes().replace(b"Relu", b"Rulu")
    unsupported.write_bytes(data)
    with pytest.raises(ModelLoadError) as info:
        open_backend(unsupported, cfg(unsupported))
    assert "\n" not in str(info.value) and "Rulu" in str(info.value)


def test_runtime_failure_is_backend_error_and_counted(model_factory) -> None:
    path = model_factory("failing")
    backend = open_backend(path, cfg(path))
    seen: list[tuple[int, bool]] = []
    backend.observer = lambda ns, ok: seen.append((ns, ok))
    backend.run({"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(BackendError) as info:
        backend.run({"x": np.ones((1, 4), np.float32)})
    assert "\n" not in str(info.value)
    assert (backend.stats.runs, backend.stats.errors) == (2, 1)
    assert [ok for _, ok in seen] == [True, False]
    assert all(ns > 0 for ns, _ in seen)


def test_a_provider_failing_at_run_time_gets_onnxruntimes_fallback(model_factory) -> None:
    """The backend calls the compiled session directly; a provider's run-time failure (EPFail,
    injected here: no provider on this machine fails so) still goes through onnxruntime's own
    wrapper, which moves the session to its fallback providers and runs again."""
    from runtime.backends.onnx import _EP_FAIL

    path = model_factory("classifier", seed=3)
    backend = open_backend(path, cfg(path))
    x = np.ones((2, 4), np.float32)
    want = backend.run({"x": x})
    session = backend.session  # type: ignore[attr-defined]
    compiled = session._sess

    class FailingProvider:
        def __getattr__(self, name: str) -> object:  # what the wrapper asks of a session
            return getattr(compiled, name)

        def run(self, *args: object) -> object:
            raise _EP_FAIL("a provider failed at run time")

    session._sess = FailingProvider()
    out = backend.run({"x": x})
    np.testing.assert_array_equal(out["probs"], want["probs"])
    assert not isinstance(session._sess, FailingProvider), "the session was made again"
    assert backend.stats.runs == 2 and backend.stats.errors == 0


def test_gpu_providers_fall_back_to_cpu_with_one_warning(
    model_factory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """No GPU here: TensorRT/CUDA options are built, then skipped cleanly. Not yet run on a GPU."""
    path = model_factory("classifier")
    options = cfg(
        path,
        providers=("tensorrt", "cuda"),
        tensorrt_fp16=True,
        provider_options={"tensorrt": {"trt_max_workspace_size": 1 << 30}},
    )
    with caplog.at_level(logging.WARNING):
        backend = open_backend(path, options, cache_dir=tmp_path / "cache")
    assert backend.providers == ("cpu",)
    warnings = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(warnings) == 1 and "tensorrt, cuda" in warnings[0].getMessage()
    assert backend.run({"x": np.zeros((1, 4), np.float32)})["probs"].shape == (1, 3)


def test_provider_list_carries_documented_tensorrt_options(model_factory, tmp_path: Path) -> None:
    from runtime.backends.onnx import OnnxBackend

    path = model_factory("classifier")
    options = cfg(path, providers=("tensorrt", "cpu"), tensorrt_fp16=True, device_id=1)
    backend = OnnxBackend(path, options, tmp_path / "cache")
    import onnxruntime as ort

    real = ort.get_available_providers
    ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    try:
        chosen = dict(backend._provider_list())
    finally:
        ort.get_available_providers = real
    trt = chosen["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 1
    assert trt["trt_engine_cache_enable"] is True
    assert Path(trt["trt_engine_cache_path"]).is_dir()
    assert list(chosen)[-1] == "CPUExecutionProvider"


def test_optimized_model_cache_written(model_factory, tmp_path: Path) -> None:
    path = model_factory("classifier")
    open_backend(path, cfg(path, optimized_model_cache=True), cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").glob("*.opt.onnx"))


def test_unknown_runtime_is_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="unknown runtime"):
        backend_class("tvm")


def test_swap_under_concurrent_load_fails_no_request(model_factory) -> None:
    slot = ModelSlot(cfg(model_factory("classifier", seed=1), max_concurrency=8))
    slot.swap(slot.load(slot.config.path, "1"))
    second = model_factory("classifier", seed=2)
    errors: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        x = {"x": np.ones((1, 4), np.float32)}
        while not stop.is_set():
            try:
                _, model, _ = slot.predict(x)
                versions.add(model.version)
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    old = slot.current
    for i in range(20):
        slot.swap(slot.load(second if i % 2 == 0 else slot.config.path, str(i + 2)))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(versions) > 1
    assert old._closed, "the retired model is closed once its requests finish"


def test_a_loaded_model_costs_what_the_runtime_keeps_and_no_more(tmp_path: Path) -> None:
    # Loading frees as much as it keeps (the parsed file); without the heap trimmed after each
    # load, glibc kept those pages and each 4 MB model cost the daemon 8-10.7 MB of RSS where
    # onnxruntime 1.32 keeps 4.1 MB. The floor is measured, not assumed: onnxruntime 1.21
    # itself keeps 8.6 MB of such a model (make check-oldest).
    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: the heap is not trimmed")
    path = models.classifier(tmp_path / "m.onnx", n_features=1024, n_classes=1024)
    code = f"""
        import ctypes, json, sys
        import numpy as np, onnxruntime as ort
        from runtime.backends import open_backend
        from runtime.options import RuntimeOptions

        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024

        def bare():  # what the runtime itself keeps: a session, run, the heap trimmed
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            s = ort.InferenceSession({str(path)!r}, so)
            s.run(None, {{"x": np.zeros((1, 1024), np.float32)}})
            ctypes.CDLL(None).malloc_trim(0)
            return s

        def daemon():
            return open_backend({str(path)!r}, RuntimeOptions())

        one = daemon if sys.argv[1] == "daemon" else bare
        keep = [one()]
        before = rss()
        keep += [one() for _ in range(3)]
        print(json.dumps((rss() - before) / 3))
        """
    per_model = {}
    for which in ("daemon", "bare"):  # each in its own process
        proc = run_python(code, which)
        assert proc.returncode == 0, proc.stderr
        per_model[which] = float(proc.stdout.strip().splitlines()[-1])
    # glibc places a session in steps of about 1.4 MB: 1.3x leaves room for one step
    assert per_model["daemon"] <= 1.3 * per_model["bare"], {
        k: f"{v / 2**20:.1f} MB" for k, v in per_model.items()
    }
