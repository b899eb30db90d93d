"""The device's persisted update state machine: tables as data, state saved before each step.

::

    idle -> checking -> downloading -> verifying -> staging -> validating -> activating
         -> trial -> committed                       (failed and rolled_back are the other exits)

The record is written with fsync + atomic rename *before* the work of the state it names, so
after a crash or power loss :data:`RESUME` says where to pick up. A loop breaker fails a job
that keeps coming back to the same state (a candidate that crashes the process while it is
validated) or that makes more transitions than any honest job needs.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from runtime.durable import write_atomic
from runtime.errors import StateError, StorageError
from telemetry.payloads import LastUpdate, UpdateOutcome

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


S = State
_IN_PROGRESS = (S.DOWNLOADING, S.VERIFYING, S.STAGING, S.VALIDATING)

TRANSITIONS: dict[State, frozenset[State]] = {
    S.IDLE: frozenset({S.CHECKING, S.ROLLED_BACK}),  # rolled_back: an operator's cmd/rollback
    S.CHECKING: frozenset({S.IDLE, S.DOWNLOADING, S.FAILED}),
    # any step before activation may go back to checking: a newer version supersedes the job
    S.DOWNLOADING: frozenset({S.VERIFYING, S.CHECKING, S.FAILED}),
    S.VERIFYING: frozenset({S.STAGING, S.CHECKING, S.FAILED}),
    S.STAGING: frozenset({S.VALIDATING, S.CHECKING, S.FAILED}),
    S.VALIDATING: frozenset({S.ACTIVATING, S.CHECKING, S.FAILED}),
    # once the store points at the candidate, the way out is a rollback
    S.ACTIVATING: frozenset({S.TRIAL, S.ROLLED_BACK}),
    S.TRIAL: frozenset({S.COMMITTED, S.ROLLED_BACK}),
    S.COMMITTED: frozenset({S.IDLE}),
    S.FAILED: frozenset({S.IDLE}),
    S.ROLLED_BACK: frozenset({S.IDLE}),
}
"""Which state may follow which; anything else is a bug and raises StateError."""

RESUME: dict[State, State] = {
    S.IDLE: S.IDLE,
    S.CHECKING: S.CHECKING,
    S.DOWNLOADING: S.DOWNLOADING,  # partial downloads live in temp files and are discarded
    S.VERIFYING: S.VERIFYING,  # re-verify the file; a missing one fails verification
    S.STAGING: S.STAGING,  # copying again over a partial copy is harmless
    S.VALIDATING: S.VALIDATING,  # a fresh load, the old one died with the process
    S.ACTIVATING: S.ACTIVATING,  # idempotent: point the store at the candidate, serve it
    S.TRIAL: S.TRIAL,  # the restart is counted; too many inside the window is a crash loop
    S.COMMITTED: S.COMMITTED,  # finish pruning old versions
    S.FAILED: S.FAILED,  # finish cleaning up
    S.ROLLED_BACK: S.ROLLED_BACK,  # idempotent: make sure the previous version is active
}
"""Where a job continues after the process died while its record named each state."""

TERMINAL = frozenset({S.COMMITTED, S.FAILED, S.ROLLED_BACK})
_OUTCOMES: dict[State, UpdateOutcome] = {
    S.COMMITTED: "committed",
    S.FAILED: "failed",
    S.ROLLED_BACK: "rolled_back",
}
MAX_RESUMES = 3
"""Resuming the same state of the same job more often than this fails the job."""
MAX_TRANSITIONS = 64


class Job(msgspec.Struct, kw_only=True):
    """The update in progress: which target for which slot, as verified during the check."""

    slot: str
    version: str
    seq: int
    path: str
    target: dict[str, Any]
    extras: dict[str, dict[str, Any]] = {}
    staged: str | None = None
    """The model file in the store once staged."""


class Trial(msgspec.Struct, kw_only=True):
    started_at: float
    baseline_mean_ns: float = 0.0
    """Mean latency of the version before, for the latency ratio threshold."""
    restarts: list[float] = []
    """Wall-clock times of unclean restarts during the trial (crash loop detection)."""
    clean_stop: bool = False


class Record(msgspec.Struct, kw_only=True):
    """What is persisted: the state, its job and what the loop breaker needs."""

    state: State = S.IDLE
    job: Job | None = None
    entered_at: float = 0.0
    reason: str = ""
    resumes: int = 0
    transitions: int = 0
    trial: Trial | None = None
    failed: dict[str, list[int]] = {}
    """Per slot, the seqs of versions that failed validation or trial: not retried."""
    last: dict[str, LastUpdate] = {}
    """Per slot, how its last job ended (shown in the retained status)."""


Listener = Callable[[State, State, Record], None]


class StateMachine:
    """The persisted record and the only way to change it: :meth:`transition`."""

    def __init__(self, path: Path, clock: Callable[[], float], listener: Listener | None = None):
        self.path = path
        self.clock = clock
        self.listener = listener
        self.record = self._load()

    def _load(self) -> Record:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Record()
        except OSError as err:
            raise StorageError(f"{self.path}: cannot read update state: {err.strerror}") from err
        try:
            return msgspec.json.decode(data, type=Record)
        except msgspec.DecodeError as err:
            # only reachable by a broken disk (writes are atomic): start clean, keep the evidence
            log.error("%s: unreadable update state (%s); starting from idle", self.path, err)
            self.path.replace(self.path.with_suffix(".corrupt"))
            return Record()

    def save(self) -> None:
        """Write the record durably (fsync + atomic rename)."""
        try:
            write_atomic(self.path, msgspec.json.encode(self.record))
        except OSError as err:
            raise StorageError(f"{self.path}: cannot save update state: {err.strerror}") from err

    @property
    def state(self) -> State:
        return self.record.state

    def transition(self, to: State, reason: str = "", **changes: Any) -> None:
        """Move to ``to`` (which must be in the table), save, then tell the listener."""
        rec = self.record
        before = rec.state
        if to not in TRANSITIONS[before]:
            raise StateError(f"illegal update transition {before.value} -> {to.value}")
        for key, value in changes.items():
            setattr(rec, key, value)
        rec.state = to
        rec.reason = reason
        rec.entered_at = self.clock()
        rec.resumes = 0
        rec.transitions = 1 if before == S.IDLE else rec.transitions + 1
        if to in TERMINAL and rec.job is not None:
            self.end_job(rec.job, _OUTCOMES[to], reason)  # saved with the state it ends in
        if to == S.IDLE:
            rec.job = None
            rec.trial = None
        self.save()
        if self.listener is not None:
            self.listener(before, to, rec)

    def end_job(self, job: Job, outcome: UpdateOutcome, reason: str) -> LastUpdate:
        """Record how ``job`` ended; saved with the next :meth:`save` or transition."""
        last = LastUpdate(
            version=job.version,
            seq=job.seq,
            outcome=outcome,
            reason=reason,
            ts=datetime.fromtimestamp(self.clock(), timezone.utc),
        )
        self.record.last[job.slot] = last
        return last

    def resume(self) -> State:
        """After a restart: the state to continue in (saved), with the loop breaker applied.

        Returns the state whose work must run next; a job that keeps dying in the same state
        is moved to ``failed`` (before activation) or ``rolled_back`` (after).
        """
        rec = self.record
        target = RESUME[rec.state]
        if target != rec.state:
            self.transition(target, "resumed after restart")
            return target
        if rec.state == S.IDLE:
            return S.IDLE
        rec.resumes += 1
        self.save()
        if rec.resumes > MAX_RESUMES and rec.state not in TERMINAL and rec.state != S.TRIAL:
            exit_to = S.FAILED if S.FAILED in TRANSITIONS[rec.state] else S.ROLLED_BACK
            self.transition(
                exit_to, f"loop breaker: restarted {rec.resumes} times in {rec.state.value}"
            )
            return exit_to
        return rec.state

    def looping(self) -> bool:
        """Whether the current job made more transitions than any honest one needs."""
        return self.record.transitions > MAX_TRANSITIONS

    def in_progress(self) -> bool:
        return self.record.state in _IN_PROGRESS
