"""A link for testing one daemon part without a broker: what it publishes and emits is handed to
callbacks (the parts take a link in their constructor, see agent/app.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.mqtt.null import NullLink


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
