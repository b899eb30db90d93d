"""Dynamic batching (agent/batching.py) through ModelSlot.predict, on real ONNX models.

Where time matters the batchers run on a fake clock that only the test moves: a batch whose
window has not passed on that clock cannot run, so "not yet" is a fact, not a race. Readiness
is awaited on the batcher's own counters (``forming``, ``batches``), never slept for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.batching import Batcher
from agent.config import ModelConfig, parse_config
from agent.slots import LoadedModel, ModelSlot, Prediction
from runtime.errors import BackendError, ConfigError, InputError
from telemetry.metrics import MetricsCollector
from telemetry.prediction_log import PredictionLogger
from tests.support import models
from tests.support.waits import wait_until

WINDOW_US = 1000


class FakeClock:
    """Monotonic ns that move only when the test says; counts the batching thread's reads."""

    def __init__(self) -> None:
        self.now = 1_000_000
        self.batcher_reads = 0

    def __call__(self) -> int:
        if threading.current_thread().name.startswith("inferd-batch-"):
            self.batcher_reads += 1
        return self.now

    def advance(self, us: int, batcher: Batcher) -> None:
        """Move the clock and wait until the batching thread has looked at it twice since
        (so it has decided, on the new time, at least once)."""
        self.now += us * 1000
        seen = self.batcher_reads
        batcher.wake()
        assert wait_until(lambda: self.batcher_reads >= seen + 2 or batcher.forming == 0)


def two_outputs(path: Path) -> Path:
    """x [N, M] float32 -> y = Relu(x), z = Neg(x), both [N, M]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", "M"]),
        ],
    )
    return models.save(graph, path)


def row_lookup(path: Path) -> Path:
    """idx [N] int64 -> y = table[idx] [N] float32 over a 4-entry table: an index over 3 in any
    row is onnxruntime's own out-of-range error for the whole run."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "row_lookup",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(np.arange(4, dtype=np.float32) * 10, "table")],
    )
    return models.save(graph, path)


def first_row(path: Path) -> Path:
    """x [N, 4] -> its first row, [1, 4], declared [R, 4]: it looks batchable, but gives one
    row whatever N is (a model whose rows are not independent)."""
    starts, ends, axes = ([0], [1], [0])
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["first"])],
        "first_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("first", TensorProto.FLOAT, ["R", 4])],
        initializer=[
            numpy_helper.from_array(np.array(v, dtype=np.int64), n)
            for n, v in (("starts", starts), ("ends", ends), ("axes", axes))
        ],
    )
    return models.save(graph, path)


def serving(
    path: Path,
    clock: Callable[[], int] | None = None,
    version: str = "1",
    max_batch: int = 8,
    window_us: int = WINDOW_US,
) -> ModelSlot:
    slot = ModelSlot(
        ModelConfig(name="m", path=str(path), max_batch=max_batch, batch_window_us=window_us)
    )
    if clock is not None:
        slot.batch_clock = clock
    slot.swap(slot.load(path, version))
    return slot


def batcher_of(slot: ModelSlot) -> Batcher:
    batcher = slot.current.batcher
    assert batcher is not None
    return batcher


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(16) as executor:
        yield executor


def unbatched(path: Path) -> ModelSlot:
    slot = ModelSlot(ModelConfig(name="m", path=str(path)))
    slot.swap(slot.load(path, "1"))
    assert slot.current.batcher is None
    return slot


