"""The JSON payloads inferd publishes on MQTT, as msgspec Structs.

Every payload carries ``schema_version`` and ``ts`` (RFC 3339, UTC). The JSON Schemas in
``telemetry/schemas/`` are generated from these types (``python -m telemetry.schemas``), never
written by hand. A module that adds payload types lists them in its own ``SCHEMA_TYPES`` dict
(schema file stem -> type) and is named in ``telemetry.schemas.PAYLOAD_MODULES``.

Topics (below ``{prefix}/{device}``): ``status`` (:data:`StatusPayload`, retained), ``metrics``
(:class:`Metrics`), ``predictions`` (:class:`PredictionBatch`), ``events`` (:class:`Event`).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Protocol

import msgspec

SCHEMA_VERSION: Literal[1] = 1

Level = Literal["info", "warning", "error"]


class EventSink(Protocol):
    """Where a part sends its events: the agent's MQTT link (``MqttLink.emit_event``), the
    NullLink when MQTT is off, or a test's recorder. Every event becomes an :class:`Event`."""

    def __call__(
        self,
        kind: str,
        message: str,
        *,
        level: Level = "info",
        model: str | None = None,
        version: str | None = None,
        **details: Any,
    ) -> None: ...


Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]


def utc_now() -> datetime:
    """The current time as an aware UTC datetime (encoded as RFC 3339 with ``Z``)."""
    return datetime.now(timezone.utc)


class Payload(msgspec.Struct, kw_only=True):
    """Fields every published payload starts with."""

    schema_version: Literal[1] = SCHEMA_VERSION
    ts: Timestamp = msgspec.field(default_factory=utc_now)


# --- status -----------------------------------------------------------------------------------


