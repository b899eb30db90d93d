"""A real Prometheus server for a test, and a reader of the text exposition format.

``PrometheusServer`` runs the Debian package's ``/usr/bin/prometheus`` on a free loopback port
with its own config and TSDB directory, scraping the given targets every second; it is stopped
by its pid. ``parse_exposition`` reads ``/metrics`` text into samples (enough of format 0.0.4
for the agent's output: comments, labels with escapes, one value per line).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.support.net import end_process, free_port, wait_serving

BINARY = "/usr/bin/prometheus"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)",?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def available() -> str | None:
    """None when a Prometheus binary is there, else why a test must skip."""
    if shutil.which(BINARY) is None:
        return f"{BINARY} is missing: apt-get install prometheus (Debian package)"
    return None


def parse_exposition(text: str) -> dict[str, Any]:
    """``{"types": {family: kind}, "samples": [(name, {label: value}, float)]}``; raises
    ValueError on a line that is not a comment or a sample."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(maxsplit=3)
            if len(parts) == 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"not an exposition line: {line!r}")
        pairs = {
            lm["key"]: re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], lm["value"])
            for lm in _LABEL.finditer(m["labels"] or "")
        }
        samples.append((m["name"], pairs, float(m["value"])))
    return {"types": types, "samples": samples}


class PrometheusServer:
    """``/usr/bin/prometheus`` scraping ``targets`` (host:port) every second."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "inferd", "static_configs": [{"targets": targets}]},
            ],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    BINARY,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200

        wait_serving(self.proc, ready, "prometheus", timeout, self.logs)

    def api(self, path: str, **params: str) -> Any:
        """``data`` of an HTTP API answer (``/api/v1/...``); AssertionError when not success."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector (``result``) of a PromQL query."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to this server's own pid, then wait (SIGKILL after 20 s)."""
        end_process(self.proc, grace=20)
