"""``inferctl quantize``: int8 quantization with onnxruntime, and proof that it did no harm.

``--mode static`` calibrates activations on the ``--calibration`` data and writes QDQ int8
(QuantizeLinear/DequantizeLinear pairs, which every execution provider including TensorRT
reads); ``--mode dynamic`` quantizes weights only and computes activation scales at run time
(no calibration needed, but the data is still used for the comparison).

The report compares the float and the quantized model on the data: file size, single-sample
latency, how often the judged output agrees (top class for classifiers) and the output error,
and, when the data has labels ``y``, the metric before and after. The quantized model is only
written when the loss stays within ``--max-drop``:

- classifiers with labels: accuracy lost (0.01 = one point);
- classifiers without labels: share of samples whose top class changed;
- regression with labels: relative RMSE increase (0.05 = 5 % worse);
- other outputs: mean absolute output error relative to the float output's standard deviation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from runtime.backends import Backend
from runtime.errors import OperatorError
from telemetry.payloads import ClassificationQuality, RegressionQuality
from telemetry.quality.scores import interpret, quality_of, task_of
from updater.operator.evaluate import (
    Dataset,
    LatencyReport,
    batch_feeds,
    batch_size,
    load_dataset,
    measure_latency,
    open_model,
    run_rows,
)

log = logging.getLogger(__name__)

Mode = Literal["dynamic", "static"]


class QuantizeReport(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    output: str
    mode: Mode
    written: bool
    samples: int
    size_before_bytes: int
    size_after_bytes: int
    latency_before: LatencyReport | None
    latency_after: LatencyReport | None
    agreement: float | None
    """Share of samples whose predicted class is unchanged (classifier outputs)."""
    max_abs_error: float
    mean_abs_error: float
    metric: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    drop: float
    drop_basis: str
    max_drop: float | None = None


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol (``get_next``) over a dataset in batches."""

    def __init__(self, data: Dataset, batch: int, limit: int) -> None:
        self._batches = self._iterate(data, batch, min(limit, data.size))

    @staticmethod
    def _iterate(data: Dataset, batch: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, limit, batch):
            yield batch_feeds(data, start, batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize_file(
    src: Path, dst: Path, mode: Mode, data: Dataset, batch: int, samples: int, per_channel: bool
) -> None:
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_dynamic,
            quantize_static,
        )
    except ImportError as err:  # onnxruntime.quantization needs the onnx package
        raise OperatorError(
            f"quantization needs onnx ({err.name} is missing): pip install 'inferd[quantize]'"
        ) from err

    pre = dst.with_suffix(".pre.onnx")
    try:
        # shape inference and graph optimisation first, as onnxruntime recommends; some models
        # (custom domains, odd shapes) do not survive it and are quantized as they are
        try:
            # symbolic shape inference needs sympy; without it ONNX shape inference still runs
            symbolic = importlib.util.find_spec("sympy") is not None
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic)
            source = pre
        except Exception as err:  # noqa: BLE001 - any failure here only means "skip it"
            log.warning("%s: pre-processing skipped: %s", src, err)
            source = src
        if mode == "dynamic":
            quantize_dynamic(
                str(source), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel
            )
        else:
            quantize_static(
                str(source),
                str(dst),
                _Calibration(data, batch, samples),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=CalibrationMethod.MinMax,
            )
    except OperatorError:
        raise
    except Exception as err:
        raise OperatorError(f"{src}: onnxruntime quantization failed: {err}") from err
    finally:
        pre.unlink(missing_ok=True)


def _metric(q: ClassificationQuality | RegressionQuality) -> tuple[str, float]:
    if isinstance(q, ClassificationQuality):
        return "accuracy", q.accuracy
    return "rmse", q.rmse


def compare(
    before: np.ndarray, after: np.ndarray, truth: np.ndarray | None
) -> tuple[float | None, str | None, float | None, float | None, float, str]:
    """(agreement, metric, before, after, drop, basis) of two models' output rows."""
    classifier = before.shape[1] > 1 or before.dtype.kind != "f"
    task = task_of(truth) if truth is not None else ("classification" if classifier else None)
    agreement = None
    if task in ("classification", "multilabel"):
        p0, _ = interpret(before, task)
        p1, _ = interpret(after, task)
        same = p0 == p1 if p0.ndim == 1 else np.all(p0 == p1, axis=1)
        agreement = float(np.mean(same))
    if truth is not None and task is not None:
        try:
            q0 = quality_of(task, truth, before)
            q1 = quality_of(task, truth, after)
        except ValueError as err:
            raise OperatorError(f"cannot score the outputs against y: {err}") from err
        name, m0 = _metric(q0)
        _, m1 = _metric(q1)
        if name == "rmse":
            drop = (m1 - m0) / m0 if m0 > 0 else m1
            return agreement, name, m0, m1, drop, "relative RMSE increase"
        return agreement, name, m0, m1, m0 - m1, f"{name} lost"
    if agreement is not None:
        return agreement, None, None, None, 1.0 - agreement, "share of changed top classes"
    spread = float(np.std(before)) or 1.0
    mean_error = float(np.mean(np.abs(after.astype(np.float64) - before)))
    return None, None, None, None, mean_error / spread, "mean abs error / output std"