def test_batched_results_equal_unbatched_row_for_row(tmp_path: Path, pool) -> None:
    """Requests of 1, 2, 3 and 2 rows fill a batch of 8: one run, each caller its own rows."""
    path = models.classifier(tmp_path / "c.onnx", n_features=16, n_classes=5)
    clock = FakeClock()  # never moves: only a full batch can run
    slot = serving(path, clock)
    plain = unbatched(path)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(rows, 16)).astype(np.float32) for rows in (1, 2, 3, 2)]
    batcher = batcher_of(slot)
    futures = []
    for i, x in enumerate(xs):
        futures.append(pool.submit(slot.predict, {"x": x}, None, f"req-{i}"))
        assert wait_until(lambda n=i + 1: batcher.forming == n or batcher.batches == 1)
    results = [f.result(timeout=10) for f in futures]
    assert batcher.batches == 1 and slot.current.backend.stats.runs == 1
    for i, (x, (outputs, model, rid)) in enumerate(zip(xs, results, strict=True)):
        assert rid == f"req-{i}" and model.version == "1"
        assert outputs["probs"].shape == (x.shape[0], 5)
        want = plain.predict({"x": x})[0]["probs"]
        np.testing.assert_allclose(outputs["probs"], want, rtol=1e-6, atol=1e-7)
    slot.close()
    plain.close()


def test_each_request_keeps_its_id_latency_metrics_and_prediction_record(
    tmp_path: Path, pool
) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    clock = FakeClock()
    slot = serving(path, clock, max_batch=3)
    heard: list[Prediction] = []
    metrics = MetricsCollector()
    slot.listeners += [heard.append, metrics.listener]
    batcher = batcher_of(slot)
    xs = [np.full((1, 4), i, np.float32) for i in range(3)]
    futures = []
    for i, x in enumerate(xs):
        futures.append(pool.submit(slot.predict, {"x": x}, None, f"id-{i}"))
        assert wait_until(lambda n=i + 1: batcher.forming == n or batcher.batches == 1)
        if i < 2:
            clock.now += 100_000  # the next request joins 100 us later
    outputs = [f.result(timeout=10)[0] for f in futures]

    assert sorted(p.request_id for p in heard) == ["id-0", "id-1", "id-2"]
    by_id = {p.request_id: p for p in heard}
    for i, x in enumerate(xs):
        p = by_id[f"id-{i}"]
        np.testing.assert_array_equal(p.feeds["x"], x)  # its own input, not the batch's
        assert p.outputs is not None
        np.testing.assert_array_equal(p.outputs["probs"], outputs[i]["probs"])
        assert p.error is None
    # queue wait + run, on the fake clock: the first request waited for the other two
    latencies = [by_id[f"id-{i}"].latency_ns for i in range(3)]
    assert latencies == [200_000, 100_000, 0]
    assert metrics.take(1.0)["m"].count == 3
    assert slot.current.backend.stats.runs == 1
    records = PredictionLogger("dev", lambda *_: None).records(heard)
    plain = unbatched(path)
    for rec in records:
        i = int(rec.request_id.split("-")[1])
        alone = PredictionLogger("dev", lambda *_: None).record(
            Prediction("m", "1", "x", 0.0, 0, {"x": xs[i]}, plain.predict({"x": xs[i]})[0])
        )
        assert rec.input_digest == alone.input_digest
        assert rec.outputs == alone.outputs
    slot.close()
    plain.close()


def test_the_window_is_respected_on_the_clock(tmp_path: Path, pool) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    clock = FakeClock()
    slot = serving(path, clock, max_batch=4)
    batcher = batcher_of(slot)
    x = np.ones((1, 4), np.float32)
    first = pool.submit(slot.predict, {"x": x})
    assert wait_until(lambda: batcher.forming == 1)
    clock.now += 400_000
    second = pool.submit(slot.predict, {"x": x})
    assert wait_until(lambda: batcher.forming == 2)
    clock.advance(WINDOW_US - 400 - 1, batcher)  # 1 us short of the first one's window
    assert not first.done() and not second.done() and batcher.batches == 0
    clock.advance(1, batcher)
    first.result(timeout=10)
    second.result(timeout=10)
    assert batcher.batches == 1
    slot.close()


