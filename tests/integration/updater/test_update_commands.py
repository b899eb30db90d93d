"""``inferctl`` update commands against real files, a real HTTP server and a private broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker
from tests.support.models import classifier
from tests.support.net import free_port
from updater.device.client import RepositoryClient
from updater.inferctl.main import main

ROOT = Path(__file__).resolve().parents[3]


def test_repo_init_model_add_list_refresh_rotate(tmp_path, capsys):
    repo = tmp_path / "repo"
    root_keys = tmp_path / "usb" / "root-keys"
    assert main(["repo", "init", str(repo), "--keys", "targets=2", "--threshold", "targets=2",
                 "--expiry", "timestamp=0.5", "--root-key-dir", str(root_keys)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1.root.json" in out
    # root keys live apart from the online keys, nothing secret is in the served folder
    assert len(list(root_keys.glob("*.pem"))) == 1
    assert len(list((repo / "keys" / "online").glob("*.pem"))) == 4
    assert not list((repo / "repository").rglob("*.pem"))
    assert all(oct(p.stat().st_mode)[-3:] == "600" for p in root_keys.glob("*.pem"))

    model = classifier(tmp_path / "model.onnx", seed=2)
    np.savez(tmp_path / "golden.npz", x=np.ones((2, 4), np.float32))
    args = ["model", "add", str(repo), str(model), "--name", "classifier", "--version", "2",
            "--group", "kitchen", "--golden", str(tmp_path / "golden.npz"),
            "--latency-budget-ms", "50"]  # fmt: skip
    assert main(args) == 0
    assert "published classifier 2 (seq 2) for kitchen" in capsys.readouterr().out
    assert main(args) == 1, "the same version twice is refused"
    assert "already published" in capsys.readouterr().err
    assert main(["model", "list", str(repo)]) == 0
    assert "classifier" in capsys.readouterr().out

    timestamp = repo / "repository" / "metadata" / "timestamp.json"
    before = json.loads(timestamp.read_text())["signed"]["version"]
    assert main(["repo", "refresh", str(repo), "--root-key-dir", str(root_keys)]) == 0
    assert json.loads(timestamp.read_text())["signed"]["version"] == before + 1

    # rotating root needs the root keys: refused without them, fine with them
    assert main(["rotate-key", "root", "--repo", str(repo)]) == 1
    assert "root" in capsys.readouterr().err
    assert main(["rotate-key", "root", "--repo", str(repo), "--root-key-dir", str(root_keys)]) == 0
    assert (repo / "repository" / "metadata" / "2.root.json").exists()


def test_repo_serve_serves_what_a_device_verifies(tmp_path):
    repo = tmp_path / "repo"
    assert main(["repo", "init", str(repo)]) == 0
    assert main(["model", "add", str(repo), str(classifier(tmp_path / "m.onnx")),
                 "--name", "classifier", "--version", "7"]) == 0  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "updater.inferctl", "repo", "serve", str(repo), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert "serving" in proc.stdout.readline()
        client = RepositoryClient(
            f"http://127.0.0.1:{port}/",
            repo / "repository" / "metadata" / "1.root.json",
            tmp_path / "state",
            max_download_bytes=10**6,
        )
        (offer,) = client.check(["classifier"], [])
        assert offer.meta.version == "7"
        path = client.download(offer.path, offer.target)
        assert path.read_bytes() == (tmp_path / "m.onnx").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def _retained(b: Broker, topic: str, timeout: float = 5.0) -> bytes | None:
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c, _u, msg):
        got.append(msg.payload)
        done.set()

    c.on_message = on_message
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.connect(b.host, b.port)
    c.loop_start()
    done.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else None


def test_push_leaves_a_retained_poke_for_the_group_or_device(broker: Broker) -> None:
    where = f"{broker.host}:{broker.port}"
    assert main(["push", "--group", "kitchen", "--broker", where]) == 0
    assert main(["push", "--device", "pi-01", "--broker", where]) == 0
    for topic in ("inferd/groups/kitchen/update", "inferd/pi-01/cmd/check-update"):
        payload = _retained(broker, topic)
        assert payload is not None, topic
        assert "ts" in json.loads(payload)


def test_status_lists_devices_from_retained_status(broker: Broker, capsys) -> None:
    status = {
        "state": "online",
        "device": "pi-01",
        "models": [{"name": "classifier", "version": "3", "update_state": "trial"}],
    }
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish("inferd/pi-01/status", json.dumps(status), qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    where = f"{broker.host}:{broker.port}"
    assert main(["status", "--broker", where, "--wait", "0.5"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("pi-01")]
    assert row and row[0].split() == ["pi-01", "online", "classifier", "3", "trial"]


def test_push_to_an_unreachable_broker_is_one_clear_line(capsys):
    assert main(["push", "--group", "g", "--broker", f"127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the broker" in err[0]
