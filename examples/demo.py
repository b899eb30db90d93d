"""The end-to-end demo: an agent serving the bundled model, telemetry on MQTT, a signed update.

Run it through ``bash scripts/demo.sh`` (which prepares .venv). Everything lives under
``demo-state/`` in the checkout and every process it starts is stopped at the end. Steps:

 1. a broker: the one on 127.0.0.1:1883 when it answers (unless --private-broker), else a
    private mosquitto on a free port, else (no mosquitto) the pure-Python amqtt (MQTT 3.1.1)
 2. a TUF repository signed with fresh keys (``inferctl repo init``), served over HTTP
 3. ``inferd run`` serving examples/models/demo.onnx as version 1 of slot ``classifier``
 4. a few inference requests over HTTP, checked against the model's golden output
 5. the device's telemetry, read back from the broker (status, metrics, predictions, events)
 6. version 2 signed into the repository and pushed (``inferctl model add`` + ``inferctl push``)
 7. the device verifying, validating and swapping it in while requests keep flowing

From step 3 on, the operator's console (``inferctl console``) serves a live page of the fleet;
its URL is printed (open it while the demo runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
BIN = Path(sys.executable).parent
DEVICE = "demo-device"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(what: str, check, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise SystemExit(f"demo: timed out waiting for {what}")


@contextmanager
def process(argv: list[str], log: Path, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process for the duration of the block; stopped by its pid at the end."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **kw,  # type: ignore[call-overload]
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def broker(stack: ExitStack, state: Path, private: str | None) -> tuple[str, int, str]:
    """(host, port, MQTT protocol) of the broker the demo uses, starting one when needed."""
    if private is None and port_open("127.0.0.1", 1883):
        print("using the broker on 127.0.0.1:1883")
        return "127.0.0.1", 1883, "5"
    port = free_port()
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if Path(exe).exists() and private != "amqtt":
        conf = state / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        argv, name, protocol = [exe, "-c", str(conf)], "mosquitto", "5"
    elif (BIN / "amqtt").exists():
        # scripts/setup.sh installs the pure-Python amqtt broker where mosquitto could not be
        # installed; it speaks MQTT 3.1.1 only, so the demo's clients use that.
        conf = state / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        argv, name, protocol = [str(BIN / "amqtt"), "-c", str(conf)], "amqtt", "3.1.1"
    else:
        raise SystemExit("demo: no broker on 127.0.0.1:1883, and neither mosquitto nor amqtt")
    stack.enter_context(process(argv, state / f"{name}.log"))
    wait_for("the private broker", lambda: port_open("127.0.0.1", port))
    print(f"started a private {name} on 127.0.0.1:{port} (MQTT {protocol})")
    return "127.0.0.1", port, protocol


def inferctl(*args: str) -> str:
    res = subprocess.run(
        [str(BIN / "inferctl"), *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise SystemExit(f"demo: inferctl {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def _ms(value: float | None) -> str:
    """A latency for people: two decimals, or "-" before the first report."""
    return "-" if value is None else f"{value:.2f} ms"


def http_json(url: str, body: object | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - the demo only talks to localhost
        url, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - localhost
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Telemetry:
    """Collects what the device publishes under inferd/demo-device/#."""

    def __init__(self, host: str, port: int, protocol: str) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="inferd-demo-viewer",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"inferd/{DEVICE}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self.messages.append((msg.topic, json.loads(msg.payload)))
        except ValueError:
            self.messages.append((msg.topic, {"raw": msg.payload.decode(errors="replace")}))

    def latest(self, leaf: str) -> dict | None:
        for topic, payload in reversed(self.messages):
            if topic.endswith("/" + leaf):
                return payload
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description="inferd end-to-end demo")
    parser.add_argument("--state", default=str(ROOT / "demo-state"), help="work folder")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--private-broker",
        nargs="?",
        const="auto",
        choices=["auto", "mosquitto", "amqtt"],
        help="start a private broker even when 127.0.0.1:1883 answers (leaves nothing there);"
        " auto: mosquitto when installed, else amqtt",
    )
    args = parser.parse_args()
    state = Path(args.state).resolve()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    with ExitStack() as stack:
        say("1. broker")
        host, port, protocol = broker(stack, state, args.private_broker)
        on_broker = ["--broker", f"{host}:{port}", "--protocol", protocol]

        say("2. signed model repository (TUF)")
        repo = state / "repo"
        inferctl("repo", "init", str(repo))
        repo_port = free_port()
        stack.enter_context(
            process(
                [str(BIN / "inferctl"), "repo", "serve", str(repo), "--port", str(repo_port)],
                state / "repo-server.log",
            )
        )
        wait_for("the repository server", lambda: port_open("127.0.0.1", repo_port))
        print(f"repository {repo} served on http://127.0.0.1:{repo_port}/")

        say("3. the agent")
        api_port = free_port()
        config = {
            "device_id": DEVICE,
            "groups": ["demo"],
            "state_dir": str(state / "device"),
            "models": [
                {
                    "name": "classifier",
                    "path": str(MODELS / "demo.onnx"),
                    "version": "1",
                    "labels": ["idle", "walking", "running"],
                }
            ],
            "api": {"listen": f"127.0.0.1:{api_port}"},
            "mqtt": {"host": host, "port": port, "protocol": protocol},
            "telemetry": {"metrics_interval_s": 1, "prediction_batch_ms": 200},
            "updates": {
                "repository_url": f"http://127.0.0.1:{repo_port}/",
                "trusted_root": str(repo / "repository" / "metadata" / "1.root.json"),
                "poll_interval_s": 30,
                "check_on_start": False,
                "trial_window_s": 3,
                "trial_min_requests": 10,
            },
        }
        cfg_path = state / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        telemetry = Telemetry(host, port, protocol)
        stack.callback(telemetry.close)
        stack.enter_context(
            process(
                [str(BIN / "inferd"), "run", "--config", str(cfg_path)],
                state / "agent.log",
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
        base = f"http://127.0.0.1:{api_port}"

        def ready() -> bool:
            try:
                return http_json(base + "/v2/health/ready")[0] == 200
            except OSError:
                return False

        wait_for("the agent to be ready", ready)
        print(f"agent ready on {base} (log: {state / 'agent.log'})")

        console_port = free_port()
        console = f"http://127.0.0.1:{console_port}"
        stack.enter_context(
            process(
                [str(BIN / "inferctl"), "console", *on_broker, "--repo", str(repo),
                 "--listen", f"127.0.0.1:{console_port}", "--plot-bucket", "2"],
                state / "console.log",
            )
        )  # fmt: skip

        def console_sees_the_agent() -> bool:
            try:
                _, seen = http_json(console + "/api/state")
            except OSError:
                return False
            return any(d["device"] == DEVICE and d["online"] for d in seen["devices"])

        wait_for("the console to show the agent", console_sees_the_agent)
        print(f"operator console: {console}/ (open it while the demo runs)")

        say("4. inference over the local v2 API")
        golden = np.load(MODELS / "demo.golden.npz")
        x = golden["x"]
        print(
            "curl -s -H 'Content-Type: application/json' "
            f'-d \'{{"inputs":[{{"name":"x","shape":[1,8],"datatype":"FP32",'
            f'"data":{json.dumps([round(float(v), 3) for v in x[0]])}}}]}}\' '
            f"{base}/v2/models/classifier/infer"
        )
        body = {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        status, reply = http_json(base + "/v2/models/classifier/infer", body)
        probs = np.array(reply["outputs"][0]["data"]).reshape(x.shape[0], 3)
        assert status == 200 and np.allclose(probs, golden["probs"], rtol=1e-5), reply
        print(f"-> version {reply['model_version']}, {len(probs)} rows, matches the golden output")
        for i in range(args.requests):
            http_json(
                base + "/v2/models/classifier/infer",
                {
                    "id": f"demo-{i}",
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, 8],
                            "datatype": "FP32",
                            "data": x[i % len(x)].tolist(),
                        }
                    ],
                },
            )
        print(f"sent {args.requests} more requests")

        say("5. telemetry on MQTT (what a dashboard subscribed to inferd/# sees)")
        wait_for("metrics", lambda: telemetry.latest("metrics"), timeout=15)
        wait_for("predictions", lambda: telemetry.latest("predictions"), timeout=15)
        for leaf in ("status", "metrics", "predictions", "events"):
            payload = telemetry.latest(leaf)
            text = json.dumps(payload)[:300] if payload else "(none yet)"
            print(f"inferd/{DEVICE}/{leaf}: {text}")
        # Keep some traffic flowing so the table has live latency and request rate to show.
        busy = threading.Event()

        def traffic() -> None:
            body = {
                "inputs": [
                    {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x[1].tolist()}
                ]
            }
            while not busy.is_set():
                http_json(base + "/v2/models/classifier/infer", body)
                busy.wait(0.01)

        sender = threading.Thread(target=traffic, name="demo-traffic")
        sender.start()
        try:
            print(inferctl("watch", *on_broker, "--once", "--wait", "2.5"))
        finally:
            busy.set()
            sender.join()

        say("6. sign version 2 and push it to group 'demo'")
        golden2 = MODELS / "demo-v2.golden.npz"
        inferctl(
            "model",
            "add",
            str(repo),
            str(MODELS / "demo-v2.onnx"),
            "--name",
            "classifier",
            "--version",
            "2",
            "--group",
            "demo",
            "--golden",
            str(golden2),
            "--latency-budget-ms",
            "50",
        )
        pushed = time.monotonic()
        inferctl("push", *on_broker, "--group", "demo")
        print("pushed: a retained poke on inferd/groups/demo/update")

        say("7. the device verifies, validates and swaps while serving")
        served: set[str] = set()
        failures = 0

        def serving_v2() -> bool:
            nonlocal failures
            status, reply = http_json(
                base + "/v2/models/classifier/infer",
                {
                    "inputs": [
                        {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x[0].tolist()}
                    ]
                },
            )
            if status != 200:
                failures += 1
                return False
            served.add(reply["model_version"])
            return reply["model_version"] == "2"

        wait_for("version 2 to serve", serving_v2, timeout=60, interval=0.02)
        took = time.monotonic() - pushed
        print(
            f"version 2 serving {took:.2f} s after the push;"
            f" versions seen {sorted(served)}, failed requests {failures}"
        )

        def update_events() -> list[str]:
            return [
                p.get("message", "")
                for t, p in list(telemetry.messages)
                if t.endswith("/events") and p.get("kind") == "update"
            ]

        def committed() -> bool:
            serving_v2()  # keep traffic flowing through the trial window
            time.sleep(0.05)
            return any("-> committed" in m for m in update_events())

        wait_for("the trial to commit version 2", committed, timeout=60)
        for message in update_events():
            print(f"  event update: {message}")
        print(f"version 2 committed after its trial; failed requests throughout: {failures}")
        print(inferctl("status", *on_broker))
        _, seen = http_json(console + "/api/state")
        (row,) = [d for d in seen["devices"] if d["device"] == DEVICE]
        model = row["models"]["classifier"]
        print(
            f"the console ({console}/) shows {DEVICE}: online {row['online']}, classifier "
            f"{model['version']} {model['update_state']}, p50 {_ms(model['p50_ms'])}"
        )
        print("\ndemo complete: everything it started is being stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
