"""The console drives staged rollouts by itself: advance after a soak when healthy, halt above
the failure ratio, resume when the operator asks.

:func:`decide` is the policy, a pure function of a tally's summary, the signed rollout and the
time since it last changed. :class:`Autopilot` applies it to the newest published version of
every slot, once per tick: it follows each with a :class:`~telemetry.fleet.rollout.RolloutTally`
and signs every decision through :class:`~updater.operator.rollout.RolloutDriver` with the
:func:`~updater.operator.rollout.raised` and :func:`~updater.operator.rollout.halted` rollouts,
the code ``inferctl rollout`` signs with. Each decision is also an ``Event`` (kind
``rollout``) published on ``{prefix}/{console id}/events`` and kept for the page.

Two consoles, or a console and an operator's ``inferctl rollout``, may change one repository: a
decision is taken under the repository's signing lock (:mod:`updater.operator.signing_lock`,
which ``inferctl rollout`` takes too) and against the metadata read again under it, so the
second signer sees the first one's change instead of signing its own on top.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import paho.mqtt.client as mqtt

from runtime.errors import InferdError, MqttError, OperatorError
from telemetry.broker import BrokerOptions
from telemetry.fleet.rollout import IN_PROGRESS, RolloutSummary, RolloutTally
from telemetry.payloads import Event
from telemetry.shares import ALL, FULL, shares_text
from updater.meta import ModelMeta, Rollout
from updater.operator.console.memory import Remembered, load, save
from updater.operator.repository import OperatorRepository
from updater.operator.rollout import (
    HALT_RATIO,
    MIN_ATTEMPTED,
    RolloutDriver,
    halt_reason,
    halted,
    raised,
    tally_for,
)
from updater.operator.signing_lock import signing_lock

log = logging.getLogger(__name__)

Action = Literal["advance", "halt", "resume"]
MAX_DEVICES = 10_000
DEFAULT_STEPS = (100, 1000, 2500, 5000, FULL)
"""1 %, 10 %, 25 %, 50 %, 100 % of the devices (basis points)."""
LOCK_TIMEOUT_S = 15.0
"""How long a decision waits for another signer (then the tick fails and the next one tries)."""


@dataclass(frozen=True)
class Policy:
    soak_s: float = 300.0
    """How long a share must run with no failure over the ratio before the next step."""
    halt_ratio: float = HALT_RATIO
    min_attempted: int = MIN_ATTEMPTED
    steps: tuple[int, ...] = DEFAULT_STEPS
    drive: bool = True
    """False: show the rollouts, decide nothing (halt and resume buttons still work)."""

    def __post_init__(self) -> None:
        if not self.steps or list(self.steps) != sorted(set(self.steps)):
            raise ValueError("steps must be increasing shares")
        if self.steps[0] <= 0 or self.steps[-1] > FULL:
            raise ValueError("steps must be shares between 0 and 100 %, exclusive of 0")
        if not 0 <= self.halt_ratio < 1:
            raise ValueError("the halt ratio must be in [0, 1)")
        if self.soak_s < 0 or self.min_attempted < 1:
            raise ValueError("soak must be >= 0 s and min attempted >= 1")


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    rollout: Rollout


def next_step(policy: Policy, share: int) -> int | None:
    """The first step above ``share``, or None at the last one."""
    return next((s for s in policy.steps if s > share), None)


def since_resume(s: RolloutSummary, failed: int, attempted: int) -> RolloutSummary:
    """The summary counting only what happened after a resume (at ``failed`` of ``attempted``).

    The operator who resumes a halted rollout has judged the failures so far; judging them
    again would halt it at once.
    """
    return dataclasses.replace(
        s, failed=max(0, s.failed - failed), attempted=max(0, s.attempted - attempted)
    )


def decide(
    s: RolloutSummary, rollout: Rollout | None, soaked_s: float, policy: Policy
) -> Decision | None:
    """What to do with a rollout now: halt, advance one step, or nothing (None).

    A version published without shares goes to every device (nothing to drive); a halted one
    waits for the operator. Above the failure ratio it halts (once ``min_attempted`` devices
    tried; before that it only stops advancing); otherwise it advances the share of all groups
    to the next step once ``soak_s`` has passed since the last change and no device is still in
    the middle of an update.
    """
    if rollout is None or rollout.halted:
        return None
    reason = halt_reason(s, policy.halt_ratio, policy.min_attempted)
    if reason is not None:
        return Decision("halt", reason, halted(rollout, reason))
    if s.failure_ratio > policy.halt_ratio:
        return None  # too few attempts to judge a halt, too many failures to go further
    share = rollout.shares.get(ALL, 0)
    step = next_step(policy, share)
    if step is None or soaked_s < policy.soak_s:
        return None
    busy = sum(s.states.get(state, 0) for state in IN_PROGRESS)
    if busy:
        return None
    return Decision(
        "advance",
        f"{s.succeeded} of {s.attempted} devices updated, {s.failed} failed, over "
        f"{soaked_s:.0f} s at {shares_text(rollout.shares)}",
        raised(rollout, step, None),
    )


@dataclass
class _Followed:
    """One slot's newest version as the console follows it."""

    meta: ModelMeta
    tally: RolloutTally
    changed_at: float
    """When the signed rollout last changed (or the console first saw it)."""
    before_halt: int | None = None
    """The share of all groups before the console halted it: where a resume starts again."""
    forgiven: tuple[int, int] = (0, 0)
    """(failed, attempted) when the operator last resumed."""
    decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    """The latest decisions on this version, newest first (for the page)."""


