"""``inferctl evaluate``, ``quantize`` and ``collect``: the model lifecycle around publishing.

The loop they close: a device reports quality -> ``collect`` gathers prediction logs and labels
-> retrain -> ``evaluate`` gates the new model -> ``quantize`` shrinks it -> ``model add`` and
``push``. Implementations are imported when a command runs, so ``inferctl --help`` stays fast
and ``quantize`` pulls in onnx only when used.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from updater.inferctl.broker import add_broker_args, broker_from_args

EXIT_BELOW = 3
"""Exit code when evaluation misses a threshold or quantization loses too much."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="model file (.onnx or .tflite)")
    p.add_argument("--runtime", choices=("onnxruntime", "tflite"), help="default: by suffix")
    p.add_argument("--batch", type=int, default=32, help="batch size where the model allows")
    p.add_argument(
        "--latency-runs", type=int, default=100, help="single-sample runs timed (0: skip)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def register(sub: Any) -> None:
    """Add the lifecycle commands to inferctl's subparsers."""
    ev = sub.add_parser(
        "evaluate",
        help="quality and latency of a model on labelled data, with thresholds for CI",
        description=(
            "Run MODEL over labelled data and report accuracy, precision, recall, F1, ROC-AUC "
            "and confusion (classification), or MAE/RMSE (regression), plus latency. "
            f"Exit code 0 when every threshold holds, {EXIT_BELOW} when one does not."
        ),
    )
    _add_common(ev)
    ev.add_argument(
        "--data",
        type=Path,
        required=True,
        help="npz: one array per model input (or 'x') and the truth in 'y'",
    )
    ev.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="e.g. accuracy=0.9, f1_macro>=0.8, rmse<=0.3, latency_p99_ms<=20 (repeatable)",
    )
    ev.add_argument(
        "--task",
        choices=("classification", "multilabel", "regression"),
        help="default: from the dtype and shape of y",
    )
    ev.add_argument("--labels", help="class names in index order, comma-separated")
    ev.add_argument(
        "--reference-out",
        type=Path,
        metavar="FILE",
        help="also write drift reference statistics of the inputs and outputs on this data",
    )
    ev.set_defaults(func=_cmd_evaluate)

    qz = sub.add_parser(
        "quantize",
        help="int8-quantize an ONNX model and report size, latency and accuracy before/after",
        description=(
            "Quantize MODEL with onnxruntime (static: QDQ int8 calibrated on the data; dynamic: "
            "int8 weights) and compare it with the float model on the data. OUT is written only "
            f"when the loss is within --max-drop; otherwise exit code {EXIT_BELOW}."
        ),
    )
    _add_common(qz)
    qz.set_defaults(batch=16, latency_runs=50)
    qz.add_argument("--mode", choices=("dynamic", "static"), default="static")
    qz.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="npz of representative inputs (labels in 'y' optional)",
    )
    qz.add_argument("--data", type=Path, help="npz to compare on (default: the calibration data)")
    qz.add_argument(
        "--max-drop",
        type=float,
        help="largest accepted loss: accuracy points with labels (0.01 = 1 point), else the "
        "share of changed top classes; regression: relative RMSE increase",
    )
    qz.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    qz.add_argument("--calibration-samples", type=int, default=256)
    qz.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    qz.set_defaults(func=_cmd_quantize)
    _add_collect(sub)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from telemetry.quality.drift import compute_reference
    from updater.operator.evaluate import (
        evaluate,
        inputs_and_outputs,
        label_names_arg,
        parse_threshold,
        render_text,
        to_json,
    )

    thresholds = [parse_threshold(t) for t in args.threshold]
    report = evaluate(
        args.model,
        args.data,
        runtime=args.runtime,
        task=args.task,
        label_names=label_names_arg(args.labels),
        thresholds=thresholds,
        batch=args.batch,
        latency_runs=args.latency_runs,
    )
    if args.reference_out is not None:
        tensors = inputs_and_outputs(args.model, args.data, args.runtime, args.batch)
        args.reference_out.write_bytes(compute_reference(tensors).to_json())
    if args.json:
        sys.stdout.write(to_json(report).decode() + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0 if report.passed else EXIT_BELOW


def _cmd_quantize(args: argparse.Namespace) -> int:
    import msgspec

    from updater.operator.quantize import quantize, refusal, render_text

    report = quantize(
        args.model,
        args.output,
        mode=args.mode,
        calibration=args.calibration,
        data=args.data,
        max_drop=args.max_drop,
        per_channel=args.per_channel,
        calibration_samples=args.calibration_samples,
        batch=args.batch,
        latency_runs=args.latency_runs,
    )
    if args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        sys.stdout.write(render_text(report))
    if not report.written:
        sys.stderr.write(f"inferctl: {refusal(report)}\n")
        return EXIT_BELOW
    return 0


def _add_collect(sub: Any) -> None:
    co = sub.add_parser(
        "collect",
        help="gather prediction logs and labels from the broker into a retraining dataset",
        description=(
            "Subscribe to the devices' prediction logs and cmd/feedback labels (or replay "
            "captured messages), join them by request id and write a dataset: dataset.jsonl, "
            "or MODEL.npz with the logged input tensors and y."
        ),
    )
    add_broker_args(co, default=None)  # without --broker: only --replay
    co.add_argument("--device", action="append", default=[], help="only these devices")
    co.add_argument("--model", action="append", default=[], help="only these models")
    co.add_argument("--since", help="keep records from this time: RFC 3339 or an age (12h, 7d)")
    co.add_argument("--until", help="keep records up to this time")
    co.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    co.add_argument("--count", type=int, metavar="N", help="stop after N prediction records")
    co.add_argument(
        "--session",
        metavar="NAME",
        help="persistent session under this client id: the broker keeps messages between runs",
    )
    co.add_argument(
        "--replay",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="captured messages: `mosquitto_sub -v` output or {topic, payload} JSON lines",
    )
    co.add_argument("--format", choices=("jsonl", "npz"), default="jsonl")
    co.add_argument("--labelled-only", action="store_true", help="drop records without a label")
    co.add_argument("--out", type=Path, required=True, metavar="DIR")
    co.set_defaults(func=_cmd_collect)


def _cmd_collect(args: argparse.Namespace) -> int:
    from runtime.errors import OperatorError
    from updater.operator.collect import Collector, parse_time, replay_lines, subscribe, write

    if args.broker is None and not args.replay:
        raise OperatorError("give --broker HOST:PORT to subscribe, or --replay FILE")
    if args.broker is not None and args.duration is None and args.count is None:
        sys.stderr.write("collecting until interrupted (Ctrl-C), then writing\n")
    collector = Collector(
        prefix=args.prefix,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        models=frozenset(args.model),
    )
    for path in args.replay:
        try:
            with path.open(encoding="utf-8") as f:
                for topic, payload in replay_lines(f):
                    collector.add(topic, payload)
        except OSError as err:
            raise OperatorError(f"{path}: cannot read: {err.strerror}") from err
    if args.broker is not None:
        opts = broker_from_args(args, "inferctl-collect")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: write what was collected
            subscribe(
                collector,
                opts,
                devices=args.device,
                duration_s=args.duration,
                max_records=args.count,
                session=args.session,
            )
    written = write(collector, args.out, args.format, args.labelled_only)
    labelled = sum(1 for _, label in collector.joined(True))
    sys.stdout.write(
        f"{len(collector.records)} prediction records, {labelled} labelled, "
        f"{collector.unmatched_labels} labels without a record, "
        f"{collector.duplicates} duplicates\n"
    )
    for name, rows in written.items():
        sys.stdout.write(f"  {args.out / name}: {rows} rows\n")
    return 0
