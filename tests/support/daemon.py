"""Run a real ``inferd run`` process and talk to it over HTTP.

``start_daemon(tmp, config)`` writes the config (a dict; state_dir and api.listen filled in when
absent), starts the daemon, waits until /v2/health/ready answers and returns a handle;
``DaemonProc.stop`` sends SIGTERM and returns the exit code. ``v2_inputs`` and ``v2_outputs``
turn numpy arrays into a v2 JSON request's tensors and a response's tensors back into arrays;
``infer_demo`` sends one request with an id to the demo model on an open connection.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from runtime.tensors import NUMPY_DTYPES, V2_DATATYPES
from tests.support.net import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[2]


def v2_inputs(feeds: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """The v2 JSON ``inputs`` of numpy ``feeds``, as a numpy-based client writes them."""
    return [
        {
            "name": name,
            "shape": list(x.shape),
            "datatype": V2_DATATYPES[x.dtype.name],
            "data": x.ravel().tolist(),
        }
        for name, x in feeds.items()
    ]


def infer_demo(conn: http.client.HTTPConnection, request_id: str) -> tuple[int, Any]:
    """POST one JSON request with ``request_id`` to the demo model (as ``demo``) on ``conn``
    (kept alive); (status, decoded body)."""
    body = {"id": request_id, "inputs": v2_inputs({"x": np.zeros((1, 8), np.float32)})}
    headers = {"Content-Type": "application/json"}
    conn.request("POST", "/v2/models/demo/infer", json.dumps(body).encode(), headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def v2_outputs(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The outputs of a decoded v2 JSON response, as arrays of their datatypes and shapes."""
    return {
        o["name"]: np.array(o["data"], dtype=NUMPY_DTYPES[o["datatype"]]).reshape(o["shape"])
        for o in body["outputs"]
    }


class DaemonProc:
    """A running daemon: its process, config path, state dir and an HTTP helper."""

    def __init__(
        self, proc: subprocess.Popen[bytes], config_path: Path, config: dict[str, Any], log: Path
    ):
        self.proc = proc
        self.log = log
        self.config_path = config_path
        self.config = config
        self.state_dir = Path(config["state_dir"])
        listen = config["api"]["listen"]
        host, _, port = listen.rpartition(":")
        self.host, self.port = (host, int(port)) if not listen.startswith("unix:") else ("", 0)
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """One request on a keep-alive connection; returns (status, decoded JSON or text)."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            self._conn.request(method, path, body=data, headers=headers)
            resp = self._conn.getresponse()
            payload = resp.read()
        except (ConnectionError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self._conn.close()
            self._conn = None
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(payload) if "json" in ctype else payload.decode()

    def infer(self, model: str, inputs: list[dict[str, Any]], **extra: Any) -> tuple[int, Any]:
        return self.request("POST", f"/v2/models/{model}/infer", {"inputs": inputs, **extra})

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            try:
                return self.request("GET", "/v2/health/ready")[0] == 200
            except OSError:
                self._conn = None
                raise

        wait_serving(self.proc, ready, "daemon", timeout, self.stderr, interval=0.05)

    def stop(self, timeout: float = 20.0) -> int:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("daemon did not stop on SIGTERM") from None
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def write_config(tmp: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("device_id", "test-device")
    cfg.setdefault("state_dir", str(tmp / "state"))
    cfg.setdefault("api", {}).setdefault("listen", f"127.0.0.1:{free_port()}")
    cfg.setdefault("mqtt", {}).setdefault("enabled", False)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def start_daemon(
    tmp: Path,
    config: dict[str, Any],
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    python: str | Path = sys.executable,
    timeout: float = 20.0,
) -> DaemonProc:
    """Start ``inferd run`` with ``config`` in ``python`` (this checkout's code, from its root);
    its stderr goes to ``tmp/daemon.log``. With ``wait``, ready within ``timeout`` s or ended."""
    path, cfg = write_config(tmp, config)
    log = open(tmp / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(
        [str(python), "-m", "agent.cli", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    log.close()
    daemon = DaemonProc(proc, path, cfg, tmp / "daemon.log")
    if wait:
        try:
            daemon.wait_ready(timeout)
        except AssertionError:
            with contextlib.suppress(AssertionError):
                daemon.stop()
            raise
    return daemon


@contextmanager
def running_daemon(
    tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None
) -> Iterator[DaemonProc]:
    daemon = start_daemon(tmp, config, env)
    try:
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, f"daemon exited {code}: {daemon.stderr()}"
