"""The link when MQTT is off (``mqtt.enabled: false``): the parts that publish keep one shape."""

from __future__ import annotations

import logging
from typing import Any

from agent.mqtt.link import CommandHandler

log = logging.getLogger(__name__)


class NullLink:
    """Publishes nothing and hears no command; events still reach the log, where an operator
    without a broker looks for them."""

    def publish(self, leaf: str, payload: bytes, *, records: int = 0, **_: Any) -> bool:
        log.debug("mqtt off: %s not published", leaf)
        return False

    def emit_event(self, kind: str, message: str, *, level: str = "info", **_: Any) -> None:
        log.log(logging.WARNING if level in ("warning", "error") else logging.INFO, "%s", message)

    def publish_status(self) -> None:
        """Nothing to publish to."""

    def on_command(self, name: str, handler: CommandHandler) -> None:
        """Commands arrive only over MQTT: none will."""

    def problem(self) -> str | None:
        return None
