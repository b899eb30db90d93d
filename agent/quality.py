"""The quality monitor inside the daemon: a listener on every slot, ground truth over HTTP
(``POST /v2/models/{name}/feedback``) and MQTT (``cmd/feedback``), drift references found next
to whichever model version a slot serves, payloads out on ``quality`` and ``events``.

Reference statistics for drift (made by ``inferctl evaluate --reference-out`` or
:func:`telemetry.quality.drift.compute_reference`) travel with the model as its bundle says
(:func:`runtime.bundle.reference_path`): ``<model>.ref.json`` beside a configured model file
(``demo.onnx`` -> ``demo.ref.json``), or the ``reference.json`` an update ships in its signed
metadata, staged beside the installed model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from agent.config import Config
from agent.slots import ModelSlot
from runtime import bundle
from runtime.errors import InputError, ModelNotFoundError, NotReadyError, SpoolError
from telemetry.payloads import FeedbackLog, QualityPayload
from telemetry.prometheus import Family, render
from telemetry.quality.drift import ReferenceStats, load_reference
from telemetry.quality.feedback import FeedbackError, command_items, parse_command, parse_feedback
from telemetry.quality.monitor import QualityMonitor
from telemetry.spool import Kind, SpoolFullError

if TYPE_CHECKING:
    from agent.mqtt.link import CommandHandler

log = logging.getLogger(__name__)


class QualityLink(Protocol):
    """What the service uses of the MQTT link (or of the NullLink when MQTT is off)."""

    def publish(self, leaf: str, payload: bytes, *, kind: Kind | None = None) -> object: ...

    def emit_event(self, kind: str, message: str, **fields: Any) -> None: ...

    def on_command(self, name: str, handler: CommandHandler) -> None: ...


class FeedbackNotStoredError(NotReadyError):
    """The label was applied but could not be queued for the broker (the disk is full): 503.

    The message never names a path: it goes back to the HTTP client.
    """


class QualityService:
    """Owns the daemon's :class:`QualityMonitor` and connects it to slots, API and MQTT."""

    def __init__(self, config: Config, slots: Mapping[str, ModelSlot], link: QualityLink) -> None:
        self.slots = slots
        self.device_id = config.device_id
        self._link = link
        self.monitor = QualityMonitor(
            config.quality,
            config.device_id,
            self._publish_quality,
            emit_event=link.emit_event,
            labels={name: slot.config.labels for name, slot in slots.items()},
            references=self.reference,
        )
        for slot in slots.values():
            slot.listeners.append(self.monitor.listener)
        link.on_command("feedback", lambda cmd: self.mqtt_feedback(cmd.args))

    def start(self) -> None:
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.stop()

    def _publish_quality(self, payload: QualityPayload) -> None:
        self._link.publish("quality", msgspec.json.encode(payload))

    # -- inputs ------------------------------------------------------------------------------

    def reference(self, model: str, version: str) -> ReferenceStats | None:
        """The reference statistics of the version ``model`` serves now (the monitor asks when
        it first sees a version, which is right after the slot swapped to it)."""
        slot = self.slots.get(model)
        if slot is None or not slot.ready:
            return None
        try:
            loaded = slot.current
        except NotReadyError:
            return None
        if loaded.version != version:
            return None
        path = bundle.reference_path(loaded.path)
        return load_reference(path) if path is not None else None

    def http_feedback(self, model: str, body: bytes) -> Mapping[str, Any]:
        """The API's feedback hook: a bad body is a 400 with the reason. Accepted labels are
        also published on ``feedback`` for ``inferctl collect``."""
        try:
            items = parse_feedback(body)
            reply = self.monitor.feedback_items(model, items)
        except FeedbackError as err:
            raise InputError(str(err)) from err
        record = FeedbackLog(device=self.device_id, model=model, items=items)
        try:
            # feedback logs have their own share of the spool and are dropped (counted) beyond it
            self._link.publish("feedback", msgspec.json.encode(record), kind=Kind.FEEDBACK)
        except SpoolError as err:
            log.error("feedback for %s not spooled: %s", model, err)  # the path is for the log
            full = isinstance(err, SpoolFullError)
            raise FeedbackNotStoredError(
                "the labels were applied, but the device could not queue them for the broker"
                + (": its disk is full" if full else ": its spool failed")
            ) from err
        return reply

    def mqtt_feedback(self, args: dict[str, Any]) -> dict[str, Any]:
        """``cmd/feedback``: ``{"model": ..., "id": ..., "label": ...}`` or ``items: [...]``."""
        try:
            cmd = parse_command(args)
            items = command_items(cmd)
        except FeedbackError as err:
            raise InputError(str(err)) from err
        model = cmd.model
        if model is None:
            if len(self.slots) != 1:
                raise InputError(f"feedback must name the model: one of {', '.join(self.slots)}")
            model = next(iter(self.slots))
        if model not in self.slots:
            raise ModelNotFoundError(f"model {model!r} not found; serving {', '.join(self.slots)}")
        try:
            return self.monitor.feedback_items(model, items)
        except FeedbackError as err:
            raise InputError(str(err)) from err


_GAUGES = (
    ("accuracy", "Rolling accuracy from fed-back labels (subset accuracy for multi-label)."),
    ("f1_macro", "Rolling macro F1 from fed-back labels."),
    ("roc_auc", "Rolling ROC-AUC (binary, or macro one-vs-rest) from fed-back labels."),
    ("mae", "Rolling mean absolute error from fed-back values."),
    ("rmse", "Rolling root mean squared error from fed-back values."),
    ("samples", "Labelled samples in the rolling window."),
    ("drift_psi_max", "Largest population stability index in the last drift window."),
)


def prometheus_text(payloads: Sequence[QualityPayload]) -> str:
    """Quality gauges and label counters in the Prometheus text format, for ``/metrics``."""
    gauges = {name: Family(f"inferd_quality_{name}", "gauge", text) for name, text in _GAUGES}
    labels_total = Family(
        "inferd_feedback_labels_total",
        "counter",
        "Fed-back labels by how they joined predictions.",
    )
    seen_models: set[str] = set()
    for p in payloads:
        tags = {"model": p.model, "version": p.version}
        if p.task is not None:
            tags["task"] = p.task
        c, r = p.classification, p.regression
        values = {
            "accuracy": c.accuracy if c else None,
            "f1_macro": c.f1_macro if c else None,
            "roc_auc": c.roc_auc if c else None,
            "mae": r.mae if r else None,
            "rmse": r.rmse if r else None,
            "samples": p.samples,
            "drift_psi_max": p.drift.psi_max if p.drift else None,
        }
        for name, value in values.items():
            if value is not None:
                gauges[name].add(value, **tags)
        if p.feedback is not None and p.model not in seen_models:
            seen_models.add(p.model)
            for outcome in ("matched", "late", "unknown", "duplicate", "invalid"):
                labels_total.add(getattr(p.feedback, outcome), model=p.model, outcome=outcome)
    return render([*gauges.values(), labels_total])