def _rollout_key(meta: ModelMeta) -> tuple[Any, ...]:
    r = meta.rollout
    return (
        meta.version,
        meta.seq,
        None if r is None else (tuple(sorted(r.shares.items())), r.halted),
    )


class Autopilot:
    """Follows the newest version of each published slot and drives its staged rollout."""

    def __init__(
        self,
        repo: OperatorRepository,
        policy: Policy,
        *,
        prefix: str,
        console_id: str,
        client: Callable[[], mqtt.Client | None],
        broker: Callable[[], BrokerOptions],
        on_event: Callable[[Event], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        memory: Path | None = None,
    ) -> None:
        """``memory``: the file that keeps each rollout's soak start, halted-at share and
        decisions across a restart (:mod:`.memory`); None keeps them in this process only."""
        self.repo = repo
        self.policy = policy
        self.prefix = prefix
        self.console_id = console_id
        self._client = client
        self._broker = broker
        self.on_event = on_event
        self.clock = clock
        self.wall = wall
        self.memory = memory
        self._remembered = load(memory) if memory is not None else {}
        """What the last run saved: taken up by each slot when first followed."""
        self._dirty = False
        self._save_error: str | None = None
        self.followed: dict[str, _Followed] = {}
        self.error: str | None = None
        """The last tick's failure (e.g. the repository cannot be read), shown on the page."""
        self._lock = threading.RLock()  # the tick thread and the HTTP handlers' halt/resume
        self._feed_lock = threading.Lock()
        """Guards which tallies exist for the MQTT thread, which must never wait for a decision:
        signing one waits for the broker to acknowledge its poke, which that thread delivers."""
        self._statuses: dict[str, bytes] = {}
        """The latest status of each device (bounded), replayed to a tally made later."""

    # -- input ------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes) -> None:
        """Give a broker message to every followed slot's tally."""
        with self._feed_lock:
            tallies = [f.tally for f in self.followed.values()]
            if topic.endswith("/status") and (
                topic in self._statuses or len(self._statuses) < MAX_DEVICES
            ):
                # retained statuses arrive once, at subscribe: a slot published later needs them
                self._statuses[topic] = payload
        for tally in tallies:
            tally.feed(topic, payload)

    # -- the loop ---------------------------------------------------------------------------

    def tick(self) -> list[Decision]:
        """Follow what the repository publishes now and apply the policy; the decisions taken."""
        try:
            with self._lock:
                try:
                    self._refresh()
                    if not self.policy.drive:
                        return []
                    return [d for slot in sorted(self.followed) if (d := self._drive(slot))]
                finally:
                    self._persist()
        except InferdError as err:
            if str(err) != self.error:
                log.error("rollouts: %s", err)
            self.error = str(err)
            return []

    def _refresh(self) -> None:
        newest: dict[str, ModelMeta] = {}
        for _path, _target, meta in self.repo.models():
            newest[meta.name] = meta  # models() is in publishing order: the last one wins
        now = self.clock()
        with self._feed_lock:
            self._follow(newest, now)
        self.error = None

    def _follow(self, newest: dict[str, ModelMeta], now: float) -> None:
        for name, meta in newest.items():
            f = self.followed.get(name)
            if f is None:
                tally = tally_for(meta, self.prefix)
                for topic, payload in self._statuses.items():
                    tally.feed(topic, payload)
                self.followed[name] = self._recall(name, _Followed(meta, tally, now), now)
                self._dirty = True
                continue
            if _rollout_key(meta) == _rollout_key(f.meta):
                continue
            self._dirty = True
            if (meta.version, meta.seq) != (f.meta.version, f.meta.seq):
                f.tally = tally_for(meta, self.prefix)
                for topic, payload in self._statuses.items():
                    f.tally.feed(topic, payload)
                f.before_halt, f.forgiven = None, (0, 0)
                f.decisions.clear()
            else:
                r = meta.rollout
                f.tally.set_rollout(
                    None if r is None else r.shares, None if r is None else r.halted
                )
            f.meta, f.changed_at = meta, now
        for name in set(self.followed) - set(newest):
            del self.followed[name]
            self._dirty = True

    def _recall(self, slot: str, f: _Followed, now: float) -> _Followed:
        """``f`` with what the last run remembered of the same version (nothing if another)."""
        saved = self._remembered.get(slot)
        if saved is None or (saved.version, saved.seq) != (f.meta.version, f.meta.seq):
            return f
        f.before_halt, f.forgiven = saved.halted_at, saved.forgiven
        f.decisions.extend(saved.decisions)
        r = f.meta.rollout
        if (None if r is None else r.shares, None if r is None else r.halted) == (
            saved.shares,
            saved.halted,
        ):  # unchanged while the console was away: its soak goes on
            f.changed_at = now - max(0.0, self.wall() - saved.changed_ts)
            log.info(
                "%s %s: at %s since %.0f s ago (remembered from before the restart)",
                slot,
                f.meta.version,
                "not staged" if r is None else shares_text(r.shares),
                now - f.changed_at,
            )
        return f

    def _persist(self) -> None:
        """Save what changed to the memory file; a failure is one log line (tried again)."""
        if not self._dirty or self.memory is None:
            return
        now, wall = self.clock(), self.wall()
        rollouts = {}
        for slot, f in sorted(self.followed.items()):
            r = f.meta.rollout
            rollouts[slot] = Remembered(
                version=f.meta.version,
                seq=f.meta.seq,
                shares=None if r is None else dict(r.shares),
                halted=None if r is None else r.halted,
                changed_ts=wall - (now - f.changed_at),
                halted_at=f.before_halt,
                forgiven=f.forgiven,
                decisions=list(f.decisions),
            )
        try:
            save(self.memory, rollouts)
        except OSError as err:
            message = f"rollouts: cannot save {self.memory} ({err.strerror}): a restart forgets"
            if message != self._save_error:
                log.error("%s", message)
            self._save_error = message
            return
        self._dirty, self._save_error = False, None

    def _summary(self, f: _Followed) -> RolloutSummary:
        return since_resume(f.tally.summary(), *f.forgiven)

    def _drive(self, slot: str) -> Decision | None:
        f = self.followed[slot]
        decision = decide(
            self._summary(f), f.meta.rollout, self.clock() - f.changed_at, self.policy
        )
        if decision is None:
            return None
        return self._apply(slot, decision, expect=_rollout_key(f.meta))

    # -- the operator's buttons -------------------------------------------------------------

    def halt(self, slot: str, reason: str = "halted by the operator") -> Decision:
        """Halt ``slot``'s rollout now (OperatorError when there is none to halt)."""
        with self._lock:
            self._refresh()
            f = self._staged(slot)
            if f.meta.rollout is not None and f.meta.rollout.halted:
                raise OperatorError(f"{slot} {f.meta.version}: the rollout is already halted")
            decision = Decision("halt", reason, halted(f.meta.rollout, reason))
            try:
                return self._applied(slot, decision, _rollout_key(f.meta))
            finally:
                self._persist()

    def resume(self, slot: str) -> Decision:
        """Resume a halted rollout at the share it had (the first step when unknown)."""
        with self._lock:
            self._refresh()
            f = self._staged(slot)
            r = f.meta.rollout
            if r is None or not r.halted:
                raise OperatorError(f"{slot} {f.meta.version}: the rollout is not halted")
            share = f.before_halt or self.policy.steps[0]
            summary = f.tally.summary()
            decision = Decision(
                "resume",
                f"resumed by the operator at {shares_text({ALL: share})} "
                f"({summary.failed} failures so far set aside)",
                raised(r, share, None),
            )
            try:
                applied = self._applied(slot, decision, _rollout_key(f.meta))
                f.forgiven = (summary.failed, summary.attempted)
                return applied
            finally:
                self._persist()

    def _applied(self, slot: str, decision: Decision, expect: tuple[Any, ...]) -> Decision:
        """The operator's ``decision``, signed; OperatorError when the rollout just changed."""
        if self._apply(slot, decision, expect) is None:
            raise OperatorError(
                f"{slot}: the rollout was changed by another console or inferctl just now; "
                "look again and retry"
            )
        return decision

    def _staged(self, slot: str) -> _Followed:
        f = self.followed.get(slot)
        if f is None:
            raise OperatorError(f"{slot} is not published")
        if f.meta.rollout is None:
            raise OperatorError(f"{slot} {f.meta.version} is not staged: it goes to every device")
        return f

    # -- signing ----------------------------------------------------------------------------

    def _apply(
        self, slot: str, decision: Decision, expect: tuple[Any, ...] | None
    ) -> Decision | None:
        """Sign ``decision`` unless the metadata changed (``expect``); publish its event."""
        f = self.followed[slot]
        with signing_lock(self.repo.path, timeout=LOCK_TIMEOUT_S, who=self.console_id):
            if expect is not None:
                _p, _t, now_meta = self.repo.model(slot, f.meta.version)
                if _rollout_key(now_meta) != expect:
                    log.info("%s: the rollout changed elsewhere; deciding again", slot)
                    return None  # another console or inferctl got there first: next tick
            driver = RolloutDriver(
                self.repo, slot, f.meta.version, broker=self._broker, prefix=self.prefix
            )
            driver.client = self._client()  # the console's one client, never a second
            driver.poke = driver.client is not None  # not connected: devices see it at a poll
            share = (f.meta.rollout.shares.get(ALL) if f.meta.rollout else None) or None
            unsigned = driver.meta
            try:
                driver.sign(decision.rollout)
            except (MqttError, RuntimeError) as err:
                if driver.meta is unsigned:
                    raise OperatorError(f"{slot}: {decision.action} not signed: {err}") from err
                # signed; only the poke failed (paho raises RuntimeError when disconnected):
                # devices see the change at their next poll
                driver.notes.append(f"the groups were not poked: {err}")
        self._dirty = True
        if decision.action == "halt":
            f.before_halt = share
        f.meta, f.changed_at = driver.meta, self.clock()
        f.decisions.appendleft(
            {"ts": time.time(), "action": decision.action, "reason": decision.reason}
        )
        r = driver.meta.rollout
        f.tally.set_rollout(None if r is None else r.shares, None if r is None else r.halted)
        self._event(driver.meta, decision, driver.notes)
        return decision

    def _event(self, meta: ModelMeta, decision: Decision, notes: list[str]) -> None:
        level: Literal["info", "warning"] = "warning" if decision.action == "halt" else "info"
        event = Event(
            device=self.console_id,
            kind="rollout",
            level=level,
            message=f"{decision.action} {meta.name} {meta.version}: {decision.reason}",
            model=meta.name,
            version=meta.version,
            details={
                "action": decision.action,
                "seq": meta.seq,
                "shares": None if meta.rollout is None else meta.rollout.shares,
                "halted": None if meta.rollout is None else meta.rollout.halted,
                "notes": notes,
            },
        )
        log.info("%s", event.message)
        self.on_event(event)
        client = self._client()
        if client is not None:
            topic = f"{self.prefix}/{self.console_id}/events"
            client.publish(topic, msgspec.json.encode(event), qos=1)

    # -- output -----------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Each followed slot's rollout: the tally, the signed shares and what comes next."""
        out = []
        with self._lock:
            now = self.clock()
            for slot in sorted(self.followed):
                f = self.followed[slot]
                summary = f.tally.summary()
                r = f.meta.rollout
                row = summary.to_json()
                share = None if r is None else r.shares.get(ALL, 0)
                step = (
                    None
                    if share is None or r is None or r.halted
                    else next_step(self.policy, share)
                )
                row |= {
                    "staged": r is not None,
                    "share_all": share,
                    "next_step": step,
                    "soak_left_s": (
                        None
                        if step is None or not self.policy.drive
                        else max(0.0, self.policy.soak_s - (now - f.changed_at))
                    ),
                    "decisions": list(f.decisions),
                    "state": _state(r, share),
                    "halted_at": f.before_halt,
                }
                out.append(row)
        return out


def _state(r: Rollout | None, share: int | None) -> str:
    if r is None:
        return "not staged"
    if r.halted:
        return "halted"
    if share is not None and share >= FULL:
        return "complete"
    return "rolling out"
