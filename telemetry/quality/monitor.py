"""The quality monitor: hears every prediction, joins fed-back labels, tracks drift, publishes.

It is a slot listener and a daemon component. The listener only queues the prediction (the
request path pays for one ``put_nowait``); a named worker thread interprets outputs, updates
drift and the label join, and publishes one :class:`QualityPayload` per model version every
``publish_interval_s``. Feedback calls are served at once, under the same lock, from whichever
thread receives them (HTTP or MQTT).

Outputs are read by :func:`~telemetry.quality.scores.output_rows` and
:func:`~telemetry.quality.scores.interpret`
(the same code ``inferctl evaluate`` uses), with the task taken from the kind of label fed back.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec
import numpy as np

from runtime.errors import InferdError
from telemetry.config import QualityConfig
from telemetry.payloads import (
    ClassificationQuality,
    DriftQuality,
    EventSink,
    FeedbackCounts,
    FeedbackItem,
    QualityPayload,
    RegressionQuality,
    Task,
)
from telemetry.prediction import Prediction, tensor_bytes
from telemetry.quality.drift import DriftError, DriftTracker, ReferenceStats
from telemetry.quality.feedback import FeedbackError, JoinWindow, Label, parse_feedback, to_label
from telemetry.quality.scores import interpret, output_rows
from telemetry.quality.window import QualityWindow, Sample

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Predictions the worker takes from its queue at once: about 0.3 ms of work here. A thread
that computes keeps the GIL until another has waited the 5 ms switch interval, so a batch of
1024 stalled every request of the daemon for 2-4 ms every 50 ms under load."""
BATCH_PAUSE_S = 0.05
"""How long the worker lets predictions gather after a partial batch."""
GIL_PAUSE_S = 0.0002
"""How long the worker sleeps after a full batch, so request threads waiting for the GIL get it
(a sleep of zero gives it back before a waiting thread has woken up)."""
MAX_ROW_VALUES = 4096
"""Predictions whose output row is bigger than this (masks, embeddings) are not held for labels."""
QUEUE_BYTES = 32 * 1024 * 1024
"""Bytes of tensors (feeds and outputs) waiting for the worker; beyond it predictions are skipped
(counted as evicted). A queue bounded only by count held 10,000 requests' tensors."""


PublishQuality = Callable[[QualityPayload], None]
"""Sends one quality payload (the agent routes it to ``{prefix}/{device}/quality``)."""
ReferenceLoader = Callable[[str, str], "ReferenceStats | None"]
"""(model, version) -> the reference statistics shipped with that version, if any."""


@dataclass(frozen=True, slots=True)
class _Held:
    """A prediction waiting for its label: the interpreted output rows."""

    version: str
    ts: float
    rows: np.ndarray  # [batch, values]


_TASKS: dict[str, Task] = {
    "value": "regression",
    "multilabel": "multilabel",
    "class": "classification",
}


