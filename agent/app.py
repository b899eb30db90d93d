"""The composition root: builds every part of an inferd process and wires them by constructor.

This is the one place that knows which part talks to which: the model slots, the local API, the
MQTT link (or a :class:`~agent.mqtt.null.NullLink` when MQTT is off), telemetry, the quality
service and the update loop. The parts themselves take what they use as constructor arguments
and never reach back into the daemon; :class:`~agent.daemon.Daemon` only runs the lifecycle.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.api.server import ApiServer
from agent.config import Config
from agent.daemon import Component, Daemon
from agent.mqtt.link import MqttLink
from agent.mqtt.null import NullLink
from agent.quality import QualityService, prometheus_text
from agent.reporting import Telemetry
from agent.slots import ModelSlot
from agent.updates import UpdateComponent

log = logging.getLogger(__name__)


def build_daemon(config: Config, config_path: str | Path | None = None) -> Daemon:
    """Every part of one inferd process, wired; start it with ``run()`` (or ``start()``)."""
    state_dir = Path(config.state_dir)
    slots = {m.name: ModelSlot(m, cache_dir=state_dir / "cache" / m.name) for m in config.models}
    api = ApiServer(config.api, slots)
    components: list[Component] = []
    telemetry = None
    if config.mqtt.enabled:
        telemetry = Telemetry(config, slots)
        link: MqttLink | NullLink = telemetry.link
        components.append(telemetry)  # first: starts first, stops last, so events flow
        api.ready_checks.append(telemetry.link.problem)
    else:
        log.info("mqtt disabled: no telemetry is published")
        link = NullLink()
    quality = QualityService(config, slots, link)
    api.feedback = quality.http_feedback
    api.metrics_text.append(lambda: prometheus_text(quality.monitor.payloads()))
    updates = UpdateComponent(config, slots, link, api.request_histograms)
    components += [quality, updates]
    daemon = Daemon(
        config,
        slots=slots,
        api=api,
        components=components,
        boot_plan=updates.boot_plan,
        config_path=config_path,
    )
    daemon.telemetry, daemon.quality, daemon.updates = telemetry, quality, updates
    return daemon
