"""Glue between the daemon and the updater: builds a DeviceUpdater from the config and slots.

The updater sees a slot only through :class:`updater.device.updater.SlotPort`; this module adapts
``ModelSlot``/``LoadedModel`` to it. The daemon calls :meth:`UpdateComponent.boot_plan` before
loading models (so a slot starts on the version the store says is active, and a crash loop in
trial is rolled back before the failing version loads again), then runs it as a component: one
update job per slot, each on its own thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import numpy as np

from agent.config import Config
from agent.slots import LoadedModel, ModelSlot
from runtime.errors import InferdError
from telemetry.payloads import LastUpdate, Rollback, UpdateState
from telemetry.request_histogram import RequestHistograms
from updater.device.client import RepositoryClient
from updater.device.updater import DeviceUpdater, RunCounts, Serving

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class LoadedCandidate:
    """A slot's ``LoadedModel`` that is not serving yet, as the validation gate sees it
    (:class:`updater.device.validation.CandidateModel`)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.version = model.version

    def signature(self) -> Mapping[str, Sequence[Mapping[str, Any]]]:
        return self.model.backend.signature()

    def run(self, feeds: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return self.model.backend.run(feeds)  # checks the feeds first

    def warmup_feeds(self) -> dict[str, np.ndarray] | None:
        return self.model.backend.warmup_feeds()

    def close(self) -> None:
        self.model.retire()


class SlotAdapter:
    """:class:`updater.device.updater.SlotPort` over a ``ModelSlot``."""

    def __init__(
        self,
        slot: ModelSlot,
        on_state: Callable[[], None] | None = None,
        requests: RequestHistograms | None = None,
    ) -> None:
        self.slot = slot
        self.name = slot.name
        self.runtime: str = slot.config.runtime
        self.on_state = on_state
        self.requests = requests
        """Per-request counts (the API's /metrics ones): the trial judges requests. Without
        them it counts backend runs, and a batched model runs once per batch."""

    def serving(self) -> Serving | None:
        if not self.slot.ready:
            return None
        model = self.slot.current
        stats = model.backend.stats
        counts = RunCounts(stats.runs, stats.errors, stats.total_ns)
        if self.requests is not None:
            served = self.requests.totals().get((self.name, model.version))
            # the latency sum covers the successful requests, which failed ones have no latency of
            counts = (
                RunCounts(served.requests, served.errors, served.sum_ns)
                if served is not None
                else RunCounts(0, 0, 0)
            )
        return Serving(
            version=model.version,
            path=str(model.path),
            sha256=model.digest,
            signature=model.backend.signature(),
            stats=counts,
        )

    def load(self, path: Path, version: str) -> LoadedCandidate:
        return LoadedCandidate(self.slot.load(path, version))

    def activate(self, candidate: Any) -> None:
        if not isinstance(candidate, LoadedCandidate):
            raise TypeError("activate() takes a candidate from load()")
        self.slot.swap(candidate.model)

    def set_update_state(self, state: UpdateState) -> None:
        self.slot.update_state = state
        if self.on_state is not None:
            self.on_state()

    def set_last_update(self, last: LastUpdate) -> None:
        self.slot.last_update = last
        if self.on_state is not None:
            self.on_state()


class CommandLink(Protocol):
    """The part of the agent's MQTT link the updater uses."""

    def on_command(self, name: str, handler: Callable[[Any], dict[str, Any] | None]) -> None: ...

    def emit_event(self, kind: str, message: str, **fields: Any) -> None: ...

    def publish_status(self) -> None: ...


class UpdateComponent:
    """The daemon component running the update loop (a no-op when updates are disabled)."""

    def __init__(
        self,
        config: Config,
        slots: Mapping[str, ModelSlot],
        link: CommandLink,
        requests: RequestHistograms | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.updates.enabled
        u = config.updates
        if self.enabled and not Path(u.trusted_root).is_file():
            log.warning(
                "updates: trusted root %s not found; updates are off until it is installed",
                u.trusted_root,
            )
            self.enabled = False
        self.adapters = {
            name: SlotAdapter(s, link.publish_status, requests) for name, s in slots.items()
        }
        client = RepositoryClient(
            u.repository_url,
            u.trusted_root,
            config.state_dir,
            max_download_bytes=u.max_download_bytes,
        )
        self.updater = DeviceUpdater(
            client=client,
            state_dir=config.state_dir,
            slots=self.adapters,
            groups=config.groups,
            device_id=config.device_id,
            settings=u,
            emit=link.emit_event,
        )
        link.on_command("update", self._on_poke)  # {prefix}/groups/{group}/update, cmd/update
        link.on_command("check-update", self._on_poke)
        link.on_command("rollback", self._on_rollback)

    def boot_plan(self) -> dict[str, tuple[Path, str]]:
        """Per slot, the (file, version) to load at start when an update installed one."""
        try:
            plan = self.updater.boot_plan()
        except InferdError as err:
            log.error(
                "updates: cannot read the update state, starting on the config's models: %s", err
            )
            return {}
        return {name: (Path(e.path), e.version) for name, e in plan.items()}

    def _on_poke(self, cmd: Any) -> dict[str, Any]:
        # whatever a poke says, it only makes the device ask the repository (TUF decides)
        if not self.enabled:
            raise InferdError("updates are disabled on this device")
        self.updater.request_check(f"poke on {getattr(cmd, 'topic', '?')}")
        return {"states": {name: s.value for name, s in self.updater.states().items()}}

    def _on_rollback(self, cmd: Any) -> dict[str, Any]:
        # A rollback marks versions failed: it needs an explicit model (a reply or any other
        # stray JSON object must not roll every slot back) and is never replayed from a
        # retained message on every reconnect.
        if getattr(cmd, "retained", False):
            raise InferdError("rollback refused: a retained message is never a rollback")
        try:
            model = msgspec.convert(getattr(cmd, "args", None), Rollback).model
        except msgspec.ValidationError:
            model = None
        if model not in self.adapters:
            raise InferdError(
                f"rollback needs the model to roll back: one of {', '.join(self.adapters)}"
            )
        self.updater.request_rollback(model)
        return {"rolling_back": [model]}

    def start(self) -> None:
        if self.enabled:
            self.updater.start()

    def stop(self) -> None:
        self.updater.stop()
