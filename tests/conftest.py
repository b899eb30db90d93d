"""Shared pytest setup. Fixture modules live in tests/fixtures/ and are listed here.

Every test is also checked for leaked threads: a thread that the test started and that is still
running once the test and its fixtures are done fails the test (STYLE.md: each long-lived thread
has a stop event and is joined on shutdown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.tuf_repo",
    "tests.fixtures.broker",
    "tests.fixtures.tflite_models",
    "tests.fixtures.daemon",
    "tests.fixtures.sdnotify",
    "tests.fixtures.pki",
    "tests.fixtures.zoo",
    "tests.fixtures.tmpfs",
]

TIERS = ("unit", "integration", "system", "security")

LEAK_GRACE_S = 2.0
"""How long a thread the test asked to stop may take to end after the test's teardown. The wait
is a join on each such thread: a clean run pays nothing, only a thread still running waits."""

LEAK_MARKER = "leaks_threads"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LEAK_MARKER}(reason): the test may leave threads running (a known product defect "
        "named in the reason); the leak check lists them instead of failing",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, taken from its folder: ``pytest -m "not system"``."""
    for item in items:
        parts = item.path.relative_to(item.config.rootpath).parts
        tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def left_running(before: set[threading.Thread], grace: float) -> list[threading.Thread]:
    """Threads not in ``before`` still alive after joining each for what is left of ``grace``.

    ``_DummyThread``s are left out: threading makes one for a thread started outside Python
    (a C library's worker calling back into Python); it cannot be joined and never leaves
    ``threading.enumerate()``, and the project starts none of them.
    """
    deadline = time.monotonic() + grace
    left = []
    for thread in threading.enumerate():
        if thread in before or isinstance(thread, threading._DummyThread):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread)
    return left


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test when a thread it started outlives it (fixtures' teardowns included).

    Autouse fixtures are set up first among a test's function-scoped fixtures, so this one is
    torn down last: the fixtures that start brokers, captures and servers have stopped them by
    the time it looks. Threads of wider-scoped fixtures started before the test are in
    ``before`` and are not counted.
    """
    before = set(threading.enumerate())
    yield
    left = left_running(before, LEAK_GRACE_S)
    if not left:
        return
    names = ", ".join(sorted(t.name for t in left))
    marker = request.node.get_closest_marker(LEAK_MARKER)
    if marker is not None:
        # The known leak is allowed for this test; say so in the report instead of failing.
        request.node.user_properties.append(("leaked_threads", names))
        return
    pytest.fail(f"threads still running after the test: {names}", pytrace=False)
