"""Browser CSRF and DNS rebinding against the loopback API, and the bearer token off loopback
(issue 13, "Browser CSRF"): a web page open on the device must not reach the API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from agent.config import parse_config
from runtime.errors import ConfigError
from tests.security.rawhttp import serving

FEEDBACK = b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\n"
LABEL = b'{"id": "r1", "label": 1}'


def post_feedback(content_type: bytes | None, extra: bytes = b"") -> bytes:
    ctype = b"Content-Type: " + content_type + b"\r\n" if content_type is not None else b""
    return FEEDBACK + ctype + extra + b"Content-Length: %d\r\n\r\n" % len(LABEL) + LABEL


@pytest.mark.parametrize(
    ("content_type", "extra", "status"),
    [
        (b"text/plain;charset=UTF-8", b"", 415),  # what fetch(no-cors) sends
        (b"application/x-www-form-urlencoded", b"", 415),  # an HTML form
        (b"multipart/form-data; boundary=x", b"", 415),
        (b"application/octet-stream", b"", 415),  # binary without the extension's header
        (b"application/json", b"", 200),
        (b"Application/JSON; charset=utf-8", b"", 200),
        (None, b"", 200),
    ],
)
def test_post_bodies_must_be_json_or_binary(
    tmp_path: Path, content_type: bytes | None, extra: bytes, status: int
) -> None:
    with serving(tmp_path) as front:
        (reply,) = front.request(post_feedback(content_type, extra))
        assert reply.status == status, reply
        assert len(front.feedback_calls) == (1 if status == 200 else 0)


def test_binary_extension_content_type_passes(tmp_path: Path) -> None:
    import numpy as np

    x = np.zeros((1, 8), "<f4")
    head = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32",
                     "parameters": {"binary_data_size": 32}}]}
    ).encode()  # fmt: skip
    body = head + x.tobytes()
    with serving(tmp_path) as front:
        (reply,) = front.request(
            b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(head), len(body))
            + body
        )
        assert reply.status == 200, reply


@pytest.mark.parametrize(
    ("host", "status"),
    [
        (b"HOST", 200),
        (b"localhost:PORT", 200),
        (b"127.0.0.1:PORT", 200),
        (b"[::1]:PORT", 200),
        (b"LocalHost:PORT", 200),
        (b"attacker.example:PORT", 403),  # DNS rebinding: the page's own name
        (b"attacker.example", 403),
        (b"127.0.0.1:1", 403),
        (b"localhost", 403),
        (b"", 403),
    ],
)
def test_host_must_name_the_api(tmp_path: Path, host: bytes, status: int) -> None:
    with serving(tmp_path) as front:
        host = host.replace(b"PORT", str(front.port).encode())
        (reply,) = front.request(post_feedback(b"application/json").replace(b"HOST", host, 1))
        assert reply.status == status, reply
        assert len(front.feedback_calls) == (1 if status == 200 else 0)


def test_origin_must_be_allowed(tmp_path: Path) -> None:
    evil = b"Origin: http://attacker.example\r\n"
    with serving(tmp_path) as front:
        (reply,) = front.request(post_feedback(b"application/json", evil))
        assert reply.status == 403 and b"attacker.example" in reply.body
        (reply,) = front.request(post_feedback(b"application/json", b"Origin: null\r\n"))
        assert reply.status == 403
        assert front.feedback_calls == []
    with serving(tmp_path, allowed_origins=["http://localhost:3000"]) as front:
        ok = b"Origin: http://localhost:3000\r\n"
        assert front.request(post_feedback(b"application/json", ok))[0].status == 200
        assert front.request(post_feedback(b"application/json", evil))[0].status == 403
        assert len(front.feedback_calls) == 1


def test_bearer_token_from_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123456789abcdef\n")
    with serving(tmp_path, token_file=str(token_file)) as front:
        (reply,) = front.request(post_feedback(b"application/json"))
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
        wrong = b"Authorization: Bearer 0123456789abcdef0123456789abcdee\r\n"
        assert front.request(post_feedback(b"application/json", wrong))[0].status == 401
        right = b"Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n"
        assert front.request(post_feedback(b"application/json", right))[0].status == 200
        assert len(front.feedback_calls) == 1
        # probes (the daemon's own watchdog among them) need no token
        assert front.get_ok()
        (meta,) = front.request(b"GET /v2/models/demo HTTP/1.1\r\nHost: HOST\r\n\r\n")
        assert meta.status == 401


def test_off_loopback_needs_a_token_or_insecure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"state_dir": str(tmp_path), "models": [{"name": "m", "path": "m.onnx"}]}
    with pytest.raises(ConfigError, match=r"listen 0\.0\.0\.0:8080 .*token_file.* at `\$\.api`"):
        parse_config({**base, "api": {"listen": "0.0.0.0:8080"}}, environ={})
    parse_config({**base, "api": {"listen": "0.0.0.0:8080", "token_file": "t"}}, environ={})
    with pytest.raises(ConfigError, match="allowed_origins"):
        parse_config({**base, "api": {"allowed_origins": ["localhost:3000"]}}, environ={})
    caplog.set_level(logging.WARNING)
    with serving(tmp_path, listen="0.0.0.0:0", insecure=True) as front:
        assert front.get_ok()
    assert "api.insecure is set" in caplog.text