def _rows(outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    rows = output_rows(outputs)
    if rows is None or rows.shape[0] == 0 or rows.shape[1] > MAX_ROW_VALUES:
        return None  # an empty batch has nothing a label could fit
    return rows


def _held_bytes(value: _Held | Label) -> int:
    """Bytes a held prediction or early label takes in the join window."""
    if isinstance(value, _Held):
        # the view of a row-major output keeps its whole base array alive
        base = value.rows.base if isinstance(value.rows.base, np.ndarray) else value.rows
        return int(max(base.nbytes, value.rows.nbytes)) + len(value.version) + 160
    # tuples of Python ints or floats (or tuples of tuples for multi-label): ~40 bytes a value
    values = sum(len(r) if isinstance(r, tuple) else 1 for r in value.rows)
    return 56 + 8 * len(value.rows) + 40 * values


def _samples(held: _Held, label: Label) -> tuple[Task, list[Sample]]:
    """Pair each output row with its truth; FeedbackError when the label does not fit."""
    rows = held.rows
    if len(label.rows) != rows.shape[0]:
        raise FeedbackError(
            f"label has {len(label.rows)} row(s), the prediction has {rows.shape[0]}"
        )
    task = _TASKS[label.kind]
    try:
        predicted, scores = interpret(rows, task)
    except ValueError as err:
        raise FeedbackError(str(err)) from err
    truths: list[Any] = list(label.rows)
    if task == "multilabel":
        width = rows.shape[1]
        truths = []
        for classes in label.rows:
            if any(c >= width for c in classes):
                raise FeedbackError(f"label index out of range for {width} model outputs")
            truth = np.zeros(width, dtype=np.int8)
            truth[list(classes)] = 1
            truths.append(truth)
    samples = [
        Sample(
            held.ts,
            truths[i],
            predicted[i] if task == "multilabel" else predicted[i].item(),
            None if scores is None else scores[i],
        )
        for i in range(rows.shape[0])
    ]
    return task, samples


def _observe_drift(tracker: DriftTracker, group: list[Prediction]) -> DriftQuality | None:
    """Feed a group of predictions to the tracker, concatenated along the batch axis."""
    tensors: dict[str, list[np.ndarray]] = {}
    for p in group:
        for name, array in itertools.chain(p.feeds.items(), (p.outputs or {}).items()):
            if name in tracker.tensors:
                tensors.setdefault(name, []).append(np.asarray(array))
    try:
        joined = {k: np.concatenate(v) for k, v in tensors.items()}
    except ValueError:  # shapes differ beyond the batch axis: one request at a time
        report = None
        for p in group:
            report = tracker.observe({**p.feeds, **(p.outputs or {})}) or report
        return report
    return tracker.observe(joined)


class _ModelState:
    """Everything the monitor keeps for one model slot."""

    def __init__(self, settings: QualityConfig, labels: Sequence[str], clock: Callable[[], float]):
        self.labels = tuple(labels)
        self.join: JoinWindow[_Held, Label] = JoinWindow(
            settings.join_window_s,
            settings.join_max_pending,
            clock,
            max_bytes=settings.join_max_bytes,
            sizeof=_held_bytes,
        )
        self.windows: dict[tuple[str, Task], QualityWindow] = {}
        self.drift: dict[str, DriftTracker] = {}
        self.drifted: dict[str, bool] = {}
        self.versions: dict[str, None] = {}  # ordered set of versions seen
        self.dropped = 0


class QualityMonitor:
    """Rolling quality and drift for every model slot; a daemon component with start()/stop()."""

    def __init__(
        self,
        settings: QualityConfig,
        device_id: str,
        publish: PublishQuality,
        *,
        emit_event: EventSink | None = None,
        references: ReferenceLoader | None = None,
        labels: Mapping[str, Sequence[str]] | None = None,
        queue_size: int = 10_000,
        queue_bytes: int = QUEUE_BYTES,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.device_id = device_id
        self.publish = publish
        self.emit_event = emit_event
        self._loader = references
        self._labels = dict(labels or {})
        self._clock = clock
        self._monotonic = monotonic
        # A C SimpleQueue bounded here by count and bytes: queue.Queue's put (a Python
        # Condition) was half of this listener's 2.8 us on the request path.
        self._queue: queue.SimpleQueue[tuple[Prediction, int] | None] = queue.SimpleQueue()
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._queue_lock = threading.Lock()
        self._lock = threading.Lock()
        self._models: dict[str, _ModelState] = {}
        self._references: dict[tuple[str, str], ReferenceStats | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- inputs --------------------------------------------------------------------------

    def listener(self, prediction: Prediction) -> None:
        """Slot listener: queue the prediction for the worker; never blocks the request."""
        if prediction.error is not None or prediction.outputs is None:
            return
        size = tensor_bytes(prediction)
        q = self._queue
        with self._queue_lock:
            if self._queued_bytes + size <= self.queue_bytes and q.qsize() < self.queue_size:
                self._queued_bytes += size
                q.put((prediction, size))
                return
        with self._lock:
            self._state(prediction.model).dropped += 1

    def set_reference(self, model: str, version: str, reference: ReferenceStats | None) -> None:
        """Use ``reference`` for drift of ``model`` at ``version`` (None: no drift tracking)."""
        with self._lock:
            self._references[(model, version)] = reference
            state = self._models.get(model)
            if state is not None:
                state.drift.pop(version, None)

    def feedback(self, model: str, body: bytes) -> dict[str, Any]:
        """Handle a feedback body for ``model``; FeedbackError (nothing applied) when it is bad."""
        items = parse_feedback(body)
        return self.feedback_items(model, items)

    def feedback_items(self, model: str, items: Sequence[FeedbackItem]) -> dict[str, Any]:
        """Join already-decoded feedback items; returns per-id status and totals."""
        with self._lock:
            state = self._state(model)
            labels = [to_label(item, state.labels) for item in items]  # all or nothing
            results = []
            for item, label in zip(items, labels, strict=True):
                status, pair = state.join.add_label(item.id, label)
                entry: dict[str, Any] = {"id": item.id, "status": status}
                if pair is not None:
                    error = self._score(model, state, *pair)
                    if error is not None:
                        entry = {"id": item.id, "status": "invalid", "error": error}
                results.append(entry)
        counts: dict[str, int] = {}
        for r in results:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return {"model": model, "received": len(items), **counts, "results": results}

    # -- the worker ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inferd-quality", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish queued predictions, publish once more, end the worker thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=10.0)
        self._thread = None

    def _run(self) -> None:
        interval = self.settings.publish_interval_s
        deadline = self._monotonic() + interval
        while True:
            timeout = max(0.0, deadline - self._monotonic())
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = None
            if first is not None:
                # take what else is queued and bin it in one numpy pass, then let the queue fill
                # again for a moment: waking per prediction would make this thread compete with
                # the request threads for the GIL on every request
                batch = [self._taken(first), *self._take(MAX_BATCH - 1)]
                self._process(batch)
                self._stop.wait(BATCH_PAUSE_S if len(batch) < MAX_BATCH else GIL_PAUSE_S)
            if self._stop.is_set() and self._queue.empty():
                break
            if self._monotonic() >= deadline:
                self._publish_all()
                deadline = self._monotonic() + interval
        self._publish_all()

    def _taken(self, item: tuple[Prediction, int]) -> Prediction:
        with self._queue_lock:
            self._queued_bytes -= item[1]
        return item[0]

    def _take(self, limit: int) -> list[Prediction]:
        items: list[Prediction] = []
        while len(items) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                items.append(self._taken(item))
        return items

    def drain(self) -> None:
        """Process every queued prediction now (tests and shutdown; the worker does it live)."""
        while batch := self._take(MAX_BATCH):
            self._process(batch)

    def _process(self, predictions: list[Prediction]) -> None:
        groups: dict[tuple[str, str], list[Prediction]] = {}
        for p in predictions:
            groups.setdefault((p.model, p.version), []).append(p)
        for (model, version), group in groups.items():
            try:
                self._observe(model, version, group)
            except Exception:
                log.exception("quality: cannot process predictions of %s", model)

    def _observe(self, model: str, version: str, group: list[Prediction]) -> None:
        with self._lock:
            state = self._state(model)
            state.versions.pop(version, None)
            state.versions[version] = None  # last in order: the version served most recently
            tracker = self._tracker(state, model, version)
            report = None
            if tracker is not None:
                try:
                    report = _observe_drift(tracker, group)
                except DriftError as err:
                    log.warning("%s %s: drift tracking off: %s", model, version, err)
                    self._references[(model, version)] = None
                    state.drift.pop(version, None)
            for p in group:
                rows = _rows(p.outputs or {})
                if rows is None:
                    continue
                pair = state.join.add_prediction(p.request_id, _Held(version, p.ts, rows))
                if pair is not None:
                    self._score(model, state, *pair)
            changed = report is not None and report.drifted != state.drifted.get(version, False)
            if report is not None:
                state.drifted[version] = report.drifted
        if changed and report is not None:
            self._drift_event(model, version, report)

    def _drift_event(self, model: str, version: str, report: DriftQuality) -> None:
        if report.drifted:
            worst = report.features[0]
            log.warning(
                "%s %s: input drift, PSI %.3f on %s[%d] over %d samples",
                model,
                version,
                report.psi_max,
                worst.tensor,
                worst.index,
                report.samples,
            )
            message = (
                f"drift: PSI {report.psi_max:.3f} > {report.threshold} on "
                f"{worst.tensor}[{worst.index}] over the last {report.samples} samples"
            )
        else:
            log.info("%s %s: drift ended, PSI %.3f", model, version, report.psi_max)
            message = f"drift ended: PSI {report.psi_max:.3f} <= {report.threshold}"
        if self.emit_event is None:
            return
        try:
            self.emit_event(
                "drift" if report.drifted else "drift-ended",
                message,
                level="warning" if report.drifted else "info",
                model=model,
                version=version,
                **msgspec.to_builtins(report),
            )
        except Exception:
            log.exception("quality: cannot publish the drift event of %s", model)

    def _tracker(self, state: _ModelState, model: str, version: str) -> DriftTracker | None:
        tracker = state.drift.get(version)
        if tracker is None:
            key = (model, version)
            if key not in self._references:
                self._references[key] = self._load_reference(model, version)
            reference = self._references[key]
            if reference is None:
                return None
            s = self.settings
            tracker = DriftTracker(reference, s.drift_window, s.drift_psi_threshold)
            state.drift[version] = tracker
        return tracker

    def _load_reference(self, model: str, version: str) -> ReferenceStats | None:
        if self._loader is None:
            return None
        try:
            reference = self._loader(model, version)
        except InferdError as err:
            log.warning(
                "%s %s: no drift tracking, reference stats unusable: %s", model, version, err
            )
            return None
        if reference is not None:
            log.info("%s %s: tracking drift against reference statistics", model, version)
        return reference

    def _state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = _ModelState(self.settings, self._labels.get(model, ()), self._monotonic)
            self._models[model] = state
        return state

    def _score(self, model: str, state: _ModelState, held: _Held, label: Label) -> str | None:
        """Add a joined pair to its window; the reason when it does not fit, else None."""
        try:
            task, samples = _samples(held, label)
        except FeedbackError as err:
            state.join.counts.invalid += 1
            log.debug("%s: feedback does not fit the prediction: %s", model, err)
            return str(err)
        key = (held.version, task)
        window = state.windows.get(key)
        if window is None:
            s = self.settings
            window = QualityWindow(task, s.window_count, s.window_s, self._clock)
            state.windows[key] = window
        for sample in samples:
            window.add(sample)
        return None

    # -- output --------------------------------------------------------------------------

    def payloads(self) -> list[QualityPayload]:
        """The current quality of every model version that has labels or drift to report."""
        s = self.settings
        ts = datetime.fromtimestamp(self._clock(), tz=timezone.utc)
        out = []
        with self._lock:
            for model, state in self._models.items():
                state.join.expire()
                c = state.join.counts
                counts = FeedbackCounts(
                    matched=c.matched,
                    unmatched=c.late + c.unknown + c.duplicate + c.invalid,
                    late=c.late,
                    unknown=c.unknown,
                    duplicate=c.duplicate,
                    invalid=c.invalid,
                    expired_predictions=c.expired_predictions,
                    evicted_predictions=c.evicted_predictions + state.dropped,
                    pending_predictions=state.join.pending_predictions,
                    pending_labels=state.join.pending_labels,
                )
                for version in state.versions:
                    tracker = state.drift.get(version)
                    drift = tracker.last if tracker is not None else None
                    reported = False
                    for (v, task), window in state.windows.items():
                        if v != version:
                            continue
                        metrics = window.compute(state.labels, s.max_classes)
                        if metrics is None:
                            continue
                        out.append(
                            QualityPayload(
                                ts=ts,
                                device=self.device_id,
                                model=model,
                                version=version,
                                task=task,
                                samples=len(window),
                                window_count=s.window_count,
                                window_s=s.window_s,
                                classification=(
                                    metrics if isinstance(metrics, ClassificationQuality) else None
                                ),
                                regression=(
                                    metrics if isinstance(metrics, RegressionQuality) else None
                                ),
                                drift=drift,
                                feedback=counts,
                            )
                        )
                        reported = True
                    # drift alone is only news for the version being served now
                    latest = version == next(reversed(state.versions))
                    if not reported and drift is not None and latest:
                        out.append(
                            QualityPayload(
                                ts=ts,
                                device=self.device_id,
                                model=model,
                                version=version,
                                task=None,
                                samples=0,
                                window_count=s.window_count,
                                window_s=s.window_s,
                                drift=drift,
                                feedback=counts,
                            )
                        )
        return out

    def _publish_all(self) -> None:
        for payload in self.payloads():
            try:
                self.publish(payload)
            except Exception:
                log.exception("quality: cannot publish for %s", payload.model)
