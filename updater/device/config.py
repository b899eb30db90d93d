"""The ``updates`` section of the device config, owned here so the updater reads it directly.

``agent.config`` embeds it in the daemon's config; validation errors carry the field path.
"""

from __future__ import annotations

import msgspec


class UpdatesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``updates`` config section: where updates come from and how a trial is judged."""

    enabled: bool = True
    repository_url: str = "http://127.0.0.1:8000/"
    trusted_root: str = "/etc/inferd/root.json"
    poll_interval_s: float = 300.0
    max_download_bytes: int = 512 * 1024 * 1024
    state_timeout_s: float = 600.0
    trial_window_s: float = 60.0
    trial_min_requests: int = 20
    trial_max_error_rate: float = 0.05
    trial_max_latency_ratio: float = 3.0
    trial_latency_slack_ms: float = 1.0
    crash_loop_restarts: int = 3
    keep_versions: int = 2
    validation_runs: int = 20
    check_on_start: bool = True
    trial_check_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.validation_runs < 1 or self.crash_loop_restarts < 1:
            raise ValueError("validation_runs and crash_loop_restarts must be >= 1")
        if not self.repository_url.startswith(("http://", "https://", "file://")):
            raise ValueError("repository_url must be an http(s):// or file:// URL")
        if self.poll_interval_s <= 0 or self.state_timeout_s <= 0 or self.trial_window_s < 0:
            raise ValueError("poll_interval_s and state_timeout_s must be > 0")
        if not 0.0 <= self.trial_max_error_rate <= 1.0:
            raise ValueError("trial_max_error_rate must be between 0 and 1")
        if self.keep_versions < 1:
            raise ValueError("keep_versions must be >= 1")
