"""The device side of updates: one persisted update job per model slot, each on its own thread.

A check is triggered by a poke (MQTT, which can only ever trigger a check), by the poll
interval or by ``cmd/check-update``. A found version is downloaded and verified through TUF,
staged in the store, validated beside the serving model, swapped in, then watched during a
trial window: a breach of the error rate or latency thresholds, or a crash loop, rolls back to
the previous version kept on disk. Every transition is an event; the slot's ``update_state``
mirrors the job for the retained status, and its ``last_update`` says how the last job ended
(persisted with the state, so a fleet view sees failures after the fact and after a restart).

Each slot's job (:class:`SlotJob`) has its own state file and its own thread, so a slot in a
60 s trial never holds up another slot's check, download, validation or swap, and a crash
resumes every slot where it was. What the jobs share is thread-safe: the TUF client (metadata
refreshed under a lock) and the model store (one folder and record per slot).

The updater never imports the agent: it drives a slot through :class:`SlotPort`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from runtime import bundle
from runtime.errors import (
    CancelledError,
    InferdError,
    StepTimeoutError,
    StorageError,
    UpdateError,
    ValidationError,
)
from runtime.tensors import Signature
from telemetry.payloads import EventSink, LastUpdate, UpdateOutcome, UpdateState
from updater.device.client import Offer, RepositoryClient
from updater.device.config import UpdatesConfig
from updater.device.state import (
    TERMINAL,
    TRANSITIONS,
    Job,
    OnRestart,
    Record,
    State,
    StateMachine,
    TrialRecord,
    migrate_legacy,
)
from updater.device.store import Entry, ModelStore
from updater.device.validation import CandidateModel, validate
from updater.meta import ModelMeta, meta_from_custom

log = logging.getLogger(__name__)

T = TypeVar("T")
S = State


class RunCounts(NamedTuple):
    """Cumulative counters of the model a slot serves (the backend's RunStats)."""

    runs: int
    errors: int
    total_ns: int

    def __sub__(self, other: tuple[int, ...]) -> RunCounts:
        return RunCounts(*(a - b for a, b in zip(self, other, strict=True)))


@dataclass(frozen=True)
class Serving:
    """What a slot serves now."""

    version: str
    path: str
    sha256: str
    signature: Mapping[str, Sequence[Mapping[str, Any]]]
    stats: RunCounts


class SlotPort(Protocol):
    """A model slot as the updater sees it (the agent adapts its ModelSlot to this)."""

    name: str
    runtime: str

    def serving(self) -> Serving | None:
        """The model serving now, None when the slot has none."""
        ...

    def load(self, path: Path, version: str) -> CandidateModel:
        """Load ``path`` in a fresh backend, warmed up, without serving it."""
        ...

    def activate(self, candidate: CandidateModel) -> None:
        """Serve ``candidate`` from now on (atomic; in-flight requests finish on the old one)."""
        ...

    def set_update_state(self, state: UpdateState) -> None:
        """Reflect the update state in the retained status."""
        ...

    def set_last_update(self, last: LastUpdate) -> None:
        """Reflect how the slot's last update job ended in the retained status."""
        ...


def _job_meta(job: Job) -> ModelMeta:
    meta = meta_from_custom(job.target.get("custom"))
    if meta is None:  # only reachable with a hand-edited state file
        raise UpdateError(f"{job.path}: the job's target has no model metadata")
    return meta


def _runs(active: Entry | None, offer: Offer) -> bool:
    return active is not None and active.seq == offer.meta.seq


def _entry(job: Job) -> Entry:
    return Entry(
        version=job.version,
        seq=job.seq,
        path=job.staged or "",
        sha256=str(job.target.get("hashes", {}).get("sha256", "")),
    )


def _close_late(value: Any) -> None:
    """Close what a step that ran past its timeout returned (a candidate, or one in a tuple)."""
    for item in value if isinstance(value, tuple) else (value,):
        close = getattr(item, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("cannot close a result that came after its timeout")


def _job_paths(job: Job) -> list[str]:
    return [job.path, *job.extras] if job.path else list(job.extras)


class SlotJob:
    """One slot's persisted update job, the steps that advance it and the thread that runs them.

    Built by :class:`DeviceUpdater`, which owns what the jobs share (TUF client, store,
    settings, events, the stop event).
    """

    def __init__(self, owner: DeviceUpdater, name: str, slot: SlotPort, state_file: Path) -> None:
        self.owner = owner
        self.name = name
        self.slot = slot
        self.client = owner.client
        self.store = owner.store
        self.settings = owner.settings
        self.clock = owner.clock
        self.machine = StateMachine(state_file, owner.clock, self._on_transition)
        self._stop = owner._stop
        self._wake = threading.Event()
        self._check = threading.Event()
        self._rollback = threading.Event()
        self._candidate: CandidateModel | None = None
        self._trial_base: RunCounts | None = None
        self._thread: threading.Thread | None = None
        self._abandoned: list[threading.Thread] = []
        self._steps: dict[State, Callable[[Record], None]] = {
            S.CHECKING: self._checking,
            S.DOWNLOADING: self._downloading,
            S.VERIFYING: self._verifying,
            S.STAGING: self._staging,
            S.VALIDATING: self._validating,
            S.ACTIVATING: self._activating,
            S.TRIAL: self._trial,
            S.COMMITTED: self._committed,
            S.FAILED: self._failed,
            S.ROLLED_BACK: self._rolled_back,
        }
        self._on_restart: dict[OnRestart, Callable[[Record], None]] = {
            OnRestart.COUNT_CRASH: self._count_crash,
            OnRestart.RESTORE_PREVIOUS: self._restore_previous,
        }

    @property
    def state(self) -> State:
        return self.machine.state

    # -- boot, requests, thread ---------------------------------------------------------------

    def resume(self) -> None:
        """After a (re)start, before the slot loads: apply the job's :data:`RESUME` action."""
        rec = self.machine.record
        action = self.machine.resume()
        handler = self._on_restart.get(action)
        if handler is not None:
            handler(rec)
        if rec.last is not None:
            self.slot.set_last_update(rec.last)
        if rec.job is not None and rec.state != S.IDLE:
            self.slot.set_update_state(rec.state)

    def _count_crash(self, rec: Record) -> None:
        trial = rec.trial
        if trial is None:
            return
        if trial.clean_stop:  # stopped by SIGTERM in the trial: not a crash
            trial.clean_stop = False
            self.machine.save()
            return
        now = self.clock()
        window = self.settings.trial_window_s
        trial.restarts = [t for t in trial.restarts if now - t <= window] + [now]
        self.machine.save()
        self._event(
            "restart",
            f"{self.name}: restarted during the trial ({len(trial.restarts)} in the window)",
            level="warning",
            model=self.name,
            version=rec.job.version if rec.job else None,
        )
        if len(trial.restarts) >= self.settings.crash_loop_restarts:
            self._mark_failed(rec)
            self.machine.transition(
                S.ROLLED_BACK, f"crash loop: {len(trial.restarts)} restarts in trial"
            )
            self._restore_previous(rec)

    def _restore_previous(self, rec: Record) -> None:
        # point the store back before the daemon loads the failed version again
        if rec.job is not None and rec.job.staged:
            self.store.rollback(self.name, failed=_entry(rec.job))

    def request_check(self) -> None:
        self._check.set()
        self._wake.set()

    def request_rollback(self) -> None:
        self._rollback.set()
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name=f"inferd-update-{self.name}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, deadline: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.error("%s: update thread did not stop in time", self.name)
            self._thread = None
        for t in self._abandoned:
            t.join(0.5)

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.owner.poll_delay()
        while not self._stop.is_set():
            try:
                self.run_pending()
            except InferdError as err:  # e.g. its state cannot be saved (a full disk)
                log.error("%s: update job stopped until the next check: %s", self.name, err)
                self._stop.wait(1.0)
            except Exception:
                log.exception("%s: update loop error", self.name)
                self._stop.wait(1.0)
            if self._stop.is_set():
                break
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.owner.poll_delay()
                self._check.set()
                continue
            if self._wake.wait(next_poll - now):
                self._wake.clear()

    def run_pending(self) -> None:
        """Advance the job until it is idle with nothing requested (or stopping)."""
        while not self._stop.is_set():
            rec = self.machine.record
            if rec.state == S.IDLE:
                if not self._start_something():
                    return
                continue
            before = rec.state
            try:
                self._steps[before](rec)
            except CancelledError:
                return
            except UpdateError as err:
                self._step_failed(before, err)
            if self._stop.is_set():
                return
            if self.machine.looping():
                self._step_failed(self.machine.state, UpdateError("loop breaker: too many steps"))
            elif self.machine.in_progress() and self._check.is_set():
                self._check.clear()
                self.machine.transition(S.CHECKING, "re-check: a newer version may supersede")

    def _start_something(self) -> bool:
        if self._rollback.is_set():
            self._rollback.clear()
            self._manual_rollback()
            return True
        if self._check.is_set():
            self._check.clear()
            self.machine.transition(S.CHECKING, "check")
            return True
        return False

    def _step_failed(self, state: State, err: UpdateError) -> None:
        rec = self.machine.record
        log.warning("%s: update %s failed: %s", self.name, state.value, err)
        # A candidate that hangs in its load or the gate is refused like one that fails there:
        # tried again at every check, each try would leave one more run spinning on a core.
        hung = state == S.VALIDATING and isinstance(err, StepTimeoutError)
        if isinstance(err, ValidationError) or hung:
            self._mark_failed(rec)
        if S.FAILED in TRANSITIONS[state]:
            self.machine.transition(S.FAILED, str(err))
        elif S.ROLLED_BACK in TRANSITIONS[state]:
            self._mark_failed(rec)
            self.machine.transition(S.ROLLED_BACK, str(err))
        else:  # the exits themselves failed: report, and do not loop on it
            self._event(
                "update-error", f"{self.name} {state.value}: {err}", level="error", model=self.name
            )
            self.machine.transition(S.IDLE, f"{state.value} did not complete: {err}")

    # -- steps (each runs after its state was saved) ------------------------------------------

    def _deadline(self) -> float:
        return time.monotonic() + self.settings.state_timeout_s

    def _checking(self, rec: Record) -> None:
        offers = self.client.check(
            [self.name], self.owner.groups, deadline=self._deadline(), cancel=self._stop
        )
        job = self._pick(offers, rec)
        current = rec.job
        if job is None:
            if current is not None:
                # e.g. its rollout was halted: say so, the IDLE event names no job
                self._event(
                    "update-withdrawn",
                    f"{current.slot} {current.version} is no longer offered to this device",
                    model=current.slot,
                    version=current.version,
                    seq=current.seq,
                )
                self._discard(current)
                self._end_job(current, "withdrawn", "no longer offered to this device")
                self.slot.set_update_state(S.IDLE)  # nothing in progress
            self.machine.transition(S.IDLE, "up to date")
            return
        if current is not None and current.seq == job.seq:
            self.machine.transition(S.DOWNLOADING, "continuing", job=current)
            return
        if current is not None:
            self._event(
                "update-superseded",
                f"{current.slot} {current.version} superseded by {job.version}",
                model=current.slot,
                version=current.version,
                seq=current.seq,
            )
            self._discard(current)
            self._end_job(current, "superseded", f"superseded by {job.version}")
        self.machine.transition(
            S.DOWNLOADING, f"{job.slot} {job.version} published (seq {job.seq})", job=job
        )

    def _pick(self, offers: Sequence[Offer], rec: Record) -> Job | None:
        """The newest version for this slot, among those this device is in.

        A staged version the device has not joined is not downloaded; the version it runs
        stays a candidate, so a halted rollout never takes a device back down.
        """
        name, owner = self.name, self.owner
        active = self.store.active(name)
        mine = [
            o
            for o in offers
            if o.meta.name == name
            and (o.meta.joins(owner.device_id, owner.groups) or _runs(active, o))
        ]
        skipped = sum(o.meta.name == name for o in offers) - len(mine)
        if skipped:
            log.debug("%s: %d staged version(s) not rolled out to this device", name, skipped)
        if not mine:
            return None
        best = max(mine, key=lambda o: o.meta.seq)
        serving = self.slot.serving()
        if best.meta.seq in rec.failed:
            log.info("%s: %s failed before; waiting for a newer one", name, best.meta.version)
            return None
        if active is not None and active.seq == best.meta.seq:
            return None
        if active is None and serving is not None and serving.sha256 == best.sha256:
            return None  # the config's model is the published one
        return Job(
            slot=name,
            version=best.meta.version,
            seq=best.meta.seq,
            path=best.path,
            target=best.target,
            extras=best.extras,
        )

    def _downloading(self, rec: Record) -> None:
        job = self._job(rec)
        deadline = self._deadline()
        for path, target in [(job.path, job.target), *job.extras.items()]:
            self.client.download(path, target, deadline=deadline, cancel=self._stop)
        self.machine.transition(S.VERIFYING, f"downloaded {job.target.get('length')} bytes")

    def _verifying(self, rec: Record) -> None:
        job = self._job(rec)
        for path, target in [(job.path, job.target), *job.extras.items()]:
            self.client.verify(path, target, self.client.cached(path))
        self.machine.transition(S.STAGING, "length and sha256 match the signed target")

    def _staging(self, rec: Record) -> None:
        job = self._job(rec)
        meta = _job_meta(job)
        name = job.path.rpartition("/")[2]
        files = {name: self.client.cached(job.path)}
        if meta.golden:
            files[bundle.GOLDEN_FILE] = self.client.cached(meta.golden)
        if meta.reference_stats:
            files[bundle.REFERENCE_FILE] = self.client.cached(meta.reference_stats)
        vdir = self.store.stage(job.slot, job.seq, job.version, files)
        self.client.verify(job.path, job.target, vdir / name)
        job.staged = str(vdir / name)
        self.machine.transition(S.VALIDATING, f"staged in {vdir}", job=job)

    def _validating(self, rec: Record) -> None:
        job = self._job(rec)
        slot = self.slot
        meta = _job_meta(job)
        if meta.runtime != slot.runtime:
            raise ValidationError(
                f"the version is for {meta.runtime}; the slot runs {slot.runtime}"
            )
        staged = Path(job.staged or "")
        golden = (staged.parent / bundle.GOLDEN_FILE).read_bytes() if meta.golden else None
        serving = slot.serving()
        serving_sig = Signature.from_json(serving.signature) if serving is not None else None

        def gate() -> tuple[CandidateModel, dict[str, Any]]:
            try:
                candidate = slot.load(staged, job.version)
            except UpdateError:
                raise
            except Exception as err:
                raise ValidationError(f"candidate does not load: {err}") from err
            try:
                report = validate(
                    candidate, meta, serving_sig, golden, self.settings.validation_runs
                )
            except BaseException:
                candidate.close()
                raise
            return candidate, report.to_json()

        candidate, report = self._bounded(S.VALIDATING, gate)
        self._candidate = candidate
        self._event(
            "validation-passed",
            f"{job.slot} {job.version} passed validation (p99 {report['p99_ms']} ms)",
            model=job.slot,
            version=job.version,
            **report,
        )
        self.machine.transition(S.ACTIVATING, "validation passed")

    def _activating(self, rec: Record) -> None:
        job = self._job(rec)
        slot = self.slot
        serving = slot.serving()
        entry = _entry(job)
        if self.store.record(job.slot).active is None and serving is not None:
            # the config's model becomes the version to roll back to
            before = Entry(version=serving.version, seq=0, path=serving.path, sha256=serving.sha256)
        else:
            before = None
        baseline = serving.stats if serving is not None else RunCounts(0, 0, 0)
        self.store.activate(job.slot, entry, before)
        if serving is None or serving.sha256 != entry.sha256:
            candidate = self._candidate
            self._candidate = None
            if candidate is None:  # resumed after a restart: load it again
                candidate = self._bounded(
                    S.ACTIVATING, lambda: slot.load(Path(entry.path), job.version)
                )
            slot.activate(candidate)
        self._candidate = None
        after = slot.serving()
        self._trial_base = after.stats if after is not None else None
        mean = baseline.total_ns / baseline.runs if baseline.runs else 0.0
        trial = TrialRecord(started_at=self.clock(), baseline_mean_ns=mean)
        self.machine.transition(S.TRIAL, f"{job.slot} now serves {job.version}", trial=trial)

    def _trial(self, rec: Record) -> None:
        job = self._job(rec)
        slot = self.slot
        cfg = self.settings
        trial = rec.trial or TrialRecord(started_at=self.clock())
        end = trial.started_at + cfg.trial_window_s
        meta = _job_meta(job)
        budget_ns = meta.latency_budget_us * 1000 if meta.latency_budget_us else None
        base = self._trial_base
        breach = None
        counts = RunCounts(0, 0, 0)
        while True:
            serving = slot.serving()
            if serving is None:
                breach = "the slot stopped serving"
                break
            if base is None:
                base = serving.stats
            counts = serving.stats - base
            breach = self._breach(counts, trial.baseline_mean_ns, budget_ns)
            if self._rollback.is_set():
                self._rollback.clear()
                breach = "operator rollback"
            now = self.clock()
            if breach is not None or now >= end or self._stop.is_set():
                break
            # the wake event: an operator rollback ends the wait at once
            self._wake.wait(min(cfg.trial_check_interval_s, max(0.0, end - now)))
            self._wake.clear()
        self._trial_base = None
        if breach is None and self._stop.is_set():
            trial.clean_stop = True
            self.machine.save()
            raise CancelledError("stopping during the trial")
        if breach is not None:
            self._mark_failed(rec)
            self.machine.transition(S.ROLLED_BACK, f"trial failed: {breach}")
            return
        low = counts.runs < cfg.trial_min_requests
        note = f" (only {counts.runs} requests: thresholds not judged)" if low else ""
        self.machine.transition(
            S.COMMITTED, f"trial passed: {counts.runs} requests, {counts.errors} errors{note}"
        )

    def _breach(self, c: RunCounts, baseline_mean_ns: float, budget_ns: int | None) -> str | None:
        cfg = self.settings
        if c.runs < cfg.trial_min_requests:
            return None
        rate = c.errors / c.runs
        if rate > cfg.trial_max_error_rate:
            return (
                f"error rate {rate:.1%} over {cfg.trial_max_error_rate:.1%} ({c.errors}/{c.runs})"
            )
        mean = c.total_ns / c.runs
        # Sub-millisecond models jitter by several x (cold caches after the swap, a busy core);
        # only a slowdown that is also large in absolute terms counts.
        slower = mean - baseline_mean_ns > cfg.trial_latency_slack_ms * 1e6
        if (
            baseline_mean_ns > 0
            and slower
            and mean > cfg.trial_max_latency_ratio * baseline_mean_ns
        ):
            return (
                f"mean latency {mean / 1e6:.2f} ms is over {cfg.trial_max_latency_ratio}x "
                f"the previous version's {baseline_mean_ns / 1e6:.2f} ms"
            )
        if budget_ns is not None and mean > budget_ns:
            return f"mean latency {mean / 1e6:.2f} ms is over the budget {budget_ns / 1e6:g} ms"
        return None

    def _committed(self, rec: Record) -> None:
        job = self._job(rec)
        self.store.prune(job.slot)
        self.client.discard(_job_paths(job))
        self.machine.transition(S.IDLE, f"{job.slot} {job.version} committed")

    def _failed(self, rec: Record) -> None:
        if rec.job is not None:
            self._discard(rec.job)
            self.client.discard(_job_paths(rec.job))
        self.machine.transition(S.IDLE, "cleaned up after the failure")

    def _rolled_back(self, rec: Record) -> None:
        job = self._job(rec)
        slot = self.slot
        prev = self.store.rollback(job.slot, failed=_entry(job))
        if prev is None:
            # Nothing was rolled back: the job's outcome says so, not "rolled_back"
            self._end_job(
                job,
                "failed",
                f"{rec.reason}; no previous version on disk, {job.version} keeps serving",
            )
            raise UpdateError(f"{job.slot}: no previous version on disk to roll back to")
        serving = slot.serving()
        if serving is None or serving.sha256 != prev.sha256 or serving.path != prev.path:
            candidate = self._bounded(
                S.ROLLED_BACK, lambda: slot.load(Path(prev.path), prev.version)
            )
            slot.activate(candidate)
        self.client.discard(_job_paths(job))
        self._event(
            "rollback",
            f"{job.slot} rolled back from {job.version} to {prev.version}: {rec.reason}",
            level="warning",
            model=job.slot,
            version=prev.version,
            failed_version=job.version,
        )
        self.machine.transition(S.IDLE, f"{job.slot} serves {prev.version} again")

    def _manual_rollback(self) -> None:
        name = self.name
        active = self.store.active(name)
        if active is None or self.store.previous(name) is None:
            self._event(
                "rollback-refused",
                f"{name}: no previous version on disk",
                level="warning",
                model=name,
            )
            return
        job = Job(
            slot=name,
            version=active.version,
            seq=active.seq,
            path="",
            target={"hashes": {"sha256": active.sha256}},
            staged=active.path,
        )
        rec = self.machine.record
        self.machine.transition(S.ROLLED_BACK, "operator rollback", job=job)
        self._mark_failed(rec)

    # -- plumbing -----------------------------------------------------------------------------

    def _job(self, rec: Record) -> Job:
        if rec.job is None:
            raise UpdateError(f"{self.name}: no job recorded in state {rec.state.value}")
        return rec.job

    def _mark_failed(self, rec: Record) -> None:
        if rec.job is None or rec.job.seq == 0:
            return
        if rec.job.seq not in rec.failed:
            rec.failed.append(rec.job.seq)
            del rec.failed[:-20]
        self.machine.save()

    def _end_job(self, job: Job, outcome: UpdateOutcome, reason: str) -> None:
        """A job dropped before a terminal state (those are recorded by the state machine)."""
        self.slot.set_last_update(self.machine.end_job(job, outcome, reason))

    def _discard(self, job: Job) -> None:
        if self._candidate is not None:
            self._candidate.close()
            self._candidate = None
        if job.staged:
            self.store.discard(job.slot, Path(job.staged).parent)

    def _bounded(self, state: State, fn: Callable[[], T]) -> T:
        """Run ``fn`` on its own thread within the state's timeout (loads can hang)."""
        box: dict[str, Any] = {}
        lock = threading.Lock()

        def run() -> None:
            try:
                value = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
                with lock:
                    box["error"] = err
                return
            with lock:
                late = "abandoned" in box
                if not late:
                    box["value"] = value
            if late:  # nobody will take it: a loaded candidate would hold its memory forever
                _close_late(value)

        t = threading.Thread(
            target=run, name=f"inferd-update-{self.name}-{state.value}", daemon=True
        )
        t.start()
        deadline = time.monotonic() + self.settings.state_timeout_s
        while t.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            t.join(0.05)
        with lock:
            hung = "value" not in box and "error" not in box
            if hung:
                box["abandoned"] = True
        if hung:
            self._abandoned.append(t)
            if self._stop.is_set():
                raise CancelledError(f"stopping during {state.value}")
            raise StepTimeoutError(
                f"{state.value} took longer than {self.settings.state_timeout_s:g} s"
            )
        if "error" in box:
            raise box["error"]
        value: T = box["value"]
        return value

    def _event(self, kind: str, message: str, **fields: Any) -> None:
        self.owner.event(kind, message, **fields)

    def _on_transition(self, before: State, to: State, rec: Record) -> None:
        job = rec.job
        if job is not None and to != S.IDLE:
            self.slot.set_update_state(to)
            if to in TERMINAL and rec.last is not None:
                self.slot.set_last_update(rec.last)
        level = "info"
        if to in (S.FAILED, S.ROLLED_BACK):
            level = "warning" if before == S.CHECKING else "error"
        log.info("update %s: %s -> %s %s", self.name, before.value, to.value, rec.reason)
        self._event(
            "update",
            f"{before.value} -> {to.value}: {rec.reason}",
            level=level,
            model=job.slot if job else self.name,
            version=job.version if job else None,
            state=to.value,
            previous_state=before.value,
            seq=job.seq if job else None,
            terminal=to in TERMINAL,
        )


class DeviceUpdater:
    """The device's update jobs, one per slot (:class:`SlotJob`), and what they share."""

    def __init__(
        self,
        *,
        client: RepositoryClient,
        state_dir: str | Path,
        slots: Mapping[str, SlotPort],
        groups: Sequence[str] = (),
        device_id: str = "",
        settings: UpdatesConfig | None = None,
        emit: EventSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.slots = dict(slots)
        self.groups = tuple(groups)
        self.device_id = device_id
        """Decides, with the groups, which staged rollouts this device joins."""
        self.settings = settings or UpdatesConfig()
        self.emit = emit
        self.clock = clock
        self.store = ModelStore(state_dir, self.settings.keep_versions)
        work = Path(state_dir) / "update"
        jobs_dir = work / "jobs"
        # a device upgraded from one device-wide job keeps its job and its slots' history
        try:
            migrate_legacy(work / "state.json", jobs_dir)
        except StorageError as err:  # tried again at the next start; serving comes first
            log.error("updates: %s", err)
        self._stop = threading.Event()
        self._booted = False
        self._boot_error: InferdError | None = None
        self.jobs = {
            name: SlotJob(self, name, slot, jobs_dir / f"{name}.json")
            for name, slot in self.slots.items()
        }

    # -- the daemon's side ------------------------------------------------------------------

    def boot_plan(self) -> dict[str, Entry]:
        """Call before the slots load: resume every slot's job and say which version each loads.

        An unclean restart during a trial counts as a crash; ``crash_loop_restarts`` of them
        inside the trial window roll back before the failing version is loaded again.
        """
        if not self._booted:
            self._booted = True
            try:
                for job in self.jobs.values():
                    job.resume()
            except InferdError as err:  # kept: start() must not run jobs it could not resume
                self._boot_error = err
            else:
                # what a killed download left behind, except what resumed jobs still need
                needed = [
                    path
                    for job in self.jobs.values()
                    if (rec := job.machine.record).job is not None and rec.state not in TERMINAL
                    for path in _job_paths(rec.job)
                ]
                self.client.clear_downloads(keep=needed)
        if self._boot_error is not None:
            raise self._boot_error
        return {name: e for name in self.slots if (e := self.store.active(name)) is not None}

    def start(self) -> None:
        """Start one thread per slot (resuming interrupted jobs first).

        With update state it cannot read (:meth:`boot_plan` fails), no job runs: the daemon
        serves its config's models and says why, and nothing on disk is touched until fixed.
        """
        try:
            self.boot_plan()
        except InferdError as err:
            log.error("updates: not started until the update state is readable: %s", err)
            return
        self._stop.clear()
        for job in self.jobs.values():
            if self.settings.check_on_start:
                job.request_check()
            job.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every job at its next safe point; interrupted jobs resume at the next start."""
        self._stop.set()
        for job in self.jobs.values():
            job.wake()
        deadline = time.monotonic() + timeout
        for job in self.jobs.values():
            job.join(deadline)

    def request_check(self, reason: str = "poke") -> None:
        """Every slot checks for updates soon (pokes, ``cmd/check-update``), each on its own."""
        log.info("update check requested: %s", reason)
        for job in self.jobs.values():
            job.request_check()

    def request_rollback(self, slot: str) -> None:
        """Roll ``slot`` back to its previous version (``cmd/rollback``)."""
        if slot not in self.jobs:
            raise UpdateError(f"no model slot named {slot!r}")
        self.jobs[slot].request_rollback()

    def run_pending(self) -> None:
        """Advance every slot's job on the calling thread, one slot after the other (tests,
        tools); the daemon runs each on its own thread instead (:meth:`start`)."""
        for job in self.jobs.values():
            job.run_pending()

    def states(self) -> dict[str, State]:
        """Each slot's update state."""
        return {name: job.state for name, job in self.jobs.items()}

    @property
    def state(self) -> State:
        """The one slot's state; with several, the first that is not idle (else idle)."""
        busy = [s for s in self.states().values() if s != S.IDLE]
        return busy[0] if busy else S.IDLE

    # -- shared by the jobs ---------------------------------------------------------------------

    def poll_delay(self) -> float:
        # +-10 % jitter: a fleet that booted together (after a power cut) must not keep
        # polling the repository in lockstep
        return self.settings.poll_interval_s * random.uniform(0.9, 1.1)

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """Emit an update event (never raises: a broken link must not break a job)."""
        emit = self.emit  # read each time: the agent attaches its link after construction
        if emit is None:
            return
        try:
            emit(kind, message, **fields)
        except InferdError as err:  # the spool refused it (a full disk): the job goes on
            log.error("cannot emit update event %s (%s): %s", kind, message, err)
        except Exception:
            log.exception("cannot emit update event %s", kind)
