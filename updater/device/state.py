"""One slot's persisted update job: the machine's tables as data, state saved before each step.

::

    idle -> checking -> downloading -> verifying -> staging -> validating -> activating
         -> trial -> committed                       (failed and rolled_back are the other exits)

Each model slot has its own record (``update/jobs/<slot>.json``), so one slot's trial never
holds up another slot's update. The record is written with fsync + atomic rename *before* the
work of the state it names, so after a crash or power loss :data:`RESUME` says what to do on
the way back up. A loop breaker fails a job that keeps coming back to the same state (a
candidate that crashes the process while it is validated) or that makes more transitions than
any honest job needs. Devices from before per-slot jobs kept one ``update/state.json`` for the
whole device; :func:`migrate_legacy` splits it once, so a job interrupted by the upgrade resumes.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from runtime.durable import fsync_dir, write_atomic
from runtime.errors import StateError, StorageError
from telemetry.payloads import LastUpdate, UpdateOutcome, UpdateState
from updater.meta import label_error

log = logging.getLogger(__name__)


State = UpdateState  # the wire contract's type: status payloads carry these very values
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


class OnRestart(str, enum.Enum):
    """What a job does when the process comes back up with its record in a given state."""

    NOTHING = "nothing"
    """No job."""
    REPEAT = "repeat"
    """The state's work is idempotent (partial downloads are temp files, staging builds in a
    hidden folder and renames, activation re-points the store and swaps if needed): run it
    again. The loop breaker counts these: a job that keeps dying in one state fails
    (``failed`` before activation, ``rolled_back`` after)."""
    COUNT_CRASH = "count_crash"
    """The candidate serves and the process died: the restart counts as a crash;
    ``crash_loop_restarts`` of them inside the trial window roll back before the slot loads
    the failing version again. A clean stop (SIGTERM) is not counted."""
    RESTORE_PREVIOUS = "restore_previous"
    """Point the store back at the previous version *before* the slot loads, so the daemon
    boots the version rolled back to, then finish the rollback (idempotent)."""
    FINISH = "finish"
    """The job has ended; finish its cleanup (pruning, deleting files: idempotent)."""


RESUME: dict[State, OnRestart] = {
    S.IDLE: OnRestart.NOTHING,
    S.CHECKING: OnRestart.REPEAT,
    S.DOWNLOADING: OnRestart.REPEAT,
    S.VERIFYING: OnRestart.REPEAT,  # a missing or partial file fails verification
    S.STAGING: OnRestart.REPEAT,
    S.VALIDATING: OnRestart.REPEAT,  # a fresh load, the old one died with the process
    S.ACTIVATING: OnRestart.REPEAT,
    S.TRIAL: OnRestart.COUNT_CRASH,
    S.COMMITTED: OnRestart.FINISH,
    S.FAILED: OnRestart.FINISH,
    S.ROLLED_BACK: OnRestart.RESTORE_PREVIOUS,
}
"""What a job does after the process died while its record named each state (the Mender
client's per-state restart handling, as data): the updater dispatches on it at boot."""

TERMINAL = frozenset({S.COMMITTED, S.FAILED, S.ROLLED_BACK})
_OUTCOMES: dict[State, UpdateOutcome] = {
    S.COMMITTED: "committed",
    S.FAILED: "failed",
    S.ROLLED_BACK: "rolled_back",
}
MAX_RESUMES = 3
"""Repeating the same state of the same job after a restart more often than this fails it."""
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


class TrialRecord(msgspec.Struct, kw_only=True):
    """The persisted part of a trial: when it started and what it is judged against."""

    started_at: float
    baseline_mean_ns: float = 0.0
    """Mean latency of the version before, for the latency ratio threshold."""
    restarts: list[float] = []
    """Wall-clock times of unclean restarts during the trial (crash loop detection)."""
    clean_stop: bool = False


class Record(msgspec.Struct, kw_only=True):
    """What is persisted for one slot: its job's state, the job and what the loop breaker needs."""

    state: State = S.IDLE
    job: Job | None = None
    entered_at: float = 0.0
    reason: str = ""
    resumes: int = 0
    transitions: int = 0
    trial: TrialRecord | None = None
    failed: list[int] = []
    """The seqs of this slot's versions that failed validation or trial: not retried."""
    last: LastUpdate | None = None
    """How the slot's last job ended (shown in the retained status)."""


class LegacyRecord(msgspec.Struct, kw_only=True):
    """The device-wide ``update/state.json`` from before per-slot jobs (read once, to migrate)."""

    state: State = S.IDLE
    job: Job | None = None
    entered_at: float = 0.0
    reason: str = ""
    resumes: int = 0
    transitions: int = 0
    trial: TrialRecord | None = None
    failed: dict[str, list[int]] = {}
    last: dict[str, LastUpdate] = {}


def split_legacy(old: LegacyRecord) -> dict[str, Record]:
    """One record per slot the device-wide record mentions; its job goes to the job's slot."""
    names = {*old.failed, *old.last, *([old.job.slot] if old.job is not None else [])}
    records = {n: Record(failed=list(old.failed.get(n, [])), last=old.last.get(n)) for n in names}
    if old.job is not None:
        rec = records[old.job.slot]
        rec.state, rec.job, rec.trial = old.state, old.job, old.trial
        rec.entered_at, rec.reason = old.entered_at, old.reason
        rec.resumes, rec.transitions = old.resumes, old.transitions
    # a job-less non-idle state (checking) belongs to no slot: the next check repeats it
    return records


def migrate_legacy(legacy: Path, jobs_dir: Path) -> list[str]:
    """Split a device-wide ``state.json`` into per-slot records in ``jobs_dir``, once.

    The old file is renamed to ``state.json.migrated`` only after every slot's record is
    durable; a crash in between repeats the split, which writes the same records (nothing runs
    before it). Returns the slots written.
    """
    try:
        data = legacy.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StorageError(f"{legacy}: cannot read update state: {err.strerror}") from err
    try:
        records = split_legacy(msgspec.json.decode(data, type=LegacyRecord))
    except msgspec.DecodeError as err:
        log.error("%s: unreadable update state (%s); starting every slot from idle", legacy, err)
        legacy.replace(legacy.with_suffix(".corrupt"))
        return []
    written = []
    try:
        for name, rec in sorted(records.items()):
            if label_error("slot", name) is not None:  # our own file, but it names a path
                log.error("%s: skipping slot %r: not a slot name", legacy, name)
                continue
            write_atomic(jobs_dir / f"{name}.json", msgspec.json.encode(rec))
            written.append(name)
        legacy.replace(legacy.with_name(legacy.name + ".migrated"))
        fsync_dir(legacy.parent)
    except OSError as err:
        raise StorageError(f"{legacy}: cannot migrate update state: {err.strerror}") from err
    log.info("update state split into per-slot jobs: %s", ", ".join(written) or "none")
    return written


Listener = Callable[[State, State, Record], None]


class StateMachine:
    """The persisted record and the only way to change it: :meth:`transition`."""

    def __init__(self, path: Path, clock: Callable[[], float], listener: Listener | None = None):
        self.path = path
        self.clock = clock
        self.listener = listener
        self.load_error: StorageError | None = None
        """Why the record on disk could not be read (the record is then a blank one, never
        saved over the file: :meth:`resume` raises this)."""
        try:
            self.record = self._load()
        except StorageError as err:
            self.load_error, self.record = err, Record()

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
        if self.load_error is not None:  # never over a file that could not be read
            raise self.load_error
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
        self.record.last = last
        return last

    def resume(self) -> OnRestart:
        """After a restart: what to do about the job (see :data:`RESUME`), loop breaker applied.

        Each restart of a job is counted (saved); past :data:`MAX_RESUMES` in a state whose
        work is repeated, the job moves to ``failed`` (before activation) or ``rolled_back``
        (after) and the action of that state is returned instead.
        """
        if self.load_error is not None:
            raise self.load_error
        rec = self.record
        action = RESUME[rec.state]
        if action is OnRestart.NOTHING:
            return action
        rec.resumes += 1
        self.save()
        if action is OnRestart.REPEAT and rec.resumes > MAX_RESUMES:
            exit_to = S.FAILED if S.FAILED in TRANSITIONS[rec.state] else S.ROLLED_BACK
            self.transition(
                exit_to, f"loop breaker: restarted {rec.resumes} times in {rec.state.value}"
            )
            return RESUME[exit_to]
        return action

    def looping(self) -> bool:
        """Whether the current job made more transitions than any honest one needs."""
        return self.record.transitions > MAX_TRANSITIONS

    def in_progress(self) -> bool:
        return self.record.state in _IN_PROGRESS
