"""``inferctl evaluate``: a model's quality and latency on labelled data, held to thresholds.

The data is an ``.npz`` file: one array per model input, named like the input (a single-input
model also takes ``x``), and the truth in ``y`` -- class indices ``[N]`` (classification),
a 0/1 matrix ``[N, L]`` (multi-label) or float values ``[N]`` (regression). Metrics come from
:mod:`telemetry.quality.scores`, so they are the very numbers a device reports on ``quality``.

CI gates a publish on the exit code: 0 when every ``--threshold`` holds, 3 when one does not
(:data:`updater.inferctl.lifecycle.EXIT_BELOW`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from runtime.backends import REGISTRY, Backend, open_backend, runtime_for
from runtime.errors import InferdError, OperatorError
from runtime.options import RuntimeOptions
from telemetry.payloads import ClassificationQuality, RegressionQuality, Task
from telemetry.quality.scores import output_rows, quality_of, task_of

LOWER_IS_BETTER = ("mae", "rmse", "latency_")
_THRESHOLD = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|=)\s*([-+0-9.eE]+)\s*$")


class LatencyReport(msgspec.Struct, frozen=True, kw_only=True):
    """Single-sample latency on this machine, and batched throughput."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    batch: int
    throughput_per_s: float


class ThresholdResult(msgspec.Struct, frozen=True, kw_only=True):
    metric: str
    op: str
    limit: float
    value: float | None
    ok: bool


