"""Waiting for a condition with a deadline, instead of sleeping and then asserting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll ``condition`` until it is true (True) or ``timeout`` s have passed (False).

    Polls every millisecond at first, backing off to every ``interval`` s: a condition that
    comes true at once (a batcher taking a request) is seen at once, a slow one (a daemon
    reconnecting) costs little CPU. Use it as ``assert wait_until(...), "what was awaited"``.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not condition():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, interval)
    return True


def wait_notified(
    cond: threading.Condition, predicate: Callable[[], bool], timeout: float = 10.0
) -> bool:
    """Wait on ``cond`` until ``predicate`` (checked under it) is true (True) or ``timeout`` s
    have passed (False): for a recorder that notifies ``cond`` when something arrives. Wakes
    every 50 ms at the latest, so a predicate that turns true without a notify is seen too."""
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(min(left, 0.05))
    return True
