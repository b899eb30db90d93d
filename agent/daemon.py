"""The daemon: loads the configured model slots, serves the API and runs the components.

Components (telemetry link, update loop, quality monitor, watchdog, ...) are objects with
``start()`` and ``stop()``; they start in list order after the models are loaded and the API
listens, and stop in reverse order before the API drains.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Protocol

from agent.api import ApiServer
from agent.config import Config
from agent.errors import InferdError
from agent.slots import ModelSlot

log = logging.getLogger(__name__)


class Component(Protocol):
    """Something the daemon starts after the models load and stops before the API drains."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Daemon:
    """One inferd process: model slots, the local API and the components around them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.slots: dict[str, ModelSlot] = {
            m.name: ModelSlot(m, cache_dir=self.state_dir / "cache" / m.name) for m in config.models
        }
        self.api = ApiServer(config.api, self.slots)
        self.components: list[Component] = []
        self.load_errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._started: list[Component] = []

    def initial_model(self, slot: ModelSlot) -> tuple[Path, str]:
        """The file and version a slot serves at start: the config's initial model."""
        return Path(slot.config.path), slot.config.version

    def load_models(self) -> None:
        """Load every slot's model; a slot that fails stays not ready (503) and is reported."""
        for slot in self.slots.values():
            path, version = self.initial_model(slot)
            try:
                slot.swap(slot.load(path, version))
            except InferdError as err:
                self.load_errors[slot.name] = str(err)
                log.error("model %s not loaded: %s", slot.name, err)

    def start(self) -> None:
        """Prepare the state dir, load models, listen, then start the components."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InferdError(f"state_dir {self.state_dir}: {err.strerror}") from err
        self.load_models()
        self.api.start()
        for component in self.components:
            component.start()
            self._started.append(component)

    def stop(self) -> None:
        """Stop components (reverse order), drain the API, close the models."""
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception:
                log.exception("error stopping %r", component)
        self.api.stop()
        for slot in self.slots.values():
            slot.close()

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop cleanly."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            self._stop.wait()
        finally:
            self.stop()
