"""``inferctl collect``: prediction logs and fed-back labels into a dataset for retraining.

Sources, combinable:

- the broker, live: ``{prefix}/{device}/predictions`` (the devices' sampled prediction records),
  ``{prefix}/{device}/cmd/feedback`` (labels sent to devices over MQTT) and
  ``{prefix}/{device}/feedback`` (labels devices received over HTTP). With ``--session``
  the subscription is a persistent session (MQTT 5, or ``clean_session`` false on a 3.1.1-only
  broker), so the broker queues what arrives between two runs (up to its
  ``max_queued_messages``) and a nightly ``collect`` misses nothing;
- replay files: what ``mosquitto_sub -v -t 'inferd/#'`` printed (``topic payload`` lines), or
  JSON lines ``{"topic": ..., "payload": {...}}``.

Records are joined to labels by device, model and request id, de-duplicated (MQTT delivers
at least once) and filtered by ``--since``/``--until`` on the record's time.

Output in ``--out DIR``: ``dataset.jsonl`` (one line per prediction row: ids, time, output
summary, input tensors when the device logged them, label) or ``{model}.npz`` per model (input
arrays named like the model's inputs, ``y``, and ``request_id``/``version``/``device``/``ts``
columns); the npz form needs the input tensors, which a device only logs for models with
``log_tensors: true``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from runtime.errors import MqttError, OperatorError
from runtime.tensors import NUMPY_DTYPES
from telemetry.broker import BrokerOptions, connect
from telemetry.payloads import (
    FeedbackItem,
    FeedbackLog,
    PredictionBatch,
    PredictionRecord,
    TensorDump,
)
from telemetry.quality.feedback import FeedbackError, command_items, parse_command, to_label

log = logging.getLogger(__name__)

Format = Literal["jsonl", "npz"]
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SESSION_EXPIRY_S = 7 * 86400


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """RFC 3339 (``2025-05-01T12:00:00Z``) or an age (``30m``, ``12h``, ``7d``) as UTC."""
    m = _RELATIVE.match(text.strip())
    if m is not None:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(seconds=float(m[1]) * _UNITS[m[2]])
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OperatorError(
            f"time {text!r} must be RFC 3339 (2025-05-01T12:00:00Z) or an age (30m, 12h, 7d)"
        ) from None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


@dataclass
class _Entry:
    device: str
    record: PredictionRecord


@dataclass
class Collector:
    """Accumulates prediction records and labels from MQTT messages and joins them."""

    prefix: str = "inferd"
    since: datetime | None = None
    until: datetime | None = None
    models: frozenset[str] = frozenset()
    records: dict[tuple[str, str, str], _Entry] = field(default_factory=dict)
    labels: dict[tuple[str, str, str], FeedbackItem] = field(default_factory=dict)
    duplicates: int = 0
    skipped: int = 0
    """Messages that were not ours, malformed, or outside the time range."""
    _single_model: dict[str, str] = field(default_factory=dict)

    def add(self, topic: str, payload: bytes) -> None:
        """Take one message (any topic; foreign ones are counted as skipped)."""
        parts = topic.split("/")
        if len(parts) < 3 or topic[: len(self.prefix) + 1] != f"{self.prefix}/":
            self.skipped += 1
            return
        rest = topic[len(self.prefix) + 1 :].split("/")
        device = rest[0]
        try:
            if rest[1:] == ["predictions"]:
                self._add_predictions(device, payload)
            elif rest[1:] == ["cmd", "feedback"]:
                self._add_feedback(device, payload)
            elif rest[1:] == ["feedback"]:
                log_ = msgspec.json.decode(payload, type=FeedbackLog)
                for item in log_.items:
                    self.labels[(device, log_.model, item.id)] = item
            else:
                self.skipped += 1
        except (msgspec.DecodeError, msgspec.ValidationError, FeedbackError) as err:
            self.skipped += 1
            log.warning("collect: skipping a message on %s: %s", topic, err)

    def _add_predictions(self, device: str, payload: bytes) -> None:
        batch = msgspec.json.decode(payload, type=PredictionBatch)
        for record in batch.records:
            if record.error is not None or (self.models and record.model not in self.models):
                continue
            ts = record.ts if record.ts.tzinfo else record.ts.replace(tzinfo=timezone.utc)
            if (self.since and ts < self.since) or (self.until and ts > self.until):
                self.skipped += 1
                continue
            key = (device, record.model, record.request_id)
            if key in self.records:
                self.duplicates += 1
            self.records[key] = _Entry(device, record)
            self._single_model.setdefault(device, record.model)

    def _add_feedback(self, device: str, payload: bytes) -> None:
        cmd = parse_command(msgspec.json.decode(payload))
        model = cmd.model or self._single_model.get(device)
        if model is None:
            raise FeedbackError("feedback without a model name, and no prediction seen yet")
        for item in command_items(cmd):
            self.labels[(device, model, item.id)] = item

    def joined(self, labelled_only: bool = False) -> Iterator[tuple[_Entry, FeedbackItem | None]]:
        """Every kept record with its label (or None), oldest first."""
        for key, entry in sorted(self.records.items(), key=lambda kv: kv[1].record.ts):
            label = self.labels.get(key)
            if label is None and labelled_only:
                continue
            yield entry, label

    @property
    def unmatched_labels(self) -> int:
        return sum(1 for key in self.labels if key not in self.records)


def replay_lines(lines: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) from ``mosquitto_sub -v`` output or ``{"topic", "payload"}`` JSON lines."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                yield str(obj["topic"]), json.dumps(obj["payload"]).encode()
            except (ValueError, KeyError, TypeError) as err:
                log.warning("collect: skipping a replay line: %s", err)
            continue
        topic, _, payload = line.partition(" ")
        yield topic, payload.encode()


def subscribe(
    collector: Collector,
    opts: BrokerOptions,
    *,
    devices: Iterable[str] = (),
    duration_s: float | None = None,
    max_records: int | None = None,
    session: str | None = None,
    ready: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Feed live broker messages into ``collector`` until the duration, count or ``stop``.

    The connection is the operator tools' (:func:`telemetry.broker.connect`): the first node of
    ``opts`` that answers, the next one after a loss, and MQTT 3.1.1 with a broker that refuses
    MQTT 5 (there a ``session`` is a ``clean_session`` false one). ``ready`` is called once the
    broker has acknowledged every subscription.
    """
    stop = stop or threading.Event()
    lock = threading.Lock()
    failure: list[str] = []
    opts = dataclasses.replace(
        opts,
        client_id=session or opts.client_id,
        session_expiry_s=SESSION_EXPIRY_S if session else 0,
    )
    who = list(devices) or ["+"]
    leaves = ("predictions", "cmd/feedback", "feedback")
    filters = [f"{collector.prefix}/{d}/{leaf}" for d in who for leaf in leaves]
    acked = [0]

    def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any = None) -> None:
        if any(code.is_failure for code in codes):
            failure.append(f"broker refused the subscription: {', '.join(map(str, codes))}")
            stop.set()
            return
        acked[0] += 1
        if acked[0] == len(filters) and ready is not None:
            ready()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with lock:
            collector.add(msg.topic, msg.payload)
            if max_records is not None and len(collector.records) >= max_records:
                stop.set()

    try:
        client = connect(
            opts,
            subscriptions=[(f, 1) for f in filters],
            on_message=on_message,
            on_subscribe=on_subscribe,
        )
    except MqttError as err:
        nodes = ", ".join(opts.at(node).where for node in opts.nodes)
        raise OperatorError(f"cannot connect to {nodes}: {err}") from err
    try:
        stop.wait(duration_s)
    finally:
        client.disconnect()
        client.loop_stop()
    if failure:
        raise OperatorError(failure[0])


