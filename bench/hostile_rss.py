"""RSS under hostile load: the figure ``MemoryMax=`` in ``systemd/inferd.service`` comes from.

One ``inferd run`` with a 1024-input classifier, a real mosquitto and the default limits except
``api.max_body_bytes`` (4 MiB here, so the run takes a minute; every bound below scales with it):
  baseline  RSS after 200 small requests (same daemon, same run)
  join      the label join filled to ``quality.join_max_bytes`` (held outputs, 256-char ids)
  hostile   1,000 maximum-size requests: 8 HTTP clients at once (``api.workers``) sending
            bodies of ``api.max_body_bytes``, plus bursts of maximum-size MQTT requests that fill
            the inbox and the inference queue; the peak RSS (VmHWM) and the RSS after are read
The gated row: peak RSS stays under the documented bound for this configuration (README,
"Limits and security"); the unit's MemoryMax= is that bound scaled to the default 16 MiB bodies.
Usage: python -m bench.hostile_rss [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench._checks import gated, info, report
from tests.support import models
from tests.support.broker import Broker, publisher
from tests.support.daemon import DaemonProc, start_daemon

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
BODY = 4 * MB
FEATURES = 1024
REQUESTS = 1000
BOUND_MB = 600
"""Documented peak RSS for this configuration (README "Limits and security")."""


def unit_malloc_env() -> dict[str, str]:
    """The allocator settings the systemd unit gives the daemon (measured as it runs there)."""
    env = {}
    for line in (ROOT / "systemd" / "inferd.service").read_text().splitlines():
        if line.startswith("Environment="):
            for pair in line[len("Environment=") :].split():
                key, _, value = pair.partition("=")
                if key.startswith("MALLOC_"):
                    env[key] = value
    return env


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def max_size_body(rid: str) -> bytes:
    """A valid request just under BODY bytes: as many 1024-value rows as fit."""
    row = json.dumps([0.123456] * FEATURES)[1:-1]
    rows = (BODY - 200) // (len(row) + 1)
    data = ",".join([row] * rows)
    head = f'{{"id": "{rid}", "inputs": [{{"name": "x", "shape": [{rows}, {FEATURES}], '
    body = (head + f'"datatype": "FP32", "data": [{data}]}}]}}').encode()
    assert len(body) <= BODY, len(body)
    return body


def small_body(rid: str, batch: int = 1) -> bytes:
    x = {
        "name": "x",
        "shape": [batch, FEATURES],
        "datatype": "FP32",
        "data": [0.5] * (FEATURES * batch),
    }
    return json.dumps({"id": rid, "inputs": [x]}).encode()


def post(d: DaemonProc, body: bytes) -> int:
    status, _ = d.request("POST", "/v2/models/clf/infer", raw=body)
    return int(status)


def mqtt_burst(broker: Broker, device: str, body: bytes, n: int) -> None:
    client = publisher(broker)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "replies/bench"
    infos = [
        client.publish(f"inferd/{device}/infer/clf", body, qos=1, properties=props)
        for _ in range(n)
    ]
    for i in infos:
        i.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "broker").mkdir()
        broker = Broker(tmp / "broker")
        broker.start()
        model = models.classifier(tmp / "clf.onnx", n_features=FEATURES, n_classes=FEATURES)
        config = {
            "device_id": "bench-hostile",
            "models": [{"name": "clf", "path": str(model)}],
            "api": {"max_body_bytes": BODY},
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "updates": {"enabled": False},
        }
        (tmp / "d").mkdir()
        env = unit_malloc_env()
        res["env"] = env
        d = start_daemon(tmp / "d", config, env=env)
        pid = d.proc.pid
        try:
            started = time.monotonic()
            for i in range(200):
                assert post(d, small_body(f"warm{i}")) == 200
            time.sleep(1.0)
            res["baseline_rss_mb"] = status_kb(pid, "VmRSS") / 1024

            # Fill the join: batches of 64 rows of 1024 outputs held (256 KiB each) under
            # ids of the maximum length, well past quality.join_max_bytes (32 MiB).
            for i in range(300):
                rid = f"{i:04d}" + "j" * 252
                assert post(d, small_body(rid, batch=64)) == 200
            time.sleep(1.0)
            res["join_rss_mb"] = status_kb(pid, "VmRSS") / 1024
            res["setup_s"] = time.monotonic() - started

            body = max_size_body("h" * 256)
            statuses: dict[int, int] = {}
            lock = threading.Lock()

            local = threading.local()

            def one(_: int) -> None:
                client = getattr(local, "client", None)
                if client is None:  # one keep-alive connection per client thread
                    client = local.client = DaemonProc(d.proc, d.config_path, d.config, d.log)
                code = post(client, body)
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(REQUESTS - 200)))
            res["http_peak_rss_mb"] = status_kb(pid, "VmHWM") / 1024
            for _ in range(5):  # 200 at the MQTT inbox and inference queue
                mqtt_burst(broker, "bench-hostile", body, 40)
            res["hostile_s"] = time.monotonic() - started
            res["statuses"] = statuses
            time.sleep(2.0)
            res["peak_rss_mb"] = status_kb(pid, "VmHWM") / 1024
            res["after_rss_mb"] = status_kb(pid, "VmRSS") / 1024
            fresh = DaemonProc(d.proc, d.config_path, d.config, d.log)  # d's connection idled out
            assert post(fresh, small_body("still-serving")) == 200
        finally:
            d.stop()
            broker.stop()

    checks = [
        gated(
            "RSS under hostile load (1,000 max-size requests, full join window), peak",
            f"<= {BOUND_MB} MB at 4 MiB bodies",
            f"{res['peak_rss_mb']:.0f} MB",
            f"after 200 small requests {res['baseline_rss_mb']:.0f} MB",
            res["peak_rss_mb"] <= BOUND_MB,
        ),
        info(
            "RSS after the hostile load",
            f"{res['after_rss_mb']:.0f} MB (join full: {res['join_rss_mb']:.0f} MB)",
            f"after 200 small requests {res['baseline_rss_mb']:.0f} MB",
        ),
    ]
    return report(res, checks, args.json)


if __name__ == "__main__":
    sys.exit(main())
