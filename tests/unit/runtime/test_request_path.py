"""One check and one timer per request (issue 12.5): the backend checks feeds and output names
before the run and times it once; the slot's listeners, the run counters and the observer all
see that one figure, for runs that succeed and runs that fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.slots import ModelSlot, Prediction
from runtime.backends import open_backend
from runtime.errors import BackendError, InputError
from tests.support.models import vad_feeds, vad_like


def test_requests_get_one_clear_input_error_before_the_run(tmp_path: Path) -> None:
    """The messages a client sees (HTTP and MQTT answer them as 400s); nothing is counted."""
    path = vad_like(tmp_path / "vad.onnx")
    backend = open_backend(path, ModelConfig(name="m", path=str(path)))
    feeds = vad_feeds()
    with pytest.raises(InputError, match=r"input 'sr' has datatype INT32, the model expects INT64"):
        backend.run({**feeds, "sr": np.array(16000, np.int32)})
    with pytest.raises(InputError, match=r"'state' has shape \[2, 1, 64\], the model expects"):
        backend.run({**feeds, "state": np.zeros((2, 1, 64), np.float32)})
    with pytest.raises(InputError, match="missing input 'sr'"):
        backend.run({k: v for k, v in feeds.items() if k != "sr"})
    with pytest.raises(InputError, match="unknown input 'extra'"):
        backend.run({**feeds, "extra": feeds["sr"]})
    with pytest.raises(InputError, match="unknown output 'p'; the model gives output, stateN"):
        backend.run(feeds, ["p"])
    assert backend.stats.runs == 0
    out, latency_ns = backend.run_timed(feeds, ["stateN"])
    assert list(out) == ["stateN"] and latency_ns > 0
    assert (backend.stats.runs, backend.stats.total_ns) == (1, latency_ns)


def test_listeners_counters_and_observer_share_one_timing(model_factory) -> None:
    path = model_factory("failing")
    slot = ModelSlot(ModelConfig(name="m", path=str(path)))
    slot.swap(slot.load(path, "1"))
    heard: list[Prediction] = []
    observed: list[tuple[int, bool]] = []
    slot.listeners.append(heard.append)
    backend = slot.current.backend
    backend.observer = lambda ns, ok: observed.append((ns, ok))

    _out, _model, rid = slot.predict({"x": np.zeros((1, 4), np.float32)})
    with pytest.raises(BackendError) as failed:
        slot.predict({"x": np.ones((1, 4), np.float32)}, request_id="bad-1")
    with pytest.raises(InputError):
        slot.predict({"x": np.ones((2, 4), np.float32)})  # never reaches the runtime

    assert [(p.request_id, p.error is None) for p in heard] == [(rid, True), ("bad-1", False)]
    assert [p.latency_ns for p in heard] == [ns for ns, _ in observed]
    assert [ok for _, ok in observed] == [True, False]
    assert heard[1].latency_ns == failed.value.latency_ns
    assert (backend.stats.runs, backend.stats.errors) == (2, 1)
    assert backend.stats.total_ns == sum(p.latency_ns for p in heard)
    assert len(rid) == 32 and int(rid, 16) >= 0, "a generated id looks like a uuid4 hex"
    slot.close()
