"""A fleet as the operator tools see it, for system tests of rollouts: device ids by rollout
bucket, a device's retained status payload, a QoS 1 send and ``inferctl`` as a process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt

from telemetry.payloads import HostFacts, SlotStatus, Status, utc_now
from telemetry.shares import bucket

ROOT = Path(__file__).resolve().parents[2]


def ids_by_bucket(
    slot: str, version: str, below: int, n: int = 1, above: bool = False
) -> list[str]:
    """Device ids whose bucket is below (or at/above) ``below`` for this slot and version."""
    out = []
    for i in range(100_000):
        name = f"dev-{i}"
        if (bucket(name, slot, version) >= below) == above:
            out.append(name)
            if len(out) == n:
                return out
    raise AssertionError("no such id")


def status_payload(
    device: str, version: str, state: str, groups: Sequence[str] = ("fleet",)
) -> bytes:
    """The status a device publishes with its ``classifier`` slot at ``version`` in ``state``."""
    return msgspec.json.encode(
        Status(
            device=device,
            groups=list(groups),
            agent_version="test",
            started_at=utc_now(),
            host=HostFacts(hostname=device, arch="x86_64", os="Linux", python="3"),
            models=[
                SlotStatus(
                    name="classifier",
                    ready=True,
                    version=version,
                    runtime="onnxruntime",
                    providers=["cpu"],
                    digest=None,
                    signature_digest=None,
                    update_state=state,
                )
            ],
        )
    )


def send(c: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish at QoS 1 and wait (5 s at most) until the broker has it."""
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def inferctl_process(*args: str) -> subprocess.Popen[str]:
    """``python -m updater.inferctl ARGS`` from the repository root, stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "updater.inferctl", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
