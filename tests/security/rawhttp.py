"""Raw HTTP for the front-door attack tests: a real ApiServer on a free port, bytes in, responses
counted out (a client library would refuse to send most of these requests, or hide a second
response)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from agent.api.server import ApiServer
from agent.config import ApiConfig, ModelConfig
from agent.slots import ModelSlot

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "models" / "demo.onnx"


class RawResponse(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes


class Front:
    """A running ApiServer with the demo model and a feedback hook that records its calls:
    a smuggled feedback request shows up in ``feedback_calls``."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        address = api.address
        assert isinstance(address, tuple)
        self.host, self.port = address
        self.feedback_calls: list[tuple[str, bytes]] = []

    @property
    def host_header(self) -> bytes:
        return f"{self.host}:{self.port}".encode()

    def request(self, raw: bytes, timeout: float = 5.0) -> list[RawResponse]:
        """Send ``raw`` (``HOST`` in it becomes this server's address), half-close, and read
        every response until the server closes; a server that neither answers nor closes
        within ``timeout`` fails the test."""
        return parse_responses(self.exchange(raw, timeout))

    def exchange(self, raw: bytes, timeout: float = 5.0) -> bytes:
        raw = raw.replace(b"HOST", self.host_header)
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            return read_to_eof(s, timeout)

    def get_ok(self) -> bool:
        """The server still answers a plain health check."""
        replies = self.request(b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n")
        return len(replies) == 1 and replies[0].status == 200


def read_to_eof(s: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    out = b""
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no EOF within {timeout}s; got {out[:300]!r}") from None
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def parse_responses(data: bytes) -> list[RawResponse]:
    """Every complete response in ``data`` (framed by Content-Length, as this server sends)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"a truncated response head: {data[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        assert parts[0] == "HTTP/1.1", f"not a status line: {lines[0]!r}"
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} sent twice"
            headers[name.lower()] = value.strip()
        if status == 100:
            data = rest
            continue
        length = int(headers["content-length"])
        if not rest or rest.startswith(b"HTTP/1.1 "):
            length = 0  # an answer to HEAD: the length of a body not sent (ours never start so)
        out.append(RawResponse(status, headers, rest[:length]))
        data = rest[length:]
    return out


@contextmanager
def serving(tmp: Path, **api: Any) -> Iterator[Front]:
    """An ApiServer for the demo model on a free loopback port, with ``api`` config keys."""
    slot = ModelSlot(ModelConfig(name="demo", path=str(DEMO)), cache_dir=tmp / "cache")
    slot.swap(slot.load(DEMO, "1"))
    server = ApiServer(ApiConfig(**{"listen": "127.0.0.1:0", **api}), {"demo": slot})
    front: Front | None = None

    def feedback(model: str, body: bytes) -> Mapping[str, Any]:
        assert front is not None
        front.feedback_calls.append((model, body))
        return {"accepted": 1}

    server.feedback = feedback
    server.start()
    front = Front(server)
    try:
        yield front
    finally:
        server.stop()
        slot.close()
