"""A fleet on a private 3-node NATS cluster (JetStream, an MQTT 3.1.1 listener per node).

Two real ``inferd run`` devices, each preferring another node, and the operator on the third:
status and the last will, metrics, predictions, events, a command, MQTT inference the 3.1.1 way
(no response topic: the reply goes to ``{request topic}/reply``), a group poke and a signed update
through ``inferctl push``, then the node of a device is killed and the device moves on with every
prediction it had spooled. The devices ask for MQTT 5 (the default) and fall back to 3.1.1 when
NATS refuses it, as does ``inferctl``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProc, start_daemon
from tests.support.models import classifier
from tests.support.nats import NATS_SERVER, NatsCluster, NatsNode, Watcher
from tests.support.tuf_repo import TufRepo
from updater.inferctl.main import main as inferctl

pytestmark = pytest.mark.skipif(
    not Path(NATS_SERVER).exists(), reason="nats-server is not installed"
)

X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats", size=3)
    c.start()
    yield c
    c.kill()


def device_config(
    name: str, nodes: list[NatsNode], prefix: str, model: Path, tuf: TufRepo
) -> dict[str, Any]:
    return {
        "device_id": name,
        "groups": ["kitchen"],
        "models": [{"name": "classifier", "path": str(model)}],
        "mqtt": {
            "enabled": True,
            "hosts": [n.where for n in nodes],
            "topic_prefix": prefix,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "keepalive_s": 5,
        },
        "telemetry": {
            "metrics_interval_s": 0.5,
            "prediction_batch_size": 40,
            "prediction_batch_ms": 100,
        },
        "updates": {
            "repository_url": tuf.url,
            "trusted_root": str(tuf.trusted_root),
            "poll_interval_s": 3600,
            "check_on_start": False,
            "trial_window_s": 0.5,
            "validation_runs": 5,
        },
    }


def decoded(w: Watcher, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in w.on(suffix)]


def last_status(w: Watcher, device: str) -> dict[str, Any] | None:
    found = decoded(w, f"/{device}/status")
    return found[-1] if found else None


def on_node(w: Watcher, device: str, node: NatsNode) -> bool:
    s = last_status(w, device)
    return s is not None and s["state"] == "online" and s.get("broker") == node.where


def records(w: Watcher, device: str) -> list[str]:
    out: list[str] = []
    for batch in decoded(w, f"/{device}/predictions"):
        out += [r["request_id"] for r in batch["records"]]
    return out


def kinds(w: Watcher, device: str) -> list[str]:
    return [e["kind"] for e in decoded(w, f"/{device}/events")]


def serving(d: DaemonProc) -> str:
    try:
        status, body = d.request("GET", "/v2/models/classifier")
    except ConnectionError:  # the API closed an idle keep-alive connection: ask on a new one
        status, body = d.request("GET", "/v2/models/classifier")
    assert status == 200
    return str(body["versions"][0])


def infer(d: DaemonProc, rid: str) -> None:
    status, body = d.infer("classifier", [X], id=rid)
    assert status == 200 and body["id"] == rid, body


def wait(predicate: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_fleet_on_a_nats_cluster_survives_losing_a_node(
    tmp_path: Path, cluster: NatsCluster, tuf_repo: TufRepo
) -> None:
    n1, n2, n3 = cluster.nodes
    prefix = f"inferd-{uuid.uuid4().hex[:6]}"
    ops = Watcher(n3.host, n3.port, f"{prefix}/#")  # the operator's dashboard, on another node
    v1 = classifier(tmp_path / "v1.onnx")
    daemons: dict[str, DaemonProc] = {}
    try:
        for name, nodes in (("dev-a", [n1, n2, n3]), ("dev-b", [n2, n3, n1])):
            (tmp_path / name).mkdir()
            cfg = device_config(name, nodes, prefix, v1, tuf_repo)
            daemons[name] = start_daemon(tmp_path / name, cfg)
        a, b = daemons["dev-a"], daemons["dev-b"]

        # status (retained, through JetStream) names the node each device is on
        assert ops.wait(lambda: on_node(ops, "dev-a", n1) and on_node(ops, "dev-b", n2), 20), (
            last_status(ops, "dev-a"),
            last_status(ops, "dev-b"),
            a.stderr(),
        )
        assert "does not speak MQTT 5; using MQTT 3.1.1" in a.stderr()
        # metrics and events cross the cluster
        assert ops.wait(lambda: bool(ops.on("/dev-a/metrics")) and bool(ops.on("/dev-b/metrics")))
        assert ops.wait(lambda: "agent-started" in kinds(ops, "dev-b"))
        # predictions
        sent = [f"a{i}" for i in range(20)]
        for rid in sent:
            infer(a, rid)
        assert ops.wait(lambda: set(records(ops, "dev-a")) >= set(sent)), records(ops, "dev-a")

        # a command (3.1.1: no response topic; the outcome is an event)
        ops.publish(f"{prefix}/dev-b/cmd/set-sampling", json.dumps({"rate": 0.5}).encode())
        assert ops.wait(lambda: "sampling-changed" in kinds(ops, "dev-b")), kinds(ops, "dev-b")
        ops.publish(f"{prefix}/dev-b/cmd/set-sampling", b'{"rate": 1.0}')
        assert ops.wait(lambda: kinds(ops, "dev-b").count("sampling-changed") == 2)

        # MQTT inference without MQTT 5: the reply goes to {request topic}/reply
        request = {"id": "mq-1", "inputs": [X]}
        ops.publish(f"{prefix}/dev-b/infer/classifier", json.dumps(request).encode())
        assert ops.wait(lambda: bool(ops.on("/dev-b/infer/classifier/reply")))
        reply = decoded(ops, "/dev-b/infer/classifier/reply")[0]
        assert reply["id"] == "mq-1" and reply["outputs"][0]["shape"] == [1, 3], reply

        # a group poke and a signed update, the operator on the third node
        tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
        push = ["push", "--group", "kitchen", "--prefix", prefix, "--broker", n3.where]
        assert inferctl(push) == 0
        assert wait(lambda: serving(a) == "2" and serving(b) == "2", 30), (
            kinds(ops, "dev-a"),
            a.stderr(),
        )
        for name in daemons:
            assert ops.wait(lambda n=name: "committed" in update_states(ops, n)), name

        # kill the node dev-a is on: it moves to the next, and nothing it spooled is lost
        n1.kill()
        late = [f"b{i}" for i in range(60)]
        for rid in late:
            infer(a, rid)
        # the next node, or the one after if the next was still busy with JetStream's new
        # leaders (the retained status needs them; on a loaded machine that takes seconds)
        assert ops.wait(lambda: on_node(ops, "dev-a", n2) or on_node(ops, "dev-a", n3), 45), (
            last_status(ops, "dev-a"),
            a.stderr()[-2500:],
        )
        assert ops.wait(lambda: set(records(ops, "dev-a")) >= set(sent + late), 30), (
            sorted(set(sent + late) - set(records(ops, "dev-a"))),
            a.stderr(),
        )
        assert list(dict.fromkeys(records(ops, "dev-a"))) == sent + late, "in order"
        assert serving(a) == "2"

        # the last will: dev-b dies without a word, its node tells the operator
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.wait()
        assert ops.wait(lambda: (last_status(ops, "dev-b") or {}).get("state") == "offline"), (
            last_status(ops, "dev-b")
        )
    finally:
        codes = {n: d.stop() for n, d in daemons.items() if d.proc.poll() is None}
        ops.close()
    assert codes == {"dev-a": 0}, codes


def update_states(w: Watcher, device: str) -> list[str]:
    return [
        e["details"].get("state") for e in decoded(w, f"/{device}/events") if e["kind"] == "update"
    ]