# -- writing ---------------------------------------------------------------------------------


def _tensor(dump: TensorDump) -> np.ndarray:
    # devices log numpy dtype names ("float32"); v2 names ("FP32") are accepted as well
    name = NUMPY_DTYPES.get(dump.datatype, dump.datatype)
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise ValueError(f"datatype {dump.datatype} cannot go into an npz") from None
    if dtype.kind not in "biuf":
        raise ValueError(f"datatype {dump.datatype} cannot go into an npz")
    return np.asarray(dump.data, dtype=dtype).reshape(dump.shape)


def _label_json(item: FeedbackItem | None) -> dict[str, Any] | None:
    if item is None:
        return None
    out = msgspec.to_builtins(item)
    out.pop("id", None)
    return {k: v for k, v in out.items() if v is not None}


def write_jsonl(collector: Collector, out: Path, labelled_only: bool) -> int:
    """``out/dataset.jsonl``; returns the number of lines."""
    n = 0
    enc = msgspec.json.Encoder()
    with (out / "dataset.jsonl").open("wb") as f:
        for entry, label in collector.joined(labelled_only):
            r = entry.record
            line: dict[str, Any] = {
                "device": entry.device,
                "model": r.model,
                "version": r.version,
                "request_id": r.request_id,
                "ts": r.ts,
                "latency_ms": r.latency_ms,
                "input_digest": r.input_digest,
                "outputs": r.outputs,
                "inputs": r.inputs_tensors,
                "label": _label_json(label),
            }
            f.write(enc.encode(line) + b"\n")
            n += 1
    return n