def test_a_full_batch_runs_at_once_and_zero_window_does_not_wait(tmp_path: Path, pool) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    clock = FakeClock()
    slot = serving(path, clock, max_batch=2)
    batcher = batcher_of(slot)
    x = np.ones((2, 4), np.float32)
    slot.predict({"x": x})  # two rows fill the batch: no window, the clock never moved
    slot.predict({"x": np.ones((5, 4), np.float32)})  # over max_batch: runs alone
    assert batcher.batches == 2
    slot.close()
    slot = serving(path, clock, window_us=0)
    slot.predict({"x": x})
    assert batcher_of(slot).batches == 1
    slot.close()


def test_mixed_shapes_dtypes_and_outputs_are_not_merged(tmp_path: Path, pool) -> None:
    path = two_outputs(tmp_path / "two.onnx")
    clock = FakeClock()
    slot = serving(path, clock)
    batcher = batcher_of(slot)
    a = np.arange(4, dtype=np.float32).reshape(1, 4) - 2
    b = np.arange(5, dtype=np.float32).reshape(1, 5) - 2
    calls = [
        ({"x": a}, None),
        ({"x": b}, None),  # other width: its own batch
        ({"x": a * 2}, ["y"]),  # other outputs asked for: its own batch
        ({"x": a * 3}, None),  # joins the first
    ]
    futures = []
    for n, (feeds, names) in enumerate(calls, 1):
        futures.append(pool.submit(slot.predict, feeds, names))
        assert wait_until(lambda n=n: batcher.queued + batcher.forming == n)
    assert wait_until(lambda: batcher.forming == 2)  # a and a * 3; b and the y-only one wait
    assert batcher.queued == 2
    clock.advance(WINDOW_US, batcher)
    results = [f.result(timeout=10)[0] for f in futures]
    assert batcher.batches == 3
    for (feeds, names), out in zip(calls, results, strict=True):
        x = feeds["x"]
        assert sorted(out) == (names or ["y", "z"])
        np.testing.assert_array_equal(out["y"], np.maximum(x, 0))
        if "z" in out:
            np.testing.assert_array_equal(out["z"], -x)
    slot.close()


def test_a_bad_input_is_refused_before_it_joins_a_batch(tmp_path: Path, pool) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    clock = FakeClock()
    slot = serving(path, clock)
    heard: list[Prediction] = []
    slot.listeners.append(heard.append)
    batcher = batcher_of(slot)
    good = pool.submit(slot.predict, {"x": np.ones((1, 4), np.float32)})
    assert wait_until(lambda: batcher.forming == 1)
    with pytest.raises(InputError, match=r"input 'x' has shape \[1, 5\], the model expects"):
        slot.predict({"x": np.ones((1, 5), np.float32)})
    with pytest.raises(InputError, match="has datatype FP64"):
        slot.predict({"x": np.ones((1, 4), np.float64)})
    with pytest.raises(InputError, match="unknown output 'nope'"):
        slot.predict({"x": np.ones((1, 4), np.float32)}, ["nope"])
    assert batcher.forming == 1 and batcher.queued == 0
    clock.advance(WINDOW_US, batcher)
    good.result(timeout=10)
    assert len(heard) == 1 and heard[0].error is None
    assert slot.current.backend.stats.runs == 1
    slot.close()


