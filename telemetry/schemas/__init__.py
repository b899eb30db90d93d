"""JSON Schemas of the MQTT payloads, generated from the msgspec types.

``python -m telemetry.schemas`` rewrites the ``*.json`` files beside this module; a test checks
that the committed files equal what the types generate. Every payload on the wire has an entry
in :data:`SCHEMA_TYPES`, the one registry of the contract.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from telemetry.payloads import (
    CommandReply,
    Event,
    FeedbackCommand,
    FeedbackLog,
    Metrics,
    PredictionBatch,
    QualityPayload,
    Rollback,
    SetSampling,
    StatusPayload,
)

SCHEMA_TYPES: dict[str, Any] = {
    "status": StatusPayload,
    "metrics": Metrics,
    "predictions": PredictionBatch,
    "events": Event,
    "quality": QualityPayload,
    "feedback": FeedbackLog,
    "cmd-rollback": Rollback,
    "cmd-set-sampling": SetSampling,
    "cmd-feedback": FeedbackCommand,
    "command-reply": CommandReply,
}
"""Schema file stem -> payload type (the topic's last level, ``cmd-`` for commands)."""
SCHEMA_DIR = Path(__file__).resolve().parent
_ALWAYS = ("schema_version", "ts")
"""Fields with defaults that every payload nonetheless carries on the wire."""


def payload_types() -> dict[str, Any]:
    """Schema file stem -> payload type (a copy of :data:`SCHEMA_TYPES`)."""
    return dict(SCHEMA_TYPES)


def _normalise(node: Any) -> None:
    """Make a generated schema independent of the msgspec release that generated it, in place.

    Releases differ in two ways that do not change what a schema accepts: whether class
    docstrings copied into ``description`` are dedented (0.23 does, earlier ones kept the source
    indentation) and the order of ``anyOf`` branches for optional fields (0.18 puts ``null``
    first). Dedenting every description and sorting every ``anyOf`` makes the committed files
    the same with every msgspec the lower bound admits.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = inspect.cleandoc(value)
            else:
                _normalise(value)
        if isinstance(node.get("anyOf"), list):
            node["anyOf"].sort(key=lambda branch: json.dumps(branch, sort_keys=True))
    elif isinstance(node, list):
        for item in node:
            _normalise(item)


def schema_for(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one payload type, with ``schema_version`` and ``ts`` required."""
    schema: dict[str, Any] = msgspec.json.schema(tp)
    _normalise(schema)
    for definition in schema.get("$defs", {}).values():
        props = definition.get("properties", {})
        required = definition.setdefault("required", [])
        for field in _ALWAYS:
            if field in props and field not in required:
                required.append(field)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def render(tp: Any) -> str:
    """The schema file text for ``tp``: stable key order, trailing newline."""
    return json.dumps(schema_for(tp), indent=2, sort_keys=True) + "\n"


def load(stem: str) -> dict[str, Any]:
    """A committed schema by its file stem (``status``, ``metrics``, ...)."""
    data: dict[str, Any] = json.loads((SCHEMA_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    return data


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file into ``directory``; returns the paths written."""
    written = []
    for stem, tp in sorted(payload_types().items()):
        path = directory / f"{stem}.json"
        path.write_text(render(tp), encoding="utf-8")
        written.append(path)
    return written
