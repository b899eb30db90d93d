"""The daemon: loads the configured model slots, serves the API and runs the components.

Components (telemetry link, update loop, quality monitor, watchdog, ...) are objects with
``start()`` and ``stop()``; they start in list order after the models are loaded and the API
listens, and stop in reverse order before the API drains.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from agent.api.server import ApiServer
from agent.config import Config
from agent.health import ServingHealth
from agent.reload import ReloadResult, reload_config
from agent.sdnotify import Notifier, WatchdogPinger
from agent.slots import ModelSlot
from runtime.errors import ConfigError, InferdError

if TYPE_CHECKING:
    from agent.quality import QualityService
    from agent.reporting import Telemetry
    from agent.updates import UpdateComponent

log = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Move everything allocated so far out of the cyclic garbage collector's sight.

    Modules, config, models and the started components live as long as the daemon; left in the
    collector's oldest generation, every full collection walked them all again: 9-16 ms with
    every request thread stopped, twice in two seconds under load with the prediction log on
    (queued predictions age into that generation fast). Frozen, a full collection walks only
    what was allocated since (3 ms there). Collected first, so no garbage is frozen with them.
    Called by :meth:`Daemon.run` (the process's main loop), not by :meth:`Daemon.start`: a test
    that starts daemons in its own process would freeze its own objects.
    """
    gc.collect()
    gc.freeze()


class Component(Protocol):
    """Something the daemon starts after the models load and stops before the API drains."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Daemon:
    """One inferd process: model slots, the local API and the components around them."""

    def __init__(
        self,
        config: Config,
        *,
        slots: dict[str, ModelSlot],
        api: ApiServer,
        components: list[Component],
        boot_plan: Callable[[], Mapping[str, tuple[Path, str]]],
        config_path: str | Path | None = None,
    ) -> None:
        """Parts come built and wired from :func:`agent.app.build_daemon`."""
        self.config = config
        self.config_path = config_path
        self.state_dir = Path(config.state_dir)
        self.slots = slots
        self.api = api
        self.components = components
        self._boot_plan = boot_plan
        self.health = ServingHealth(self.api, self.slots)
        self.notifier = Notifier()
        self.restart_needed: tuple[str, ...] = ()
        self.load_errors: dict[str, str] = {}
        self._stop = threading.Event()
        self._wake_w: socket.socket | None = None  # run()'s signal wakeup socket
        self._reload_requested = False
        self._started: list[Component] = []
        # The parts by name, for tests, benchmarks and diagnostics; set by the composition root.
        self.telemetry: Telemetry | None = None
        self.quality: QualityService | None = None
        self.updates: UpdateComponent | None = None

    def initial_model(self, slot: ModelSlot) -> tuple[Path, str]:
        """The file and version a slot serves at start: the version an update installed (and
        did not roll back), else the config's initial model."""
        planned = self._boot_plan().get(slot.name)
        return planned if planned is not None else (Path(slot.config.path), slot.config.version)

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

    def status_line(self) -> str:
        """What ``systemctl status`` shows: models, versions, keys waiting for a restart."""
        line = self.health.summary()
        if self.restart_needed:
            line += f"; restart to apply {', '.join(self.restart_needed)}"
        return line

    def reload(self) -> ReloadResult | None:
        """SIGHUP: re-read the config file, apply its live keys, report those needing a restart."""
        if self.config_path is None:
            log.warning("reload requested but the daemon was not started from a config file")
            return None
        self.notifier.reloading("reloading config")
        try:
            result = reload_config(self.config_path, self.config, self.components)
        except ConfigError as err:
            log.error("config reload failed, the running config stays: %s", err)
            self.notifier.ready(f"{self.status_line()}; last reload failed")
            return None
        self.config = result.config
        self.restart_needed = result.needs_restart
        self.notifier.ready(self.status_line())
        return result

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers and other threads)."""
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def run(self) -> None:
        """Start, tell systemd when serving, reload on SIGHUP, stop cleanly on SIGTERM/SIGINT."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self._stop.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            # Only a flag: the handler may interrupt this very thread inside the notifier or
            # a lock the reload needs. The loop below reloads once the models serve.
            self._reload_requested = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        # A process signal may be delivered to any thread, and a main thread blocked on a lock
        # (Event.wait) does not wake for one that lands on another: the handler would run late or
        # never. The C-level handler always writes to the wakeup fd, which wakes this thread.
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        self._wake_w = wake_w
        previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        pinger = WatchdogPinger(self.notifier, self.health.problem, self.status_line)
        try:
            self.start()
            freeze_startup_objects()
            self.notifier.ready(self.status_line())
            pinger.start()
            while not self._stop.is_set():
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                    continue
                wake_r.recv(64)  # Python-level handlers run right after this returns
        finally:
            self.notifier.stopping("stopping")
            pinger.stop()
            self.stop()
            self.notifier.close()
            signal.set_wakeup_fd(previous_fd)
            self._wake_w = None
            wake_r.close()
            wake_w.close()