def test_a_run_error_fails_that_batch_with_the_runtime_error_and_no_other(
    tmp_path: Path, pool
) -> None:
    path = row_lookup(tmp_path / "lookup.onnx")
    plain = unbatched(path)
    with pytest.raises(BackendError) as alone:
        plain.predict({"idx": np.array([9], np.int64)})
    plain.close()
    clock = FakeClock()
    slot = serving(path, clock)
    heard: list[Prediction] = []
    slot.listeners.append(heard.append)
    batcher = batcher_of(slot)
    ok = pool.submit(slot.predict, {"idx": np.array([1, 2], np.int64)}, None, "ok")
    assert wait_until(lambda: batcher.forming == 1)
    bad = pool.submit(slot.predict, {"idx": np.array([9], np.int64)}, None, "bad")
    assert wait_until(lambda: batcher.forming == 2)
    clock.advance(WINDOW_US, batcher)
    errors = []
    for future in (ok, bad):
        with pytest.raises(BackendError) as failed:
            future.result(timeout=10)
        errors.append(failed.value)
    assert errors[0] is not errors[1], "each request raises its own exception"
    assert {str(e) for e in errors} == {str(alone.value)}, "the runtime's own message"
    assert [e.latency_ns for e in errors] == [WINDOW_US * 1000, WINDOW_US * 1000]
    assert sorted((p.request_id, p.error) for p in heard) == [
        ("bad", str(alone.value)),
        ("ok", str(alone.value)),
    ]
    # the next batch is not touched by the last one's failure
    later = pool.submit(slot.predict, {"idx": np.array([3], np.int64)})
    assert wait_until(lambda: batcher.forming == 1)
    clock.advance(WINDOW_US, batcher)
    np.testing.assert_array_equal(later.result(timeout=10)[0]["y"], [30.0])
    stats = slot.current.backend.stats
    assert (stats.runs, stats.errors) == (2, 1)
    slot.close()


def test_swap_during_batching_finishes_queued_requests_on_their_model(tmp_path: Path, pool) -> None:
    old_path = models.classifier(tmp_path / "v1.onnx", seed=0)
    new_path = models.classifier(tmp_path / "v2.onnx", seed=1)
    clock = FakeClock()  # the window never passes: only the swap can release the queue
    slot = serving(old_path, clock, version="1")
    old = slot.current
    old_batcher = batcher_of(slot)
    xs = [np.full((1, 4), i, np.float32) for i in range(3)]
    queued = []
    for i, x in enumerate(xs):
        queued.append(pool.submit(slot.predict, {"x": x}, None, f"q{i}"))
        assert wait_until(lambda n=i + 1: old_batcher.forming == n)
    new = slot.load(new_path, "2")
    assert slot.swap(new) is old
    results = [f.result(timeout=10) for f in queued]
    want_old = unbatched(old_path)
    for x, (out, model, _rid) in zip(xs, results, strict=True):
        assert model is old and model.version == "1"
        np.testing.assert_allclose(out["probs"], want_old.predict({"x": x})[0]["probs"], 1e-6)
    want_old.close()
    assert wait_until(lambda: not old_batcher.alive)
    assert old._closed, "the old model closed once its queue was done"
    x = np.ones((1, 4), np.float32)
    after = pool.submit(slot.predict, {"x": x})
    new_batcher = batcher_of(slot)
    assert wait_until(lambda: new_batcher.forming == 1)
    clock.advance(WINDOW_US, new_batcher)
    assert after.result(timeout=10)[1].version == "2"
    slot.close()
    assert not new_batcher.alive


def test_swaps_under_concurrent_load_lose_no_request(tmp_path: Path, pool) -> None:
    """Real clock: 8 threads keep predicting while the slot swaps back and forth; every answer
    is right for the version that served it."""
    paths = [models.classifier(tmp_path / f"v{s}.onnx", seed=s) for s in (0, 1)]
    refs = [unbatched(p) for p in paths]
    slot = serving(paths[0], version="0", window_us=300)
    stop = threading.Event()
    x = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)
    want = [r.predict({"x": x})[0]["probs"] for r in refs]

    def client() -> int:
        served = 0
        while not stop.is_set():
            out, model, _ = slot.predict({"x": x})
            np.testing.assert_allclose(out["probs"], want[int(model.version)], 1e-6)
            served += 1
        return served

    futures: list[Future[int]] = [pool.submit(client) for _ in range(8)]
    batchers = [batcher_of(slot)]
    for i in range(1, 7):
        slot.swap(slot.load(paths[i % 2], str(i % 2)))
        batchers.append(batcher_of(slot))
        assert wait_until(lambda b=batchers[-1]: b.batches >= 3)
    stop.set()
    assert sum(f.result(timeout=30) for f in futures) > 0
    slot.close()
    for r in refs:
        r.close()
    assert not any(b.alive for b in batchers), "every batching thread was joined"


