"""Shared pytest setup. Fixture modules live in tests/fixtures/ and are listed here."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.tuf_repo",
    "tests.fixtures.broker",
    "tests.fixtures.tflite_models",
    "tests.fixtures.daemon",
    "tests.fixtures.sdnotify",
    "tests.fixtures.pki",
]

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, taken from its folder: ``pytest -m "not system"``."""
    for item in items:
        parts = item.path.relative_to(item.config.rootpath).parts
        tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else None
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
