"""The leak check every test runs under (tests/conftest.py): it must see a thread left running
and must not blame one that ends within the grace period."""

from __future__ import annotations

import threading

from tests.conftest import left_running


def test_a_thread_still_running_after_the_grace_period_is_reported() -> None:
    stop = threading.Event()
    before = set(threading.enumerate())
    thread = threading.Thread(target=stop.wait, name="leak-probe")
    thread.start()
    try:
        assert left_running(before, 0.05) == [thread]
        assert left_running(before | {thread}, 0.05) == []  # there before the test: not counted
    finally:
        stop.set()
        thread.join()


def test_a_thread_that_ends_within_the_grace_period_is_waited_for_not_reported() -> None:
    before = set(threading.enumerate())
    thread = threading.Thread(target=threading.Event().wait, args=(0.2,), name="ending-probe")
    thread.start()
    assert left_running(before, 10.0) == []
    assert not thread.is_alive()