@dataclass
class _Columns:
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    y: list[Any] = field(default_factory=list)
    meta: dict[str, list[Any]] = field(
        default_factory=lambda: {"request_id": [], "version": [], "device": [], "ts": []}
    )
    kind: str | None = None


def write_npz(collector: Collector, out: Path, labelled_only: bool) -> dict[str, int]:
    """``out/{model}.npz`` per model; returns rows written per model."""
    columns: dict[str, _Columns] = {}
    missing = 0
    for entry, item in collector.joined(labelled_only):
        r = entry.record
        if not r.inputs_tensors:
            missing += 1
            continue
        try:
            arrays = {k: _tensor(v) for k, v in r.inputs_tensors.items()}
            label = to_label(item) if item is not None else None
        except (ValueError, FeedbackError) as err:
            log.warning("collect: %s %s skipped: %s", r.model, r.request_id, err)
            continue
        rows = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if len(rows) != 1 or (label is not None and len(label.rows) not in rows):
            log.warning("collect: %s %s skipped: batch sizes disagree", r.model, r.request_id)
            continue
        n = rows.pop()
        col = columns.setdefault(r.model, _Columns())
        if label is not None:
            if col.kind not in (None, label.kind):
                log.warning("collect: %s %s skipped: mixed label kinds", r.model, r.request_id)
                continue
            col.kind = label.kind
        for name, a in arrays.items():
            col.inputs.setdefault(name, []).append(a.reshape(n, *a.shape[1:]) if a.ndim else a)
        col.y.extend(label.rows if label is not None else [None] * n)
        meta = (r.request_id, r.version, entry.device, r.ts.timestamp())
        for key, value in zip(col.meta, meta, strict=True):
            col.meta[key].extend([value] * n)
    if missing:
        log.warning(
            "collect: %d record(s) carry no input tensors (set log_tensors: true on the model)",
            missing,
        )
    written = {}
    for model, col in columns.items():
        try:
            arrays = {k: np.concatenate(v) for k, v in col.inputs.items()}
        except ValueError as err:
            raise OperatorError(f"{model}: input shapes differ between records: {err}") from err
        arrays["y"] = _y(col)
        arrays.update({k: np.asarray(v) for k, v in col.meta.items()})
        np.savez(out / f"{model}.npz", **arrays)  # type: ignore[arg-type]
        written[model] = len(col.y)
    return written


def _y(col: _Columns) -> np.ndarray:
    """Labels as an array; -1 (classes) or NaN (values) where a row has none."""
    if col.kind == "value":
        return np.array([np.nan if v is None else v for v in col.y], dtype=np.float32)
    if col.kind == "multilabel":
        width = 1 + max((max(r) for r in col.y if r), default=0)
        y = np.zeros((len(col.y), width), dtype=np.int8)
        for i, classes in enumerate(col.y):
            if classes is None:
                y[i] = -1
            else:
                y[i, list(classes)] = 1
        return y
    return np.array([-1 if v is None else v for v in col.y], dtype=np.int64)


def write(collector: Collector, out: Path, fmt: Format, labelled_only: bool) -> dict[str, int]:
    """Write the dataset; returns rows per file name."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OperatorError(f"{out}: cannot create the output folder: {err.strerror}") from err
    if fmt == "jsonl":
        return {"dataset.jsonl": write_jsonl(collector, out, labelled_only)}
    return {f"{m}.npz": n for m, n in write_npz(collector, out, labelled_only).items()}
