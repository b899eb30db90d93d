"""The committed JSON Schemas are what the payload types generate, and real payloads fit them."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from telemetry import schemas
from tests.support.broker import Broker, Capture
from tests.support.daemon import start_daemon
from tests.support.mqtt_agent import DEVICE, agent_config, infer, request

TOPIC_SCHEMAS = {
    "status": "status",
    "metrics": "metrics",
    "predictions": "predictions",
    "events": "events",
    "quality": "quality",
}


def test_committed_schema_files_match_the_payload_types() -> None:
    types = schemas.payload_types()
    on_disk = {p.stem for p in schemas.SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(types), "run: python -m telemetry.schemas"
    for stem, tp in types.items():
        committed = (schemas.SCHEMA_DIR / f"{stem}.json").read_text(encoding="utf-8")
        assert committed == schemas.render(tp), f"{stem}.json is stale: python -m telemetry.schemas"
        jsonschema.Draft202012Validator.check_schema(json.loads(committed))


def test_every_payload_requires_schema_version_and_ts() -> None:
    for stem in ("status", "metrics", "predictions", "events", "command-reply"):
        schema = schemas.load(stem)
        for name, definition in schema["$defs"].items():
            if "schema_version" in definition.get("properties", {}):
                assert {"schema_version", "ts"} <= set(definition["required"]), (stem, name)


def test_payloads_captured_from_a_real_broker_validate(
    tmp_path: Path,
    broker: Broker,
    capture_factory: Callable[..., Capture],
    model_factory: Callable[..., Path],
) -> None:
    cap = capture_factory(broker, f"inferd/{DEVICE}/#", "replies/#")
    cfg = agent_config(model_factory("classifier"), broker, tmp_path / "state", reconnect_max_s=0.2)
    cfg["models"][0]["log_tensors"] = True
    cfg["models"][0]["labels"] = ["cat", "dog", "eel"]
    run = tmp_path / "run"
    run.mkdir()
    d = start_daemon(run, cfg)

    def missing() -> set[str]:
        """What the test still waits for (named, so that a failure says what never came)."""
        seen = {m.topic.rsplit("/", 1)[1] for m in cap.messages}
        gaps = {"status", "metrics", "predictions", "events"} - seen
        for corr in (b"r1", b"r2"):
            if not any(m.properties.CorrelationData == corr for m in cap.on("replies/x")):
                gaps.add(f"reply {corr.decode()}")
        if not any(json.loads(m.payload)["models"] for m in cap.on("/metrics")):
            gaps.add("metrics with a model")
        return gaps

    try:
        # The birth status comes after the agent subscribed: from now on commands are heard.
        assert cap.wait(lambda: bool(cap.on("/status")), 30), d.stderr()
        for i in range(5):
            infer(d, f"s{i}")
        request(cap, f"inferd/{DEVICE}/cmd/set-sampling", b'{"rate": 0.5}', b"r1")
        request(cap, f"inferd/{DEVICE}/cmd/nonsense", b"{}", b"r2")
        # each of these comes within a second on an idle machine; the bound is for a loaded one
        assert cap.wait(lambda: not missing(), 60), (missing(), d.stderr())
    finally:
        d.proc.send_signal(signal.SIGKILL)  # the will is a payload too
        d.proc.wait()
    assert cap.wait(lambda: json.loads(cap.on("/status")[-1].payload)["state"] == "offline", 10)
    validators = {
        stem: jsonschema.Draft202012Validator(
            schemas.load(stem), format_checker=jsonschema.FormatChecker()
        )
        for stem in [*TOPIC_SCHEMAS.values(), "command-reply"]
    }
    checked: dict[str, int] = {}
    for m in cap.messages:
        leaf = m.topic.rsplit("/", 1)[1]
        stem = "command-reply" if m.topic.startswith("replies/") else TOPIC_SCHEMAS.get(leaf)
        if stem is None:
            continue
        validators[stem].validate(json.loads(m.payload))
        checked[stem] = checked.get(stem, 0) + 1
    assert set(checked) >= {"status", "metrics", "predictions", "events", "command-reply"}
    batch = json.loads(cap.on("/predictions")[0].payload)
    assert batch["records"][0]["outputs"]["probs"]["top_k"][0][0]["label"] in {"cat", "dog", "eel"}
    assert batch["records"][0]["inputs_tensors"]["x"]["shape"] == [1, 4]


def test_a_payload_missing_a_field_is_rejected() -> None:
    validator = jsonschema.Draft202012Validator(schemas.load("events"))
    good = {
        "schema_version": 1,
        "ts": "2026-01-01T00:00:00Z",
        "device": "d",
        "kind": "k",
        "message": "m",
    }
    validator.validate(good)
    for field in ("schema_version", "ts", "kind"):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({k: v for k, v in good.items() if k != field})
