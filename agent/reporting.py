"""The agent's telemetry component: the MQTT link and everything that publishes through it.

:func:`attach` builds it for a daemon (nothing when ``mqtt.enabled`` is false): the link, the
metrics collector and publisher, the prediction log (both as slot listeners), MQTT inference
and the ``set-sampling`` command. It starts first and stops last among the components, so the
others can emit events until the end; what the broker has not taken by then stays spooled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import socket
import sys
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import Config
from agent.mqtt.infer import MqttInference
from agent.mqtt.link import Command, MqttLink
from agent.slots import ModelSlot
from runtime.errors import ModelNotFoundError, NotReadyError
from telemetry.metrics import MetricsCollector, MetricsPublisher
from telemetry.payloads import HostFacts, SlotStatus, Status, utc_now
from telemetry.prediction_log import PredictionLogger
from telemetry.resources import ResourceSampler

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

_RUNTIMES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "ai-edge-litert",
    "tflite-runtime",
    "numpy",
)


@cache
def host_facts() -> HostFacts:
    """What this device is; computed once (runtime versions from package metadata, no imports)."""
    runtimes = {}
    for dist in _RUNTIMES:
        try:
            runtimes[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    providers: list[str] = []
    if "onnxruntime" in sys.modules:  # ask only a runtime that is loaded already
        from runtime.backends.onnx import available_providers

        providers = available_providers()
    return HostFacts(
        hostname=socket.gethostname(),
        arch=platform.machine(),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        runtimes=runtimes,
        providers=providers,
    )


def slot_status(slot: ModelSlot) -> SlotStatus:
    """One slot as the status payload shows it."""
    try:
        loaded = slot.current
    except NotReadyError:
        return SlotStatus(
            name=slot.name,
            ready=False,
            version=None,
            runtime=slot.config.runtime,
            providers=[],
            digest=None,
            signature_digest=None,
            update_state=slot.update_state,
            last_update=slot.last_update,
        )
    signature = json.dumps(loaded.backend.signature(), sort_keys=True).encode()
    return SlotStatus(
        name=slot.name,
        ready=True,
        version=loaded.version,
        runtime=slot.config.runtime,
        providers=list(loaded.backend.providers),
        digest=loaded.digest,
        signature_digest=hashlib.sha256(signature).hexdigest(),
        update_state=slot.update_state,
        last_update=slot.last_update,
    )


class Telemetry:
    """Link, metrics, prediction log and MQTT inference as one daemon component."""

    def __init__(self, config: Config, slots: Mapping[str, ModelSlot]) -> None:
        self.config = config
        self.slots = slots
        self.started_at: datetime = utc_now()
        tel = config.telemetry
        self.link = MqttLink(config, self.status)
        self.collector = MetricsCollector()
        self.predictions = PredictionLogger(
            config.device_id,
            lambda payload, n: self.link.publish("predictions", payload, records=n),
            sample_rate=tel.prediction_sample_rate,
            batch_size=tel.prediction_batch_size,
            batch_ms=tel.prediction_batch_ms,
            labels={m.name: m.labels for m in config.models},
            log_tensors=[m.name for m in config.models if m.log_tensors],
        )
        self.sampler = ResourceSampler(Path(config.state_dir))
        self.metrics = MetricsPublisher(
            config.device_id,
            tel.metrics_interval_s,
            self.collector,
            self.sampler.sample,
            self.link.spool,
            self._publish_metrics,
            other_drops=lambda: self.predictions.dropped,
        )
        max_payload = config.mqtt.max_payload_bytes or config.api.max_body_bytes
        self.inference = MqttInference(
            self.link,
            slots,
            workers=min(4, config.api.workers),
            max_payload_bytes=max_payload,
            queue_bytes=max(config.mqtt.inbox_max_bytes, max_payload),
        )
        for slot in slots.values():
            slot.listeners.append(self.collector.listener)
            slot.listeners.append(self.predictions.listener)
            slot.emit_event = self.link.emit_event
        self.link.on_command("set-sampling", self._set_sampling)

    def status(self) -> Status:
        """The retained status payload, built from the slots as they are now."""
        return Status(
            device=self.config.device_id,
            groups=list(self.config.groups),
            agent_version=__version__,
            started_at=self.started_at,
            host=host_facts(),
            models=[slot_status(s) for s in self.slots.values()],
        )

    def _publish_metrics(self, payload: bytes) -> None:
        """``telemetry.metrics_qos``: 1 goes through the spool (kept and replayed in order after
        an outage); 0 is sent at once without waiting for an ack, and dropped while offline, so
        a dashboard never gets a burst of stale metrics after an outage (the counts in the next
        payload are totals since start: they cover the gap)."""
        if self.config.telemetry.metrics_qos == 1:
            self.link.publish("metrics", payload)
        elif not self.link.send_now(self.link.topic("metrics"), payload, qos=0):
            log.debug("metrics not sent: no broker connection (metrics_qos 0)")

    def _set_sampling(self, cmd: Command) -> dict[str, Any]:
        model = cmd.args.get("model")
        if model is not None and model not in self.slots:
            # a rate stored for a name no slot has would grow the table on every command
            raise ModelNotFoundError(
                f"model {model!r} not found; serving {', '.join(self.slots) or 'nothing'}"
            )
        result = self.predictions.set_sampling_command(cmd.args)
        self.link.emit_event("sampling-changed", f"prediction sampling: {result}", **result)
        return result

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: a new metrics interval and sample rate take effect now."""
        self.metrics.set_interval(config.telemetry.metrics_interval_s)
        self.predictions.set_sampling(config.telemetry.prediction_sample_rate)
        self.link.reconfigure(config)
        self.link.emit_event("config-reloaded", "configuration reloaded")

    def start(self) -> None:
        self.link.start()
        self.predictions.start()
        self.metrics.start()
        self.inference.start()
        self.link.emit_event(
            "agent-started",
            f"inferd {__version__} started",
            models={n: slot_status(s).version for n, s in self.slots.items()},
        )

    def stop(self) -> None:
        self.inference.stop()
        self.metrics.stop()
        self.predictions.stop()  # flushes its queue into the spool
        self.link.emit_event("agent-stopping", "inferd is shutting down")
        self.link.stop()
