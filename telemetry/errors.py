"""The root of inferd's error hierarchy.

It lives in ``telemetry`` because that package is the bottom layer: ``updater`` uses its payload
types and ``agent`` uses both, and neither lower package may import ``agent``.
"""

from __future__ import annotations


class InferdError(Exception):
    """Base of every error inferd raises on purpose; its message is one line a user can act on."""


class TelemetryError(InferdError):
    """Telemetry could not be produced or delivered."""


class SpoolError(TelemetryError):
    """The store-and-forward spool could not store or read a message."""


class MqttError(TelemetryError):
    """The MQTT link failed in a way the caller must hear about (bad TLS files, auth refused)."""