def test_close_drains_the_queue_and_leaves_no_thread(tmp_path: Path, pool) -> None:
    """What SIGTERM does to a slot: queued requests run (without waiting out the window)."""
    path = models.classifier(tmp_path / "c.onnx")
    clock = FakeClock()
    slot = serving(path, clock)
    batcher = batcher_of(slot)
    queued = []
    for i in range(3):
        queued.append(pool.submit(slot.predict, {"x": np.ones((1, 4), np.float32)}))
        assert wait_until(lambda n=i + 1: batcher.forming == n)
    slot.close()
    assert all(f.result(timeout=10)[0]["probs"].shape == (1, 3) for f in queued)
    assert not batcher.alive
    assert not [t for t in threading.enumerate() if t.name.startswith("inferd-batch-")]


def test_a_request_arriving_as_the_model_retires_runs_alone(tmp_path: Path) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    slot = serving(path, FakeClock())
    model = slot.current
    batcher = batcher_of(slot)
    assert model.acquire()  # a request that holds the model but has not queued yet
    slot.close()
    assert not batcher.alive
    out, _ = batcher.submit({"x": np.ones((1, 4), np.float32)})
    assert out["probs"].shape == (1, 3)
    model.release()
    assert model._closed


def test_a_model_that_mixes_rows_is_served_request_by_request(
    tmp_path: Path, pool, caplog: pytest.LogCaptureFixture
) -> None:
    path = first_row(tmp_path / "first.onnx")
    clock = FakeClock()
    slot = serving(path, clock)
    batcher = batcher_of(slot)
    xs = [np.arange(8, dtype=np.float32).reshape(2, 4) + 10 * i for i in range(2)]
    futures = []
    for i, x in enumerate(xs):
        futures.append(pool.submit(slot.predict, {"x": x}))
        assert wait_until(lambda n=i + 1: batcher.forming == n)
    clock.advance(WINDOW_US, batcher)
    for x, f in zip(xs, futures, strict=True):
        np.testing.assert_array_equal(f.result(timeout=10)[0]["first"], x[:1])
    assert "batching turned off: output 'first' of a 4-row batch does not have 4" in caplog.text
    slot.predict({"x": xs[0]})  # from now on alone, without waiting for a window
    assert batcher.forming == 0
    slot.close()


def test_batching_is_refused_for_a_model_without_a_batch_axis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, str]] = []
    path = models.multi_io(tmp_path / "multi.onnx")
    slot = ModelSlot(ModelConfig(name="m", path=str(path), max_batch=8))
    slot.emit_event = lambda kind, message, **_: events.append((kind, message))
    slot.swap(slot.load(path, "1"))
    assert slot.current.batcher is None
    why = "batching refused: input 'k' has no dynamic first dimension (shape [])"
    assert why in caplog.text and "serves unbatched" in caplog.text
    assert events == [("batching-refused", f"m 1: {why}; the model serves unbatched")]
    a = np.ones((2, 3), np.float32)
    out = slot.predict({"a": a, "b": a, "k": np.array(3, np.int64)})[0]
    np.testing.assert_array_equal(out["scaled"], a * 3)
    slot.close()
    fixed = models.stateful(tmp_path / "stateful.onnx")
    slot = serving(fixed)
    assert slot.current.batcher is None
    assert "input 'x' has no dynamic first dimension (shape [1, 4])" in caplog.text
    slot.close()


