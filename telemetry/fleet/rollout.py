"""Staged rollouts: which devices join one, and how it is going as seen from the broker.

Who joins is decided by :mod:`telemetry.shares`, the same functions the devices use.

:class:`RolloutTally` follows one rollout from MQTT: the retained ``status`` of every device
(version served, update state, groups), the ``events`` of its update jobs (``update`` events
carry the job's version and seq; ``failed`` and ``rolled_back`` are failures) and the retained
group pokes ``inferctl rollout`` leaves, which carry the current shares (for display only:
devices trust nothing but the signed metadata). Events are not retained, but each slot's
``last_update`` in the retained status says how the device's last job ended, so a tally
started after a wave still sees who failed; a device counts once, by whichever of its
latest event and its ``last_update`` is newer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from telemetry.payloads import Event, LastUpdate, Offline, Status, StatusPayload, UpdateState
from telemetry.shares import joins, shares_text

_S = UpdateState
FAILED = (_S.FAILED.value, _S.ROLLED_BACK.value)
SUCCEEDED = (_S.COMMITTED.value, "serving")  # serving: the device runs the version, job or not
IN_PROGRESS = tuple(
    s.value
    for s in (_S.CHECKING, _S.DOWNLOADING, _S.VERIFYING, _S.STAGING, _S.VALIDATING, _S.ACTIVATING)
)
GAVE_UP = ("withdrawn", "superseded")
"""The device dropped the job: the version was no longer offered to it, or a newer one was."""
_KINDS: dict[str, str | None] = {
    "update": None,  # the state is in the details
    "update-withdrawn": "withdrawn",
    "update-superseded": "superseded",
}


@dataclass
class _Device:
    groups: tuple[str, ...] | None = None
    online: bool = False
    version: str | None = None
    """What the retained status says the slot serves."""
    status_state: str | None = None
    last: LastUpdate | None = None
    """The retained status' ``last_update`` of the slot (any version)."""
    state: str | None = None
    """The latest ``update`` event state of this rollout's job."""
    event_ts: datetime | None = None
    started: float | None = None
    finished: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RolloutSummary:
    """Where a rollout stands: per-state counts, failures and an estimate of the rest."""

    slot: str
    version: str | None
    seq: int | None
    shares: dict[str, int] | None
    shares_known: bool
    halted: str | None
    devices: int
    online: int
    eligible: int
    joined: int
    attempted: int
    succeeded: int
    failed: int
    serving: int
    states: dict[str, int]
    rate_per_s: float | None
    eta_s: float | None
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(device, reason) of each failure seen."""

    @property
    def failure_ratio(self) -> float:
        return self.failed / self.attempted if self.attempted else 0.0

    @property
    def settled(self) -> bool:
        """Every device in the rollout has finished (or none joined)."""
        gave_up = sum(self.states.get(s, 0) for s in GAVE_UP)
        return self.succeeded + self.failed + gave_up >= self.joined

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "version": self.version,
            "seq": self.seq,
            "shares": self.shares if self.shares_known else "unknown",
            "halted": self.halted,
            "devices": self.devices,
            "online": self.online,
            "eligible": self.eligible,
            "joined": self.joined,
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failure_ratio": round(self.failure_ratio, 4),
            "serving": self.serving,
            "states": self.states,
            "rate_per_s": self.rate_per_s,
            "eta_s": self.eta_s,
            "failures": [{"device": d, "reason": r} for d, r in self.failures],
        }


class RolloutTally:
    """Follows one rollout of ``slot`` from MQTT messages fed to :meth:`feed`.

    Without ``version`` it follows the newest rollout of the slot announced by a group poke or
    seen in update events. ``shares`` and ``target_groups`` say who is meant to join (from the
    signed metadata when the caller has it; otherwise learnt from the pokes).
    """

    def __init__(
        self,
        prefix: str,
        slot: str,
        version: str | None = None,
        *,
        seq: int | None = None,
        target_groups: Sequence[str] = (),
        shares: Mapping[str, int] | None = None,
        shares_known: bool = False,
        halted: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.slot = slot
        self.version = version
        self.seq = seq
        self.target_groups = tuple(target_groups)
        self.shares = dict(shares) if shares is not None else None
        self.shares_known = shares_known or shares is not None
        """Whether ``shares`` is what was published (None then means: not staged)."""
        self.halted = halted
        self.clock = clock
        self._pinned = version is not None
        self._from_metadata = self.shares_known
        self.devices: dict[str, _Device] = {}
        self._lock = threading.RLock()  # fed by a network thread, read by another

    def topics(self) -> list[tuple[str, int]]:
        """The subscriptions that feed the tally: (filter, qos)."""
        p = self.prefix
        return [(f"{p}/+/status", 1), (f"{p}/+/events", 1), (f"{p}/groups/+/update", 1)]

    def retarget(
        self,
        version: str,
        seq: int | None,
        target_groups: Sequence[str] = (),
        shares: Mapping[str, int] | None = None,
        *,
        shares_known: bool = True,
        halted: str | None = None,
    ) -> None:
        """Follow this version from now on (device states of another one are forgotten)."""
        with self._lock:
            self._retarget(version, seq, target_groups, shares, shares_known, halted)

    def set_rollout(self, shares: Mapping[str, int] | None, halted: str | None = None) -> None:
        """The version's rollout changed (the operator raised or halted it)."""
        with self._lock:
            self.shares = dict(shares) if shares is not None else None
            self.shares_known = True
            self.halted = halted

    def _retarget(
        self,
        version: str,
        seq: int | None,
        target_groups: Sequence[str],
        shares: Mapping[str, int] | None,
        shares_known: bool,
        halted: str | None,
    ) -> None:
        if (version, seq) != (self.version, self.seq):
            for dev in self.devices.values():
                dev.state = dev.reason = None
                dev.started = dev.finished = None
                dev.event_ts = None
        self.version, self.seq = version, seq
        self.target_groups = tuple(target_groups)
        self.shares = dict(shares) if shares is not None else None
        self.shares_known = shares_known
        self.halted = halted

    # -- input ------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        """Take one message; anything that does not parse or concern the slot is ignored."""
        if not payload or not topic.startswith(self.prefix + "/"):
            return
        parts = topic[len(self.prefix) + 1 :].split("/")
        with self._lock:
            self._feed(parts, payload)

    def _feed(self, parts: list[str], payload: bytes) -> None:
        try:
            if len(parts) == 3 and parts[0] == "groups" and parts[2] == "update":
                self._poke(msgspec.json.decode(payload))
            elif len(parts) == 2 and parts[1] == "status":
                self._status(parts[0], msgspec.json.decode(payload, type=StatusPayload))
            elif len(parts) == 2 and parts[1] == "events":
                self._event(parts[0], msgspec.json.decode(payload, type=Event))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return

    def _poke(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("model") != self.slot:
            return
        version, seq = data.get("version"), data.get("seq")
        if not isinstance(version, str) or not isinstance(seq, (int, type(None))):
            return
        if self._pinned and version != self.version:
            return
        if not self._pinned and self.seq is not None and (seq or 0) < self.seq:
            return
        raw = data.get("rollout")
        shares = (
            {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}
            if isinstance(raw, dict)
            else None
        )
        groups = [g for g in data.get("groups") or [] if isinstance(g, str)]
        halted = data.get("halted") if isinstance(data.get("halted"), str) else None
        if self._from_metadata and version == self.version:
            # the caller read the signed metadata; a poke only brings later changes of it
            self.shares, self.halted = shares, halted
            return
        self._retarget(version, seq, groups, shares, True, halted)

    def _status(self, device: str, status: Status | Offline) -> None:
        dev = self.devices.setdefault(device, _Device())
        if isinstance(status, Offline):
            dev.online = False  # what it served last stays known
            return
        dev.online = True
        dev.groups = tuple(status.groups)
        for slot in status.models:
            if slot.name == self.slot:
                dev.version = slot.version
                dev.status_state = slot.update_state
                dev.last = slot.last_update

    def _event(self, device: str, event: Event) -> None:
        if event.kind not in _KINDS or event.model != self.slot or event.version is None:
            return
        details = event.details
        seq = details.get("seq")
        state = _KINDS[event.kind] or details.get("state")
        if not isinstance(state, str):
            return
        newer = isinstance(seq, int) and (self.seq is None or seq > self.seq)
        if not self._pinned and newer and event.version != self.version:
            # a rollout no poke announced: who is meant to join is unknown
            self._retarget(
                event.version, seq if isinstance(seq, int) else None, (), None, False, None
            )
        if event.version != self.version:
            return
        if self.seq is not None and isinstance(seq, int) and seq != self.seq:
            return
        dev = self.devices.setdefault(device, _Device())
        now = self.clock()
        if dev.started is None:
            dev.started = now
        dev.state = state
        dev.event_ts = event.ts
        if state in (*FAILED, *GAVE_UP, "committed") or (state == "trial" and not dev.finished):
            dev.finished = now
        if state in FAILED:
            dev.reason = event.message

    # -- output -----------------------------------------------------------------------------

    def _eligible(self, dev: _Device) -> bool:
        if not self.target_groups or dev.groups is None:
            return True
        return bool(set(self.target_groups) & set(dev.groups))

    def _joins(self, name: str, dev: _Device) -> bool:
        if self.version is None or not self.shares_known:
            return False
        return self._eligible(dev) and joins(
            self.shares, name, dev.groups or (), self.slot, self.version
        )

    def _ended(self, dev: _Device) -> LastUpdate | None:
        """The retained outcome of this rollout's job, unless an event seen is newer."""
        last = dev.last
        if last is None or last.version != self.version:
            return None
        if self.seq is not None and last.seq != self.seq:
            return None
        if dev.event_ts is not None and dev.event_ts > last.ts:
            return None  # e.g. it joined again after a withdrawal
        return last

    def state_of(self, name: str, dev: _Device) -> str | None:
        """The device's place in the rollout; None when it is outside it."""
        ended = self._ended(dev)
        if ended is not None:
            return ended.outcome
        if dev.state is not None:
            return dev.state
        if self.version is not None and dev.version == self.version:
            if dev.status_state in ("trial", "committed"):
                return dev.status_state
            return "serving"
        if self._joins(name, dev):
            if dev.status_state in IN_PROGRESS:
                return dev.status_state
            return "waiting"
        return None

    def summary(self) -> RolloutSummary:
        """The counts as of now."""
        with self._lock:
            return self._summary()

    def _summary(self) -> RolloutSummary:
        now = self.clock()
        states: Counter[str] = Counter()
        joined = eligible = serving = online = 0
        failures = []
        starts, done = [], 0
        for name, dev in sorted(self.devices.items()):
            online += dev.online
            eligible += self._eligible(dev)
            if self.version is not None and dev.version == self.version:
                serving += 1
            state = self.state_of(name, dev)
            if state is None:
                continue
            joined += 1
            states[state] += 1
            if dev.started is not None:
                starts.append(dev.started)
            if state in FAILED:
                ended = self._ended(dev)
                reason = ended.reason if ended is not None else dev.reason
                failures.append((name, reason or state))
            if state in (*FAILED, *SUCCEEDED, *GAVE_UP, "trial"):
                done += 1
        waiting = states.get("waiting", 0)
        succeeded = sum(states.get(s, 0) for s in (*SUCCEEDED, "trial"))
        failed = sum(states.get(s, 0) for s in FAILED)
        rate = eta = None
        if starts and now > min(starts):
            rate = done / (now - min(starts))
            left = joined - done
            eta = left / rate if rate > 0 and left > 0 else (0.0 if left == 0 else None)
        return RolloutSummary(
            slot=self.slot,
            version=self.version,
            seq=self.seq,
            shares=self.shares,
            shares_known=self.shares_known,
            halted=self.halted,
            devices=len(self.devices),
            online=online,
            eligible=eligible,
            joined=joined,
            attempted=joined - waiting,
            succeeded=succeeded,
            failed=failed,
            serving=serving,
            states=dict(sorted(states.items())),
            rate_per_s=rate,
            eta_s=eta,
            failures=failures,
        )


def render(s: RolloutSummary) -> str:
    """The summary as a few lines of text."""
    if s.version is None:
        return f"{s.slot}: no rollout seen yet ({s.devices} devices known)"
    seq = f" (seq {s.seq})" if s.seq is not None else ""
    share = shares_text(s.shares) if s.shares_known else "share unknown (no poke seen)"
    head = f"{s.slot} {s.version}{seq}: rollout {share}"
    if s.halted:
        head += f"; HALTED: {s.halted}"
    states = ", ".join(f"{k} {v}" for k, v in s.states.items()) or "-"
    ratio = f" ({s.failure_ratio:.1%} of attempted)" if s.attempted else ""
    eta = "-" if s.eta_s is None else f"{s.eta_s:.0f} s"
    rate = "-" if s.rate_per_s is None else f"{s.rate_per_s:.2f} devices/s"
    lines = [
        head,
        f"devices: {s.devices} known, {s.online} online, {s.eligible} in the target groups, "
        f"{s.joined} in the rollout, {s.attempted} attempted",
        f"serving {s.version}: {s.serving}; succeeded {s.succeeded}; failed {s.failed}{ratio}",
        f"states: {states}",
        f"rate: {rate}; ETA: {eta}",
    ]
    lines += [f"  failed on {d}: {r}" for d, r in s.failures[:10]]
    if len(s.failures) > 10:
        lines.append(f"  ... and {len(s.failures) - 10} more")
    return "\n".join(lines)
