"""Request framing attacks against a real ApiServer: each gets its 4xx/5xx, exactly one
response, and the bytes after it never run as a second request (issue 13, "Request framing")."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.security.rawhttp import Front, serving

# A request that would be observable if it ran: the recording feedback hook sees it.
SMUGGLED = (
    b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
N = str(len(SMUGGLED)).encode()
POST = b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\n"


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    with serving(tmp_path, max_body_bytes=4096, max_header_bytes=2048) as f:
        yield f


@pytest.mark.parametrize(
    ("name", "attack", "status"),
    [
        ("non-ASCII digit length", POST + b"Content-Length: \xb2\r\n\r\n", 400),
        (
            "two different lengths",
            POST + b"Content-Length: 2\r\nContent-Length: " + N + b"\r\n\r\n{}",
            400,
        ),
        ("two equal lengths", POST + b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
        (
            "gzip, chunked with a length",
            POST + b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 0\r\n\r\n",
            400,
        ),
        (
            "length with gzip, chunked",
            POST + b"Content-Length: 0\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            400,
        ),
        ("gzip, chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        ("gzip", POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
        ("chunked, gzip", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 501),
        (
            "chunked with a length",
            POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            400,
        ),
        (
            "GET with a body",
            b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nContent-Length: " + N + b"\r\n\r\n",
            400,
        ),
        (
            "HEAD with a body",
            b"HEAD /v2/health/live HTTP/1.1\r\nHost: HOST\r\nContent-Length: " + N + b"\r\n\r\n",
            400,
        ),
        (
            "GET with a chunked body",
            b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            "folded header",
            b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nX-A: a\r\n b\r\n\r\n",
            400,
        ),
        ("bare LF", b"GET /v2/health/live HTTP/1.1\nHost: HOST\n\n", 400),
        ("HTTP/1.7", b"GET /v2/health/live HTTP/1.7\r\nHost: HOST\r\n\r\n", 505),
        ("HTTP/2.0 text", b"GET /v2/health/live HTTP/2.0\r\nHost: HOST\r\n\r\n", 505),
        ("no Host", b"GET /v2/health/live HTTP/1.1\r\n\r\n", 400),
        ("two Hosts", b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nHost: HOST\r\n\r\n", 400),
        ("negative length", POST + b"Content-Length: -1\r\n\r\n", 400),
        ("plus sign length", POST + b"Content-Length: +2\r\n\r\n{}", 400),
        ("bad chunk size", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        ("unknown method", b"BREW /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n", 501),
        ("WebDAV method", b"PROPFIND /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n", 501),
        ("not HTTP", b"GARBAGE\r\n\r\n", 400),
        (
            "header bytes",
            b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nX: " + b"a" * 3000 + b"\r\n\r\n",
            431,
        ),
        ("long target", b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: HOST\r\n\r\n", 414),
        ("body over the cap", POST + b"Content-Length: 5000\r\n\r\n" + b"x" * 5000, 413),
        (
            "chunked body over the cap",
            POST
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"1000\r\n"
            + b"x" * 4096
            + b"\r\n"
            + b"10\r\n"
            + b"x" * 16
            + b"\r\n0\r\n\r\n",
            413,
        ),
        (
            "control byte in a value",
            b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nX: a\x01b\r\n\r\n",
            400,
        ),
    ],
)
def test_framing_attack_gets_one_refusal_and_nothing_runs_after_it(
    front: Front, name: str, attack: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    replies = front.request(attack + SMUGGLED)
    assert [r.status for r in replies] == [status], f"{name}: {replies}"
    reply = replies[0]
    assert reply.headers.get("connection") == "close", "the connection ends after a refusal"
    assert "error" in json.loads(reply.body)
    assert "date" in reply.headers
    assert front.feedback_calls == [], f"{name}: the trailing request ran"
    assert front.get_ok(), "the server keeps serving"
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"


def test_chunked_request_body_is_accepted(front: Front) -> None:
    x = np.load(front_golden())["x"][:1]
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 50]), body[i : i + 50]) for i in range(0, len(body), 50)
    )
    head = POST + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
    replies = front.request(head + chunks + b"0\r\n\r\n")
    assert [r.status for r in replies] == [200]
    assert json.loads(replies[0].body)["outputs"][0]["shape"] == [1, 3]


def front_golden() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "models" / "demo.golden.npz"


def test_pipelined_requests_get_one_response_each_in_order(front: Front) -> None:
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n"
    ready = b"GET /v2/models/demo/ready HTTP/1.1\r\nHost: HOST\r\n\r\n"
    replies = front.request(get + ready + SMUGGLED + get)
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert json.loads(replies[1].body) == {"name": "demo", "ready": True}
    assert front.feedback_calls == [("demo", b"{}")], "a well-framed pipelined request runs once"


def test_head_405_allow_and_date(front: Front) -> None:
    head = front.request(b"HEAD /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n")
    assert [r.status for r in head] == [200]
    assert head[0].body == b"" and int(head[0].headers["content-length"]) == len(b'{"live":true}')
    for method in (b"DELETE", b"PUT", b"OPTIONS"):
        (reply,) = front.request(method + b" /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\n\r\n")
        assert reply.status == 405 and reply.headers["allow"] == "POST"
    (reply,) = front.request(
        b"POST /v2/health/live HTTP/1.1\r\nHost: HOST\r\nContent-Length: 0\r\n\r\n"
    )
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert reply.headers["date"].endswith(" GMT")


def test_connection_header_is_a_token_list(front: Front) -> None:
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\nConnection: keep-alive, close\r\n\r\n"
    replies = front.request(get + get)
    assert [r.status for r in replies] == [200], "close in a list ends the connection"
    assert replies[0].headers["connection"] == "close"
    keep = b"GET /v2/health/live HTTP/1.0\r\nConnection: Upgrade, Keep-Alive\r\n\r\n"
    replies = front.request(keep + keep)
    assert [r.status for r in replies] == [200, 200]
    assert replies[0].headers["connection"] == "keep-alive"


def test_a_500_never_echoes_the_exception(front: Front, caplog: pytest.LogCaptureFixture) -> None:
    def broken(model: str, body: bytes) -> dict[str, int]:
        raise RuntimeError("secret detail at /var/lib/inferd/spool.db")

    front.api.feedback = broken
    replies = front.request(
        b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert [r.status for r in replies] == [500]
    assert b"secret" not in replies[0].body and b"/var/lib" not in replies[0].body
    assert "secret detail" in caplog.text, "the daemon log keeps the detail"


@pytest.mark.parametrize(
    ("name", "body", "fragment"),
    [
        (
            "100k-deep JSON",
            b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}]}",
            "nested too deeply",
        ),
        (
            "100 dimensions",
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1] * 100, "datatype": "FP32", "data": [0]}]}
            ).encode(),
            "100 dimensions",
        ),
        (
            "1 MB id",
            json.dumps(
                {
                    "id": "i" * 1_000_000,
                    "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}],
                }
            ).encode(),
            "id is 1000000 characters",
        ),
        (
            "nan strings",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, 8],
                            "datatype": "FP32",
                            "data": ["nan"] * 4 + ["inf"] * 4,
                        }
                    ]
                }
            ).encode(),
            "NaN or infinite",
        ),
        (
            "out of FP32 range",
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1e39] * 8}]}
            ).encode(),
            "NaN or infinite",
        ),
    ],
)
def test_input_limits_are_400_not_500(
    tmp_path: Path, name: str, body: bytes, fragment: str
) -> None:
    with serving(tmp_path) as front:
        replies = front.request(
            POST
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        assert [r.status for r in replies] == [400], name
        assert fragment in json.loads(replies[0].body)["error"]
        assert front.get_ok()


def test_deep_feedback_json_is_400(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real feedback parser behind the route: 100k-deep labels are a 400, not a traceback."""
    from telemetry.quality.feedback import parse_feedback

    body = b'{"id": "r1", "labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with serving(tmp_path) as front:
        front.api.feedback = lambda model, body: {"items": len(parse_feedback(body))}
        replies = front.request(
            b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
    assert [r.status for r in replies] == [400]
    assert "nested too deeply" in json.loads(replies[0].body)["error"]
    assert not [r for r in caplog.records if r.exc_info]