def test_batching_is_off_by_default_and_at_max_batch_1(tmp_path: Path) -> None:
    path = models.classifier(tmp_path / "c.onnx")
    for extra in ({}, {"max_batch": 1}, {"max_batch": 0, "batch_window_us": 500}):
        slot = ModelSlot(ModelConfig(name="m", path=str(path), **extra))
        slot.swap(slot.load(path, "1"))
        assert slot.current.batcher is None
        slot.close()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_batch", -1, r"Expected `int` >= 0 - at `\$.models\[0\].max_batch`"),
        ("batch_window_us", -5, r"Expected `int` >= 0 - at `\$.models\[0\].batch_window_us`"),
        ("batch_window_us", 2_000_000, r"<= 1000000 - at `\$.models\[0\].batch_window_us`"),
    ],
)
def test_bad_batching_config_names_the_field(key: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [{"name": "m", "path": "m.onnx", key: value}]}, environ={})


def test_loaded_model_without_batcher_is_unchanged(tmp_path: Path) -> None:
    """The unbatched path still takes the slot's run tokens and one run per request."""
    path = models.classifier(tmp_path / "c.onnx")
    slot = unbatched(path)
    model: LoadedModel = slot.current
    for _ in range(3):
        slot.predict({"x": np.ones((1, 4), np.float32)})
    assert model.backend.stats.runs == 3
    slot.close()


def test_a_tflite_model_batches_too(tmp_path: Path, pool, tflite_factory) -> None:
    """LiteRT resizes its input to each batch's rows; the rows come back as when run alone."""
    path = tflite_factory("classifier")
    clock = FakeClock()
    slot = serving(path, clock, max_batch=3)
    assert slot.config.runtime == "tflite"
    plain = unbatched(path)
    batcher = batcher_of(slot)
    xs = [np.full((1, 4), i / 4, np.float32) for i in range(2)] + [np.ones((1, 4), np.float32)]
    futures = []
    for n, x in enumerate(xs, 1):
        futures.append(pool.submit(slot.predict, {"x": x}))
        assert wait_until(lambda n=n: batcher.waiting == n or batcher.batches == 1)
    for x, f in zip(xs, futures, strict=True):
        want = plain.predict({"x": x})[0]["probs"]
        np.testing.assert_allclose(f.result(timeout=10)[0]["probs"], want, rtol=1e-6)
    assert batcher.batches == 1
    slot.close()
    plain.close()


def add_inputs(path: Path) -> Path:
    """a [N, 3] + b [N, 3] float32 -> y [N, 3]: two inputs sharing one batch axis."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    return models.save(graph, path)


def test_several_inputs_stack_together_and_disagreeing_rows_run_alone(tmp_path: Path, pool) -> None:
    path = add_inputs(tmp_path / "add.onnx")
    plain = unbatched(path)
    rng = np.random.default_rng(5)
    # the runtime broadcasts a's one row over b's two: valid alone, unsplittable in a batch
    uneven = {"a": np.ones((1, 3), np.float32), "b": np.full((2, 3), 2, np.float32)}
    alone = plain.predict(uneven)[0]["y"]
    clock = FakeClock()
    slot = serving(path, clock)
    batcher = batcher_of(slot)
    feeds = [
        {"a": rng.normal(size=(n, 3)).astype(np.float32), "b": rng.normal(size=(n, 3))}
        for n in (2, 1)
    ]
    feeds = [{k: v.astype(np.float32) for k, v in f.items()} for f in feeds]
    futures = [pool.submit(slot.predict, feeds[0])]
    assert wait_until(lambda: batcher.forming == 1)
    odd = pool.submit(slot.predict, uneven)  # rows disagree: a batch of its own
    futures.append(pool.submit(slot.predict, feeds[1]))
    assert wait_until(lambda: batcher.forming == 2 and batcher.queued == 1)
    clock.advance(WINDOW_US, batcher)
    for f, fut in zip(feeds, futures, strict=True):
        np.testing.assert_array_equal(fut.result(timeout=10)[0]["y"], f["a"] + f["b"])
    np.testing.assert_array_equal(odd.result(timeout=10)[0]["y"], alone)
    assert batcher.batches == 2
    slot.close()
    plain.close()
