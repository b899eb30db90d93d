"""A private RabbitMQ node with its MQTT plugin (free ports, files in tmp), ended by its pid.

Everything the node uses is private: its name, AMQP, distribution and MQTT ports, its own epmd
(started here, on a free port, and ended here), mnesia, logs, plugins file and Erlang cookie
(``HOME``). The system's RabbitMQ, if any, is not touched. Starting takes 5-10 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.nats import mqtt_ready
from tests.support.net import free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = shutil.which("epmd") or next(iter(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")), None)


class RabbitNode:
    """``start()``/``kill()``; ``host``/``port`` are the MQTT listener's."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.where = f"{self.host}:{self.port}"
        self.amqp_port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.name = f"inferdtest{uuid.uuid4().hex[:6]}@localhost"
        self.log = workdir / "rabbitmq.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n"
            "log.console = true\nlog.file = false\n"
        )
        (d / "advanced.config").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")
        env = {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
        }
        # our own epmd in the foreground, so that it is ours to end (the node would otherwise
        # start a daemonised one that outlives it)
        assert EPMD is not None
        self.epmd = subprocess.Popen(
            [str(EPMD), "-port", str(self.epmd_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [RABBITMQ_SERVER],
                env=env,
                cwd=d,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the node and its helpers: one group, ours to end
            )
        deadline = time.monotonic() + timeout
        while not mqtt_ready(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this node leads, nothing else
            self.proc.wait()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait()
