"""The inferd daemon: config, runtime backends, model slots, local API, MQTT link, lifecycle."""

from __future__ import annotations

__version__ = "0.1.0"