class EvaluationReport(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    runtime: str
    samples: int
    task: Task
    classification: ClassificationQuality | None = None
    regression: RegressionQuality | None = None
    latency: LatencyReport | None = None
    metrics: dict[str, float | None]
    """Every scalar metric by the name ``--threshold`` uses."""
    thresholds: list[ThresholdResult] = []
    passed: bool = True


@dataclass(frozen=True)
class Dataset:
    """Model inputs (batch axis first) and, when given, the truth."""

    inputs: dict[str, np.ndarray]
    truth: np.ndarray | None
    size: int


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    limit: float

    def check(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value >= self.limit if self.op == ">=" else value <= self.limit


def parse_threshold(text: str) -> Threshold:
    """``accuracy=0.9`` (in the metric's good direction), ``f1_macro>=0.8``, ``mae<=0.3``."""
    m = _THRESHOLD.match(text)
    if m is None:
        raise OperatorError(f"threshold {text!r} must look like accuracy=0.9 or latency_p99_ms<=20")
    metric, op, raw = m.groups()
    try:
        limit = float(raw)
    except ValueError:
        raise OperatorError(f"threshold {text!r}: {raw!r} is not a number") from None
    if op == "=":
        op = "<=" if metric.startswith(LOWER_IS_BETTER) else ">="
    return Threshold(metric, op, limit)


def open_model(path: Path, runtime: str | None = None) -> Backend:
    """Load a model as a device does: the same backend with a model slot's default options.

    ``evaluate``, ``quantize`` and ``model add`` (which computes the golden outputs devices
    then check) so time and run exactly what devices run. OperatorError with one line.
    """
    name = runtime or runtime_for(path)
    if name is None:
        raise OperatorError(f"{path}: cannot tell the runtime from the suffix; pass --runtime")
    if name not in REGISTRY:
        raise OperatorError(f"unknown runtime {name!r}; known: {', '.join(REGISTRY)}")
    options = msgspec.convert({"runtime": name, "name": path.name}, RuntimeOptions)
    try:
        return open_backend(path, options)
    except InferdError as err:
        raise OperatorError(str(err)) from err


def run_model(model: Backend, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs for ``feeds``; OperatorError when the model rejects them."""
    return run_model_timed(model, feeds)[0]


def run_model_timed(
    model: Backend, feeds: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
    """(outputs, latency in ns) as a device measures it; OperatorError on failure."""
    try:
        return model.run_timed(feeds)
    except InferdError as err:
        raise OperatorError(f"{model.path}: the model rejects these inputs: {err}") from err


def load_dataset(path: Path, model: Backend, need_truth: bool = True) -> Dataset:
    """Read an ``.npz`` and match its arrays to the model's inputs (cast to their dtypes)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise OperatorError(f"{path}: cannot read the data: {err}") from err
    specs = model.inputs
    inputs = {}
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None and len(specs) == 1:
            array = arrays.get("x")
        if array is None:
            raise OperatorError(
                f"{path}: no array named {spec.name!r} for the model input "
                f"(arrays: {', '.join(sorted(arrays))})"
            )
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    sizes = {a.shape[0] if a.ndim else 1 for a in inputs.values()}
    truth = arrays.get("y")
    if truth is not None:
        sizes.add(truth.shape[0])
    elif need_truth:
        raise OperatorError(f"{path}: no labels; put the truth in an array named 'y'")
    if len(sizes) != 1:
        raise OperatorError(f"{path}: arrays disagree on the number of samples: {sorted(sizes)}")
    return Dataset(inputs, truth, sizes.pop())


def batch_size(model: Backend, wanted: int) -> int:
    """``wanted`` when every input has a dynamic batch axis, else the fixed one (usually 1)."""
    fixed = {s.shape[0] for s in model.inputs if s.shape and s.shape[0] is not None}
    if not fixed:
        return max(1, wanted)
    return fixed.pop() if len(fixed) == 1 else 1


def batch_feeds(data: Dataset, start: int, batch: int) -> dict[str, np.ndarray]:
    """Samples ``start:start+batch``, padded with the last sample to a full (fixed) batch."""
    feeds = {}
    for name, array in data.inputs.items():
        part = array[start : start + batch]
        if part.shape[0] < batch:
            pad = np.repeat(part[-1:], batch - part.shape[0], axis=0)
            part = np.concatenate([part, pad])
        feeds[name] = part
    return feeds


def run_outputs(model: Backend, data: Dataset, batch: int) -> dict[str, np.ndarray]:
    """Every output of the model over the whole dataset, batch axis first."""
    outs: dict[str, list[np.ndarray]] = {}
    for start in range(0, data.size, batch):
        keep = min(batch, data.size - start)
        for name, array in run_model(model, batch_feeds(data, start, batch)).items():
            a = np.asarray(array)
            outs.setdefault(name, []).append(a[:keep] if a.ndim else a.reshape(1))
    return {k: np.concatenate(v) for k, v in outs.items()}


def run_rows(model: Backend, data: Dataset, batch: int) -> np.ndarray:
    """The output rows (:func:`telemetry.quality.scores.output_rows`) of every sample."""
    rows = output_rows(run_outputs(model, data, batch))
    if rows is None:
        raise OperatorError(f"{model.path}: no numeric output to evaluate")
    return rows


def measure_latency(model: Backend, data: Dataset, runs: int, batch: int) -> LatencyReport:
    """Time ``runs`` single requests (after warm-up) and one pass over the data in batches.

    A request's latency is the backend's own timing of its run, the figure a device reports.
    """
    one = batch_size(model, 1)
    samples = [batch_feeds(data, i * one, one) for i in range(max(1, min(runs, data.size // one)))]
    for feeds in samples[:3]:
        run_model(model, feeds)
    times = [run_model_timed(model, samples[i % len(samples)])[1] / 1e6 for i in range(runs)]
    t = np.array(times)
    start = time.perf_counter_ns()
    run_outputs(model, data, batch)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    return LatencyReport(
        runs=runs,
        p50_ms=float(np.percentile(t, 50)),
        p90_ms=float(np.percentile(t, 90)),
        p99_ms=float(np.percentile(t, 99)),
        mean_ms=float(t.mean()),
        max_ms=float(t.max()),
        batch=batch,
        throughput_per_s=data.size / elapsed if elapsed > 0 else 0.0,
    )


def flat_metrics(
    quality: ClassificationQuality | RegressionQuality | None, latency: LatencyReport | None
) -> dict[str, float | None]:
    """Scalar metrics by threshold name."""
    out: dict[str, float | None] = {}
    if isinstance(quality, ClassificationQuality):
        out.update(
            accuracy=quality.accuracy,
            precision_macro=quality.precision_macro,
            recall_macro=quality.recall_macro,
            f1_macro=quality.f1_macro,
            roc_auc=quality.roc_auc,
        )
    elif isinstance(quality, RegressionQuality):
        out.update(mae=quality.mae, rmse=quality.rmse, bias=quality.bias)
    if latency is not None:
        out.update(
            latency_p50_ms=latency.p50_ms,
            latency_p90_ms=latency.p90_ms,
            latency_p99_ms=latency.p99_ms,
            latency_mean_ms=latency.mean_ms,
            throughput_per_s=latency.throughput_per_s,
        )
    return out


def evaluate(
    path: Path,
    data_path: Path,
    *,
    runtime: str | None = None,
    task: Task | None = None,
    label_names: Sequence[str] = (),
    thresholds: Sequence[Threshold] = (),
    batch: int = 32,
    latency_runs: int = 100,
    max_classes: int = 50,
) -> EvaluationReport:
    """Run the model over the labelled data; metrics, latency and threshold results."""
    model = open_model(path, runtime)
    try:
        return _evaluate(
            model,
            data_path,
            task=task,
            label_names=label_names,
            thresholds=thresholds,
            batch=batch,
            latency_runs=latency_runs,
            max_classes=max_classes,
        )
    finally:
        model.close()


def _evaluate(
    model: Backend,
    data_path: Path,
    *,
    task: Task | None,
    label_names: Sequence[str],
    thresholds: Sequence[Threshold],
    batch: int,
    latency_runs: int,
    max_classes: int,
) -> EvaluationReport:
    path = model.path
    data = load_dataset(data_path, model)
    assert data.truth is not None
    task = task or task_of(data.truth)
    b = batch_size(model, batch)
    rows = run_rows(model, data, b)
    try:
        quality = quality_of(
            task, data.truth, rows, label_names=label_names, max_classes=max_classes
        )
    except ValueError as err:
        raise OperatorError(f"{path}: cannot score the outputs as {task}: {err}") from err
    latency = measure_latency(model, data, latency_runs, b) if latency_runs > 0 else None
    metrics = flat_metrics(quality, latency)
    results = []
    for th in thresholds:
        if th.metric not in metrics:
            raise OperatorError(
                f"threshold on {th.metric!r}: no such metric for a {task} model; "
                f"known: {', '.join(metrics)}"
            )
        value = metrics[th.metric]
        results.append(
            ThresholdResult(
                metric=th.metric, op=th.op, limit=th.limit, value=value, ok=th.check(value)
            )
        )
    return EvaluationReport(
        model=str(path),
        runtime=model.runtime,
        samples=data.size,
        task=task,
        classification=quality if isinstance(quality, ClassificationQuality) else None,
        regression=quality if isinstance(quality, RegressionQuality) else None,
        latency=latency,
        metrics=metrics,
        thresholds=results,
        passed=all(r.ok for r in results),
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def render_text(report: EvaluationReport) -> str:
    """The report for a terminal."""
    lines = [f"{report.model} ({report.runtime}): {report.task}, {report.samples} samples"]
    width = max(len(k) for k in report.metrics) if report.metrics else 0
    lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in report.metrics.items()]
    q = report.classification
    if q is not None and q.per_class:
        head = ("support", "precision", "recall", "f1", "roc_auc")
        lines.append(f"  {'class':<12} " + " ".join(f"{h:>9}" for h in head))
        lines += [
            f"  {c.label[:12]:<12} {c.support:>9} {c.precision:>9.3f} {c.recall:>9.3f}"
            f" {c.f1:>9.3f} {_fmt(c.roc_auc):>9}"
            for c in q.per_class
        ]
    if q is not None and q.confusion is not None and q.labels is not None:
        lines.append("  confusion (rows: true, columns: predicted):")
        cell = 2 + max(5, *(len(label) for label in q.labels))
        lines.append("  " + " " * cell + "".join(f"{lb:>{cell}}" for lb in q.labels))
        lines += [
            "  " + f"{q.labels[i]:>{cell}}" + "".join(f"{n:>{cell}}" for n in row)
            for i, row in enumerate(q.confusion)
        ]
    for r in report.thresholds:
        verdict = "ok" if r.ok else "FAILED"
        lines.append(f"  threshold {r.metric} {r.op} {r.limit:g}: {_fmt(r.value)} {verdict}")
    return "\n".join(lines) + "\n"


def to_json(report: EvaluationReport) -> bytes:
    return msgspec.json.encode(report)


def label_names_arg(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",")) if text else ()


def inputs_and_outputs(
    path: Path, data_path: Path, runtime: str | None, batch: int
) -> Mapping[str, np.ndarray]:
    """The data's inputs and the model's outputs on them, by tensor name."""
    model = open_model(path, runtime)
    try:
        data = load_dataset(data_path, model, need_truth=False)
        b = batch_size(model, batch)
        return {**data.inputs, **run_outputs(model, data, b)}
    finally:
        model.close()
