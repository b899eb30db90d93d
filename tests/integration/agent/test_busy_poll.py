"""Busy-polling after a reply (``api.busy_poll_us``): a client that sends back to back is
served by a worker that did not go to sleep, a slow one is spun for once and then not again,
and every request is still answered once, in order."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.api import http1
from tests.security.rawhttp import serving
from tests.support.daemon import infer_demo


def infer(conn: http.client.HTTPConnection, request_id: str) -> str:
    status, body = infer_demo(conn, request_id)
    assert status == 200, body
    return str(body["id"])


def test_back_to_back_requests_are_answered_in_order_and_the_spins_pay(tmp_path: Path) -> None:
    with serving(tmp_path, busy_poll_us=1000) as front:
        conn = http.client.HTTPConnection(front.host, front.port)
        ids = [infer(conn, str(i)) for i in range(100)]
        conn.close()
        assert ids == [str(i) for i in range(100)]
        metrics = dict(
            line.rsplit(" ", 1)
            for line in front.api.prometheus().splitlines()
            if line.startswith("inferd_http_busy_polls_total")
        )
        assert int(metrics['inferd_http_busy_polls_total{result="hit"}']) >= 1
        assert 'inferd_http_busy_polls_total{result="miss"}' in metrics


def test_a_slow_client_is_spun_for_once(tmp_path: Path) -> None:
    with serving(tmp_path, busy_poll_us=1000) as front:
        server = front.api._http
        conn = http.client.HTTPConnection(front.host, front.port)
        for i in range(5):
            assert infer(conn, f"slow-{i}") == f"slow-{i}"
            time.sleep(0.03)  # far beyond the 1 ms window and the worker's hold
        assert (server.busy_poll_hits, server.busy_poll_misses) == (0, 1)
        # the same client sending back to back again is spun for again
        ids = [infer(conn, f"fast-{i}") for i in range(50)]
        conn.close()
        assert ids == [f"fast-{i}" for i in range(50)]
        assert server.busy_poll_hits >= 1


def test_off_means_no_spin(tmp_path: Path) -> None:
    with serving(tmp_path, busy_poll_us=0) as front:
        conn = http.client.HTTPConnection(front.host, front.port)
        for i in range(20):
            assert infer(conn, str(i)) == str(i)
        conn.close()
        server = front.api._http
        assert (server.busy_poll_hits, server.busy_poll_misses) == (0, 0)


@pytest.fixture
def spinning(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A worker's view of one connection of a running server: (server, connection, poller,
    the client's end of the socket)."""
    with serving(tmp_path) as front:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        server = front.api._http
        conn = http1._Connection(server, ours)
        poller = select.poll()
        poller.register(ours, select.POLLIN)
        try:
            yield server, conn, poller, theirs
        finally:
            ours.close()
            theirs.close()


def test_a_spin_returns_what_arrives_within_it(spinning) -> None:  # type: ignore[no-untyped-def]
    server, conn, poller, theirs = spinning
    sender = threading.Timer(0.005, theirs.sendall, (b"GET / HTTP/1.1\r\n",))
    sender.start()
    data = server._spin(conn, poller, time.perf_counter() + 10.0)
    sender.join()
    assert data == b"GET / HTTP/1.1\r\n"
    assert conn.quick
    assert (server.busy_poll_hits, server.busy_poll_misses) == (1, 0)


def test_a_spin_that_finds_nothing_ends_at_its_deadline(spinning) -> None:  # type: ignore[no-untyped-def]
    server, conn, poller, _theirs = spinning
    start = time.perf_counter()
    assert server._spin(conn, poller, start + 0.02) is None
    assert time.perf_counter() - start >= 0.02
    assert not conn.quick
    assert (server.busy_poll_hits, server.busy_poll_misses) == (0, 1)


def test_one_worker_spins_at_a_time(spinning) -> None:  # type: ignore[no-untyped-def]
    server, conn, poller, theirs = spinning
    theirs.sendall(b"x")
    with server._spin_lock:  # another worker is spinning
        assert server._spin(conn, poller, time.perf_counter() + 10.0) is None
    assert conn.quick  # not a miss: this client was never waited for
    assert server._spin(conn, poller, time.perf_counter() + 10.0) == b"x"
