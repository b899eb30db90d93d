"""Links for tests: a :class:`CallbackLink` for testing one daemon part without a broker (what it
publishes and emits is handed to callbacks; the parts take a link in their constructor, see
agent/app.py), and the config and status that a real :class:`~agent.mqtt.link.MqttLink` under test
is built from (:func:`link_config`, :func:`status_of`; the ``make_link`` fixture starts one)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import Config, parse_config
from agent.mqtt.null import NullLink
from telemetry.payloads import HostFacts, Status, utc_now
from tests.support.broker import Broker, Cutter

STARTED = utc_now()


def link_config(tmp_path: Path, to: Broker | Cutter | list[str], **mqtt_extra: Any) -> Config:
    """Device ``dev1`` in group ``kitchen`` with its state under ``tmp_path``, linked to one broker
    (or proxy) or to a list of ``host:port`` (``mqtt.hosts``), reconnecting quickly."""
    where: dict[str, Any] = (
        {"hosts": to} if isinstance(to, list) else {"host": to.host, "port": to.port}
    )
    return parse_config(
        {
            "device_id": "dev1",
            "groups": ["kitchen"],
            "state_dir": str(tmp_path / "state"),
            "mqtt": {
                **where,
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.3,
                "keepalive_s": 5,
                **mqtt_extra,
            },
        },
        environ={},
    )


def status_of(cfg: Config) -> Callable[[], Status]:
    """The status builder an :class:`~agent.mqtt.link.MqttLink` publishes for ``cfg``'s device."""

    def build() -> Status:
        return Status(
            device=cfg.device_id,
            groups=list(cfg.groups),
            agent_version="test",
            started_at=STARTED,
            host=HostFacts(hostname="h", arch="x86_64", os="Linux", python="3"),
            models=[],
        )

    return build


class CallbackLink(NullLink):
    """A :class:`NullLink` that calls ``on_event(kind, message, **fields)`` for every event and
    ``on_publish(leaf, payload)`` for every publish."""

    def __init__(
        self,
        on_event: Callable[..., None] | None = None,
        on_publish: Callable[[str, bytes], object] | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_publish = on_publish

    def emit_event(self, kind: str, message: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, **fields)

    def publish(self, leaf: str, payload: bytes, **_: Any) -> bool:
        if self._on_publish is not None:
            self._on_publish(leaf, payload)
        return True
