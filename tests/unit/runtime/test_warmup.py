"""Warm-up that fits the model: golden inputs, configured inputs or shapes, else a search over
dynamic dimensions; a model whose warm-up fails still loads and serves (issue 14.1).

The models are built here with onnx.helper and run by the real onnxruntime.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.config import ModelConfig
from agent.slots import ModelSlot
from runtime import bundle
from runtime.backends import open_backend
from runtime.backends.base import TensorSpec, search_shapes
from tests.support.child import run_python
from tests.support.models import (
    reflect_pad_refuses_short_axis,
    reshape_15,
    run_bare,
    vad_feeds,
    vad_like,
)


def cfg(path: Path, **kw: object) -> ModelConfig:
    return ModelConfig(name="m", path=str(path), **kw)  # type: ignore[arg-type]


def _needs_the_premise(path: Path) -> None:
    if not reflect_pad_refuses_short_axis(path):
        pytest.skip(f"onnxruntime {ort.__version__} pads a length-1 axis by reflection")


def test_zero_warm_up_with_dims_at_1_is_what_fails_the_vad_shape(tmp_path: Path) -> None:
    """The premise: the old warm-up (zeros, dynamic dims 1) is no valid input for this model."""
    _needs_the_premise(vad_like(tmp_path / "vad.onnx"))


def test_search_finds_a_size_that_runs_keeping_named_batch_dims_together(tmp_path: Path) -> None:
    path = vad_like(tmp_path / "vad.onnx")
    _needs_the_premise(path)
    backend = open_backend(path, cfg(path))
    assert backend.warmup_error is None and backend.warmup_source == "search"
    feeds = backend.warmup_feeds()
    assert feeds is not None
    shapes = {k: v.shape for k, v in feeds.items()}
    # 128 is the first power of two over the 64 samples of padding; the state's batch axis
    # (the same symbolic name as the audio's first axis) stays 1 with it
    assert shapes == {"input": (1, 128), "state": (2, 1, 128), "sr": ()}
    feeds = vad_feeds()
    out = backend.run(feeds)
    want = run_bare(path, feeds)
    np.testing.assert_allclose(out["output"], want[0], rtol=1e-6)
    np.testing.assert_allclose(out["stateN"], want[1], rtol=1e-6)


def test_search_candidates_start_with_the_old_zero_feeds_and_stay_bounded() -> None:
    image = TensorSpec("img", "float32", (None, 3, None, None), dim_names=("N", None, "H", "W"))
    candidates = list(search_shapes([image]))
    assert candidates[0]["img"].shape == (1, 3, 1, 1)
    assert candidates[1]["img"].shape == (1, 3, 2, 2)
    assert (2, 3, 2, 2) in [c["img"].shape for c in candidates], "then every dim at the size"
    assert all(c["img"].size <= 1 << 22 for c in candidates)
    fixed = TensorSpec("x", "int64", (2, 3))
    assert [c["x"].shape for c in search_shapes([fixed])] == [(2, 3)], "nothing to search"


def test_failed_warm_up_is_a_warning_and_the_model_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = reshape_15(tmp_path / "r15.onnx")
    with caplog.at_level(logging.WARNING):
        backend = open_backend(path, cfg(path))
    assert backend.warmup_error is not None and backend.warmup_feeds() is None
    assert "requested shape:{3,5}" in backend.warmup_error
    assert "\n" not in backend.warmup_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "warm-up failed" in warnings[0] and "serves" in warnings[0]
    x = np.arange(15, dtype=np.float32)
    np.testing.assert_array_equal(backend.run({"x": x})["y"], x.reshape(3, 5))
    assert (backend.stats.runs, backend.stats.errors) == (1, 0), "warm-up is not counted"


def test_model_slot_loads_warns_with_an_event_and_serves(tmp_path: Path) -> None:
    path = reshape_15(tmp_path / "r15.onnx")
    slot = ModelSlot(cfg(path))
    events: list[tuple[str, str, dict[str, Any]]] = []
    slot.emit_event = lambda kind, message, **kw: events.append((kind, message, kw))
    slot.swap(slot.load(path, "3"))
    assert slot.ready
    assert [(k, kw["level"], kw["model"], kw["version"]) for k, _, kw in events] == [
        ("warmup-failed", "warning", "m", "3")
    ]
    assert "warm-up failed" in events[0][1]
    x = np.arange(15, dtype=np.float32)
    out, _model, _rid = slot.predict({"x": x})
    np.testing.assert_array_equal(out["y"], x.reshape(3, 5))
    slot.close()


@pytest.mark.parametrize("form", ["plain", "published"])
def test_golden_inputs_of_the_bundle_come_first(tmp_path: Path, form: str) -> None:
    feeds = vad_feeds(samples=300)
    if form == "plain":  # beside a configured model, arrays named like the inputs
        path = vad_like(tmp_path / "vad.onnx")
        np.savez(tmp_path / "vad.golden.npz", **feeds)  # type: ignore[arg-type]
    else:  # a staged update's folder, the published in./out. form
        path = vad_like(tmp_path / "model.onnx")
        (tmp_path / bundle.GOLDEN_FILE).write_bytes(bundle.golden_bytes(bundle.Golden(feeds)))
    backend = open_backend(path, cfg(path))
    assert backend.warmup_source == "golden inputs" and backend.warmup_error is None
    feeds = backend.warmup_feeds()
    assert feeds is not None and feeds["input"].shape == (1, 300)
    np.testing.assert_array_equal(feeds["input"], vad_feeds(samples=300)["input"])


def test_configured_warmup_inputs_and_shapes(tmp_path: Path) -> None:
    path = vad_like(tmp_path / "vad.onnx")
    npz = tmp_path / "warm.npz"
    np.savez(npz, **vad_feeds(samples=256))  # type: ignore[arg-type]
    backend = open_backend(path, cfg(path, warmup_inputs=str(npz)))
    assert backend.warmup_source == "warmup_inputs" and backend.warmup_error is None
    feeds = backend.warmup_feeds()
    assert feeds is not None and feeds["input"].shape == (1, 256)

    backend = open_backend(path, cfg(path, warmup_shapes={"input": (1, 512)}))
    assert backend.warmup_source == "warmup_shapes" and backend.warmup_error is None
    feeds = backend.warmup_feeds()
    assert feeds is not None
    assert {k: v.shape for k, v in feeds.items()} == {
        "input": (1, 512),
        "state": (2, 1, 128),
        "sr": (),
    }


def test_configured_warm_up_that_does_not_fit_warns_and_serves(tmp_path: Path) -> None:
    path = vad_like(tmp_path / "vad.onnx")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"warmup_shapes": {"audio": (1, 512)}}, "warmup_shapes names audio"),
        ({"warmup_inputs": str(tmp_path / "missing.npz")}, "warmup_inputs: "),
    ]
    if reflect_pad_refuses_short_axis(path):
        cases.append(({"warmup_shapes": {"input": (1, 8)}}, "Pad reflect"))
    for options, why in cases:
        backend = open_backend(path, cfg(path, **options))
        assert backend.warmup_error is not None and why in backend.warmup_error, options
        assert backend.run(vad_feeds())["stateN"].shape == (2, 1, 128)


def test_warmup_options_are_checked_in_config() -> None:
    with pytest.raises(ValueError, match="negative"):
        ModelConfig(name="m", path="m.onnx", warmup_shapes={"x": (1, -1)})
    with pytest.raises(ValueError, match="not both"):
        ModelConfig(name="m", path="m.onnx", warmup_inputs="w.npz", warmup_shapes={"x": (1,)})


def test_a_process_that_dies_in_a_warm_up_run_does_not_die_again_at_its_restart(
    tmp_path: Path,
) -> None:
    """A runtime that crashes natively on a probe (onnxruntime 1.19-1.20 died of SIGFPE on the
    zoo's OCR angle classifier) kills the daemon, and systemd restarts it into the same crash;
    the next start serves the model unwarmed and says on which inputs the last one died."""
    path = vad_like(tmp_path / "vad.onnx")
    _needs_the_premise(path)
    cache = tmp_path / "cache" / "m"
    code = f"""
        import os
        from pathlib import Path
        from agent.config import ModelConfig
        from runtime.backends import open_backend
        from runtime.backends.onnx import OnnxBackend

        def crash_on_the_third_size(self, feeds):
            if feeds["input"].shape[1] == 4:
                os.abort()  # dies as a native crash does: no finally, no atexit
            raise RuntimeError("too short")

        OnnxBackend._warm_run = crash_on_the_third_size
        p = {str(path)!r}
        open_backend(p, ModelConfig(name="m", path=p), Path({str(cache)!r}))
        """
    proc = run_python(code)
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    (marker,) = cache.glob("warmup-*.running")

    backend = open_backend(path, cfg(path), cache)
    assert backend.warmup_source is None
    assert backend.warmup_error is not None
    assert "not tried" in backend.warmup_error
    assert "on search input[1, 4], state[2, 1, 128], sr[] (" in backend.warmup_error
    assert str(marker) in backend.warmup_error
    feeds = vad_feeds()
    np.testing.assert_allclose(backend.run(feeds)["output"], run_bare(path, feeds)[0], rtol=1e-6)
    assert marker.exists(), "skipped until the operator clears it or the model file changes"

    marker.unlink()
    backend = open_backend(path, cfg(path), cache)
    assert backend.warmup_error is None and backend.warmup_source == "search"
    assert list(cache.glob("warmup-*.running")) == [], "a finished warm-up leaves no marker"


def test_what_a_warm_up_marker_holds_is_quoted_in_one_bounded_line(tmp_path: Path) -> None:
    """The marker's text goes into a log line and an event: whatever is in the file (written
    by another process, damaged), the warning stays one line of bounded length."""
    path = reshape_15(tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    marker = open_backend(path, cfg(path), cache)._warmup_marker()
    assert marker is not None and not marker.exists()
    marker.write_text("search x[1, 15]\nINJECTED: a second line\n" + "y" * 10_000)
    backend = open_backend(path, cfg(path), cache)
    error = backend.warmup_error
    assert error is not None and "on search x[1, 15] (" in error
    assert "\n" not in error and "INJECTED" not in error and len(error) < 600
