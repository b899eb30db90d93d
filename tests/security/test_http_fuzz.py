"""Hypothesis against the front door: random bytes and mutated valid requests never produce a
traceback in the server's log, a hang, or more responses than the input holds requests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.rawhttp import serving

INFER = b'{"inputs":[{"name":"x","shape":[1,8],"datatype":"FP32","data":[0,0,0,0,0,0,0,0]}]}'
VALID = [
    b"GET /v2/health/live HTTP/1.1\r\nHost: HOST\r\n\r\n",
    b"HEAD /v2/models/demo HTTP/1.1\r\nHost: HOST\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(INFER), INFER),
    b"POST /v2/models/demo/feedback HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"id"\r\n0\r\n\r\n',
    b"POST /v2/models/demo/infer HTTP/1.1\r\nHost: HOST\r\nExpect: 100-continue\r\n"
    b"Inference-Header-Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
]
TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\xb2", b"\xff", b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n",
    b"Host: HOST\r\n", b"Connection: close\r\n", b"HTTP/1.1", b"HTTP/1.7", b"GET", b"9" * 30,
    b"ffffffffffffffff\r\n", b"Expect: 100-continue\r\n", b"Origin: http://x\r\n", b"%", b"?",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "flip", "duplicate"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "duplicate":
            line_end = data.find(b"\r\n", pos)
            line_start = data.rfind(b"\r\n", 0, pos) + 2
            if line_end > line_start:
                data[line_end + 2 : line_end + 2] = data[line_start : line_end + 2]
    return bytes(data)


REQUESTS = st.one_of(
    mutated(), st.binary(max_size=300), st.lists(mutated(), max_size=3).map(b"".join)
)


def most_responses(data: bytes) -> int:
    """Responses the input can get at most: one per request line, and one refusal for what
    follows the last complete request (its body was shorter than the bytes sent, say)."""
    return data.count(b"HTTP/1.") + 1


def test_fuzzed_requests_never_crash_hang_or_answer_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with serving(tmp_path, max_body_bytes=4096, header_timeout_s=2, body_timeout_s=2) as front:

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(REQUESTS)
        def one(raw: bytes) -> None:
            replies = front.request(raw, timeout=5)
            assert len(replies) <= most_responses(raw.replace(b"HOST", b"h")), replies
            closing = [i for i, r in enumerate(replies) if r.headers.get("connection") == "close"]
            assert closing in ([], [len(replies) - 1]), "nothing is answered after a close"
            for reply in replies:
                assert 200 <= reply.status < 600
                assert reply.status != 500, reply
            tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
            assert not tracebacks, tracebacks[0].getMessage()

        one()
        assert front.get_ok()