def quantize(
    path: Path,
    out: Path,
    *,
    mode: Mode,
    calibration: Path,
    data: Path | None = None,
    max_drop: float | None = None,
    per_channel: bool = False,
    calibration_samples: int = 256,
    batch: int = 16,
    latency_runs: int = 50,
) -> QuantizeReport:
    """Quantize ``path`` to ``out`` and compare; ``out`` is written only if the drop is allowed."""
    if path.suffix.lower() != ".onnx":
        raise OperatorError(
            f"{path}: only ONNX models can be quantized (LiteRT: quantize at export)"
        )
    if out.resolve() == path.resolve():
        raise OperatorError(f"{out}: the output must not overwrite the input model")
    float_model = open_model(path, "onnxruntime")
    try:
        return _quantize(
            float_model,
            out,
            mode=mode,
            calibration=calibration,
            data=data,
            max_drop=max_drop,
            per_channel=per_channel,
            calibration_samples=calibration_samples,
            batch=batch,
            latency_runs=latency_runs,
        )
    finally:
        float_model.close()


def _quantize(
    float_model: Backend,
    out: Path,
    *,
    mode: Mode,
    calibration: Path,
    data: Path | None,
    max_drop: float | None,
    per_channel: bool,
    calibration_samples: int,
    batch: int,
    latency_runs: int,
) -> QuantizeReport:
    path = float_model.path
    calib = load_dataset(calibration, float_model, need_truth=False)
    judge = load_dataset(data, float_model, need_truth=False) if data is not None else calib
    b = batch_size(float_model, batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _quantize_file(path, tmp, mode, calib, b, calibration_samples, per_channel)
        quant_model = open_model(tmp, "onnxruntime")
        try:
            before = run_rows(float_model, judge, b)
            after = run_rows(quant_model, judge, b)
            agreement, metric, m0, m1, drop, basis = compare(before, after, judge.truth)
            lat0 = lat1 = None
            if latency_runs > 0:
                lat0 = measure_latency(float_model, judge, latency_runs, b)
                lat1 = measure_latency(quant_model, judge, latency_runs, b)
        finally:
            quant_model.close()
        ok = max_drop is None or drop <= max_drop
        diff = np.abs(after.astype(np.float64) - before.astype(np.float64))
        report = QuantizeReport(
            model=str(path),
            output=str(out),
            mode=mode,
            written=ok,
            samples=judge.size,
            size_before_bytes=path.stat().st_size,
            size_after_bytes=tmp.stat().st_size,
            latency_before=lat0,
            latency_after=lat1,
            agreement=agreement,
            max_abs_error=float(diff.max()),
            mean_abs_error=float(diff.mean()),
            metric=metric,
            metric_before=m0,
            metric_after=m1,
            drop=drop,
            drop_basis=basis,
            max_drop=max_drop,
        )
        if ok:
            os.replace(tmp, out)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def refusal(report: QuantizeReport) -> str:
    """The one-line reason a quantized model was not written."""
    return (
        f"quantized model not written: {report.drop_basis} is {report.drop:.4g}, "
        f"over --max-drop {report.max_drop:g}"
    )


def render_text(report: QuantizeReport) -> str:
    """The report for a terminal."""

    def size(n: int) -> str:
        return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"

    ratio = report.size_after_bytes / report.size_before_bytes
    lines = [
        f"{report.model} -> {report.output} ({report.mode} int8, {report.samples} samples)",
        f"  size       {size(report.size_before_bytes)} -> {size(report.size_after_bytes)}"
        f" ({ratio:.2f}x)",
    ]
    if report.latency_before is not None and report.latency_after is not None:
        a, b = report.latency_before, report.latency_after
        lines.append(
            f"  latency    p50 {a.p50_ms:.4g} -> {b.p50_ms:.4g} ms,"
            f" p99 {a.p99_ms:.4g} -> {b.p99_ms:.4g} ms ({b.p50_ms / a.p50_ms:.2f}x)"
        )
    if report.agreement is not None:
        lines.append(f"  agreement  {report.agreement:.4f} of top classes unchanged")
    lines.append(
        f"  output     max |error| {report.max_abs_error:.4g}, mean {report.mean_abs_error:.4g}"
    )
    if report.metric is not None:
        lines.append(
            f"  {report.metric:<10} {report.metric_before:.4f} -> {report.metric_after:.4f}"
        )
    limit = "" if report.max_drop is None else f" (max {report.max_drop:g})"
    lines.append(f"  drop       {report.drop:.4g} {report.drop_basis}{limit}")
    lines.append("  written" if report.written else "  NOT written")
    return "\n".join(lines) + "\n"
