"""The ``telemetry`` and ``quality`` sections of the device config, owned here so the telemetry
code reads them directly; ``agent.config`` embeds them and validation errors carry field paths.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class TelemetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``telemetry`` config section: metrics period, prediction log, spool bound."""

    metrics_interval_s: float = 10.0
    prediction_sample_rate: float = 1.0
    prediction_batch_size: int = 500
    prediction_batch_ms: int = 1000
    spool_max_bytes: int = 64 * 1024 * 1024
    spool_hard_max_bytes: int | None = None
    """Events and metrics are kept past ``spool_max_bytes`` up to this, then refused (with one
    ``spool-full`` event); None: twice ``spool_max_bytes``."""
    spool_feedback_share: float = 0.25
    """Share of ``spool_max_bytes`` feedback logs may take; older ones are dropped beyond it."""
    metrics_qos: Literal[0, 1] = 0

    def __post_init__(self) -> None:
        if self.metrics_interval_s <= 0:
            raise ValueError("metrics_interval_s must be > 0")
        if not 0.0 <= self.prediction_sample_rate <= 1.0:
            raise ValueError("prediction_sample_rate must be between 0 and 1")
        if self.prediction_batch_size < 1 or self.prediction_batch_ms < 1:
            raise ValueError("prediction_batch_size and prediction_batch_ms must be >= 1")
        if self.spool_max_bytes < 64 * 1024:
            raise ValueError("spool_max_bytes must be >= 65536")
        hard = self.spool_hard_max_bytes
        if hard is not None and hard < self.spool_max_bytes:
            raise ValueError("spool_hard_max_bytes must be >= spool_max_bytes")
        if not 0.0 < self.spool_feedback_share <= 1.0:
            raise ValueError("spool_feedback_share must be > 0 and <= 1")


class QualityConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``quality`` config section: label join, metric windows, drift."""

    window_count: int = 1000
    window_s: float = 3600.0
    join_window_s: float = 600.0
    join_max_pending: int = 10000
    join_max_bytes: int = 32 * 1024 * 1024
    """Bytes the label join may hold (held outputs, ids, early labels); the oldest go first."""
    max_classes: int = 20
    drift_window: int = 500
    drift_psi_threshold: float = 0.2
    publish_interval_s: float = 60.0

    def __post_init__(self) -> None:
        counts = ("window_count", "join_max_pending", "max_classes", "drift_window")
        if self.join_max_bytes < 64 * 1024:
            raise ValueError("join_max_bytes must be >= 65536")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("window_s", "join_window_s", "publish_interval_s", "drift_psi_threshold"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