class HostFacts(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the device is: enough to tell a Pi from a Jetson in a fleet view."""

    hostname: str
    arch: str
    os: str
    python: str
    runtimes: dict[str, str] = {}
    """Installed runtime name -> version (onnxruntime, ai-edge-litert, numpy, ...)."""
    providers: list[str] = []
    """Execution providers this onnxruntime build offers (inferd names: tensorrt, cuda, openvino,
    cpu)."""


class UpdateState(str, enum.Enum):
    """Where a slot's update job is; the device's state machine and the fleet's readers share it."""

    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


UpdateOutcome = Literal["committed", "failed", "rolled_back", "withdrawn", "superseded"]
"""How an update job ended: withdrawn when its version was no longer offered to the device
(a halted rollout), superseded when a newer version replaced it before activation."""


class LastUpdate(msgspec.Struct, kw_only=True):
    """The last update job of a slot that ended, kept by the updater across restarts."""

    version: str
    seq: int
    """The published version's sequence number (what a rollout is identified by)."""
    outcome: UpdateOutcome
    reason: str
    ts: Timestamp
    """When the job ended."""


class SlotStatus(msgspec.Struct, kw_only=True):
    """One model slot as the status topic shows it."""

    name: str
    ready: bool
    version: str | None
    runtime: str
    providers: list[str]
    digest: str | None
    """sha256 of the served model file."""
    signature_digest: str | None
    """sha256 of the model's input/output signature: equal digests mean interchangeable models."""
    update_state: UpdateState
    last_update: LastUpdate | None = None
    """How the slot's last update job ended; null when it never had one."""


class Status(Payload, kw_only=True, tag_field="state", tag="online"):
    """Retained on ``status`` while the agent is connected; re-sent after every reconnect."""

    device: str
    groups: list[str]
    agent_version: str
    started_at: Timestamp
    host: HostFacts
    models: list[SlotStatus]
    broker: str | None = None
    """``host:port`` of the broker node the device is connected to (one of ``mqtt.hosts``)."""


class Offline(Payload, kw_only=True, tag_field="state", tag="offline"):
    """Retained on ``status`` when the agent leaves: its last will, or a clean shutdown.

    The will is registered at connect time and sent by the broker at an unknown later moment,
    so it carries ``ts: null``; a clean shutdown sets ``ts``.
    """

    ts: Timestamp | None = None  # type: ignore[assignment]
    device: str
    reason: Literal["connection-lost", "shutdown"] = "connection-lost"


StatusPayload = Status | Offline

# --- metrics ----------------------------------------------------------------------------------


class ModelMetrics(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-model request statistics. Latencies cover the last interval; counts are since start."""

    version: str | None = None
    count: int
    errors: int
    interval_count: int
    interval_errors: int
    rps: float
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class SystemMetrics(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Resource use; a field this device cannot measure is absent, never zero."""

    cpu_percent: float | None = None
    load_1: float | None = None
    load_5: float | None = None
    load_15: float | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    memory_percent: float | None = None
    process_rss_bytes: int | None = None
    process_cpu_percent: float | None = None
    temperature_c: float | None = None
    disk_free_bytes: int | None = None
    gpu_util_percent: float | None = None
    gpu_memory_used_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_temperature_c: float | None = None


class SpoolMetrics(msgspec.Struct, kw_only=True):
    """The store-and-forward queue: what waits for the broker and what had to be dropped."""

    queued_messages: int
    queued_bytes: int
    dropped_records: int
    """Prediction records dropped since the last metrics message (spool full or logger behind)."""
    dropped_records_total: int


class Metrics(Payload, kw_only=True):
    """Published on ``metrics`` every ``telemetry.metrics_interval_s``."""

    device: str
    interval_s: float
    models: dict[str, ModelMetrics]
    system: SystemMetrics
    spool: SpoolMetrics


# --- predictions ------------------------------------------------------------------------------


# The prediction record types are made by the hundred thousand per second and never take part in
# a reference cycle: gc=False keeps them out of the garbage collector's sight (and work).
# ClassScore and OutputSummary also take positional arguments: the prediction log makes them
# with map() over the class, without a Python frame per object.


class ClassScore(msgspec.Struct, omit_defaults=True, gc=False):
    index: int
    score: float
    label: str | None = None


class OutputSummary(msgspec.Struct, omit_defaults=True, gc=False):
    """A classifier output as top-k per row (first rows only), anything else as min/max/mean."""

    shape: list[int]
    top_k: tuple[tuple[ClassScore, ...], ...] | None = None
    min: float | None = None
    max: float | None = None
    mean: float | None = None


class TensorDump(msgspec.Struct, kw_only=True):
    """A whole tensor, only logged for models with ``log_tensors: true``."""

    datatype: str
    shape: list[int]
    data: list[Any]


class PredictionRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    ts: Timestamp
    model: str
    version: str
    request_id: str
    latency_ms: float
    input_digest: str
    """blake2b-64 over every input's name, dtype, shape and bytes: equal inputs, equal digest."""
    outputs: dict[str, OutputSummary] = {}
    error: str | None = None
    inputs_tensors: dict[str, TensorDump] | None = None
    outputs_tensors: dict[str, TensorDump] | None = None


class PredictionBatch(Payload, kw_only=True):
    """Published on ``predictions``: sampled records, batched by count or time."""

    device: str
    records: list[PredictionRecord]


# --- events -----------------------------------------------------------------------------------


class Event(Payload, kw_only=True):
    """Published on ``events``: update lifecycle, validation, rollbacks, errors, restarts."""

    device: str
    kind: str
    level: Level = "info"
    message: str
    model: str | None = None
    version: str | None = None
    details: dict[str, Any] = {}


# --- commands (down) --------------------------------------------------------------------------


class Rollback(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``cmd/rollback``: the one model to roll back to its previous version.

    There is no "every model" form: a stray JSON object (a reply aimed at the command topic)
    must never roll a device back.
    """

    model: str


class SetSampling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``cmd/set-sampling``: a new prediction sample rate, for one model or all."""

    rate: float
    model: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")


class CommandReply(Payload, kw_only=True):
    """Sent to a command's MQTT 5 response topic, with its correlation data."""

    device: str
    command: str
    ok: bool
    error: str | None = None
    result: dict[str, Any] | None = None


# -- quality ----------------------------------------------------------------------------------

Task = Literal["classification", "multilabel", "regression"]


class ClassQuality(msgspec.Struct, frozen=True, kw_only=True):
    """One class (or one label of a multi-label model) in the window."""

    label: str
    support: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    roc_auc: float | None = None


class ClassificationQuality(msgspec.Struct, frozen=True, kw_only=True):
    """Single-label or multi-label classification metrics over a window.

    ``accuracy`` is subset accuracy for multi-label. ``per_class`` holds the ``max_classes``
    classes with the largest support; the macro averages cover every class seen. ``confusion``
    (rows: true, columns: predicted, in ``labels`` order) is given for single-label windows
    with at most ``max_classes`` classes.
    """

    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    roc_auc: float | None
    per_class: list[ClassQuality]
    labels: list[str] | None = None
    confusion: list[list[int]] | None = None


class RegressionQuality(msgspec.Struct, frozen=True, kw_only=True):
    mae: float
    rmse: float
    bias: float
    """Mean of prediction minus truth: the sign says whether the model over- or under-shoots."""


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one feature (or channel) of one tensor against its reference statistics."""

    tensor: str
    index: int
    psi: float
    mean_shift: float
    """(window mean - reference mean) / reference std."""
    std_ratio: float
    """window std / reference std."""


class DriftQuality(msgspec.Struct, frozen=True, kw_only=True):
    samples: int
    psi_max: float
    threshold: float
    drifted: bool
    features: list[FeatureDrift]
    """The most drifted features, worst first."""


class FeedbackCounts(msgspec.Struct, frozen=True, kw_only=True):
    """How fed-back labels fared in the join with predictions, per model since start.

    ``unmatched`` = ``late`` (the prediction had left the join window) + ``unknown`` (no
    prediction with that id arrived in time) + ``duplicate`` + ``invalid`` (did not fit the
    prediction, e.g. a class label for a regression output).
    """

    matched: int = 0
    unmatched: int = 0
    late: int = 0
    unknown: int = 0
    duplicate: int = 0
    invalid: int = 0
    expired_predictions: int = 0
    """Predictions that got no label within the join window (normal when few are labelled)."""
    evicted_predictions: int = 0
    """Predictions pushed out by the pending bound before their window ended."""
    pending_predictions: int = 0
    pending_labels: int = 0


class QualityPayload(Payload, kw_only=True):
    """Published on ``quality`` for each model version with labels or drift to report."""

    device: str
    model: str
    version: str
    task: Task | None
    samples: int
    """Labelled samples in the window (0 when only drift is known)."""
    window_count: int
    window_s: float
    classification: ClassificationQuality | None = None
    regression: RegressionQuality | None = None
    drift: DriftQuality | None = None
    feedback: FeedbackCounts | None = None


# -- feedback -------------------------------------------------------------------------------


class FeedbackItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One feedback record as sent over HTTP or MQTT."""

    id: str
    label: int | str | list[int | str] | None = None
    labels: list[Any] | None = None
    value: float | list[float] | None = None


class FeedbackCommand(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``{prefix}/{device}/cmd/feedback``: a model and one item, or several ``items``.

    ``model`` may be left out on a device that serves a single model.
    """

    model: str | None = None
    items: list[FeedbackItem] | None = None
    id: str | None = None
    label: int | str | list[int | str] | None = None
    labels: list[Any] | None = None
    value: float | list[float] | None = None


class FeedbackLog(Payload, kw_only=True):
    """Published on ``feedback``: labels the device received over HTTP, so that
    ``inferctl collect`` sees every label (those sent on ``cmd/feedback`` are on the broker
    already and are not repeated)."""

    device: str
    model: str
    items: list[FeedbackItem]
