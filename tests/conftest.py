"""Shared pytest setup. Fixture modules live in tests/fixtures/ and are listed here."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.tuf_repo",
    "tests.fixtures.broker",
    "tests.fixtures.tflite_models",
    "tests.fixtures.daemon",
    "tests.fixtures.sdnotify",
    "tests.fixtures.pki",
]
