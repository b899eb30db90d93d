"""Update paths that only run when something goes wrong: a candidate that hangs past
``state_timeout_s`` (in its load, in the validation gate, in the load after a restart), a latency
budget breached during the trial, an operator's rollback during the trial, a clean stop during
the trial and its resume, and a rollback with no previous version left on disk.

Everything is real: the signed repository over HTTP, the device's DeviceUpdater and ModelSlot,
ONNX models. A hang is a real one: the ``spin`` model loops as many times as its input says, so
golden or warm-up inputs with a large count make a load or the gate run for seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from telemetry.spool import Spool
from tests.support.models import classifier, elementwise, failing, spin
from tests.support.tmpfs import fill
from tests.support.tuf_repo import Device, TufRepo
from updater.meta import ModelMeta

SLOT = "classifier"  # the slot name tests.support.tuf_repo's devices use
HUNG_THREAD = f"inferd-update-{SLOT}-"


def _spin(path: Path) -> Path:
    """:func:`spin` saved with its file name as doc string: each version has its own bytes
    (a candidate with the serving model's digest is the model already served)."""
    spin(path)
    model = onnx.load(str(path))
    model.doc_string = path.name
    onnx.save(model, str(path))
    return path


def _spin_count(seconds: float, model: Path) -> int:
    """The ``spin`` input that runs about ``seconds`` here (measured: the machine may be busy).

    A longer run only makes the hang longer than the timeout; the estimate only bounds how
    long the abandoned thread keeps a core busy after the test has seen the timeout.
    """
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    n = 200_000
    start = time.perf_counter()
    session.run(None, {"n": np.array(n, np.int64)})
    per_iteration = (time.perf_counter() - start) / n
    return max(n, int(seconds / per_iteration))


def _golden(path: Path, n: int) -> Path:
    """Golden inputs ``n`` with their expected output given (``inferctl`` does not run them)."""
    np.savez(path, n=np.array(n, np.int64), count=np.array([min(n, 2**24)], np.float32))
    return path


def _join_hung_threads(timeout: float = 60.0) -> list[str]:
    """Wait for the threads the updater abandoned at a timeout to end; their names."""
    hung = [t for t in threading.enumerate() if t.name.startswith(HUNG_THREAD)]
    deadline = time.monotonic() + timeout
    for t in hung:
        t.join(max(0.0, deadline - time.monotonic()))
        assert not t.is_alive(), f"{t.name} still running after {timeout} s"
    return [t.name for t in hung]


@pytest.fixture(autouse=True)
def _hung_threads_end() -> Iterator[None]:
    """A failed test leaves its hung run behind too: wait for it here, before the leak check
    (it ends by itself: each hang is a few seconds long)."""
    yield
    for t in threading.enumerate():
        if t.name.startswith(HUNG_THREAD):
            t.join(60)


def _record_loads(device: Device) -> list[Any]:
    """Every candidate the slot's update job loads (an observer around the real load)."""
    port = device.updater.jobs[SLOT].slot
    real, loaded = port.load, []

    def load(path: Path, version: str) -> Any:
        candidate = real(path, version)
        loaded.append(candidate)
        return candidate

    port.load = load  # type: ignore[method-assign]
    return loaded


def _count(device: Device, n: int) -> float:
    outputs, _, _ = device.slot.predict({"n": np.array(n, np.int64)})
    return float(outputs["count"][0])


def _failed_reasons(device: Device) -> list[str]:
    return [m for k, m, f in device.events if k == "update" and f["state"] == "failed"]


def _record(device: Device) -> dict[str, Any]:
    path = device.state_dir / "update" / "jobs" / f"{SLOT}.json"
    return msgspec.json.decode(path.read_bytes())


class Watch:
    """Sets an event when the device's updater emits an update event in a given state."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.seen: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        original = device.emit

        def emit(kind: str, message: str, **fields: Any) -> None:
            original(kind, message, **fields)
            if kind == "update":
                self._event(str(fields["state"])).set()

        device.updater.emit = emit

    def _event(self, state: str) -> threading.Event:
        with self.lock:
            return self.seen.setdefault(state, threading.Event())

    def wait(self, state: str, timeout: float = 30.0) -> None:
        assert self._event(state).wait(timeout), (state, self.device.states())


def _in_trial(
    update_device: Callable[..., Device], tuf_repo: TufRepo, tmp_path: Path, **options: Any
) -> tuple[Device, Watch, ModelMeta]:
    """A device on v1 (a 120 s trial window, ``options`` on top) whose updater thread took v2
    and is in its trial: the device, its watch and v2's metadata."""
    device = update_device(classifier(tmp_path / "v1.onnx"), trial_window_s=120.0, **options)
    watch = Watch(device)
    meta = tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.updater.start()  # each slot's job on its own thread, as in the daemon
    watch.wait("trial")
    return device, watch, meta


# -- a candidate that hangs past state_timeout_s -----------------------------------------------


@pytest.mark.parametrize("where", ["load", "gate"])
def test_a_candidate_hanging_past_the_state_timeout_fails_and_is_not_retried(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path, where: str
) -> None:
    """``load``: the candidate's warm-up runs its golden inputs and hangs inside the load.
    ``gate``: warm-up is off, the load returns and the gate's golden run hangs. Either way the
    validating state ends at ``state_timeout_s``, v1 keeps serving, the version is not tried
    again at the next check (its abandoned run would keep another core busy each time), and a
    newer version installs."""
    device = update_device(_spin(tmp_path / "v1.onnx"), state_timeout_s=0.5)
    if where == "gate":
        device.slot.config = msgspec.structs.replace(device.slot.config, warmup_runs=0)
    loaded = _record_loads(device)
    hang = _spin_count(4.0, tmp_path / "v1.onnx")
    tuf_repo.publish(_spin(tmp_path / "v2.onnx"), "2", golden=_golden(tmp_path / "g2.npz", hang))
    start = time.monotonic()
    device.check()
    took = time.monotonic() - start
    assert device.version == "1"
    assert device.states()[-3:] == ["validating", "failed", "idle"], device.states()
    assert _failed_reasons(device) == ["validating -> failed: validating took longer than 0.5 s"]
    assert took < 4.0, f"the check waited {took:.1f} s for a hung candidate"
    assert _count(device, 7) == 7.0, "v1 serves while the candidate hangs"
    assert device.updater.store.active(SLOT) is None
    # the hung version is not downloaded and run again at every check
    device.events.clear()
    tuf_repo.server.requests.clear()
    device.check()
    assert device.states() == ["checking", "idle"]
    assert not [r for r in tuf_repo.server.requests if "/targets/" in r]
    assert set(_join_hung_threads()) <= {f"{HUNG_THREAD}validating"}  # ended, or still going
    # a candidate the hung run loaded after all is closed, not left holding its memory (a
    # load still hanging when the failed job deleted its files fails when it wakes up)
    assert len(loaded) == (1 if where == "gate" else len(loaded))
    assert not [c for c in loaded if c.model.acquire()], "a late candidate left open"
    tuf_repo.publish(_spin(tmp_path / "v3.onnx"), "3", golden=_golden(tmp_path / "g3.npz", 10))
    device.check()
    assert device.version == "3"
    assert _count(device, 5) == 5.0


def test_a_load_hanging_after_a_restart_in_activating_rolls_back_to_the_previous_version(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """The process died right after validation (state ``activating``). At the restart the
    candidate is loaded again, and this time its warm-up inputs make the load hang: past
    ``state_timeout_s`` the job rolls back to the version before instead of waiting for it."""
    device = update_device(_spin(tmp_path / "v1.onnx"), state_timeout_s=0.5)
    tuf_repo.publish(_spin(tmp_path / "v2.onnx"), "2")
    original = device.emit

    class Killed(BaseException):
        pass

    def die_in_activating(kind: str, message: str, **fields: Any) -> None:
        original(kind, message, **fields)
        if fields.get("state") == "activating":
            raise Killed

    device.updater.emit = die_in_activating
    device.updater.request_check("test")
    with pytest.raises(Killed):
        device.updater.run_pending()
    assert _record(device)["state"] == "activating"
    # the restarted daemon warms its slot up on inputs that hang (its warmup_inputs)
    hang = _spin_count(4.0, tmp_path / "v1.onnx")
    np.savez(tmp_path / "warm.npz", n=np.array(hang, np.int64))
    restarted = update_device(
        _spin(tmp_path / "boot.onnx"), state_dir=device.state_dir, state_timeout_s=0.5
    )
    restarted.slot.config = msgspec.structs.replace(
        restarted.slot.config, warmup_inputs=str(tmp_path / "warm.npz")
    )
    start = time.monotonic()
    restarted.updater.run_pending()
    took = time.monotonic() - start
    assert restarted.states() == ["rolled_back", "idle"], restarted.states()
    (reason,) = [m for k, m, f in restarted.events if k == "update" and f["state"] == "rolled_back"]
    assert reason == "activating -> rolled_back: activating took longer than 0.5 s"
    assert took < 4.0
    assert restarted.version == "1" and _count(restarted, 3) == 3.0
    active = restarted.updater.store.active(SLOT)
    assert active is not None and active.seq == 0, "the config's model is active again"
    assert set(_join_hung_threads()) <= {f"{HUNG_THREAD}activating"}


# -- during the trial --------------------------------------------------------------------------


def _traffic(device: Device, n: int, stop: threading.Event, errors: list[BaseException]) -> None:
    while not stop.is_set():
        try:
            _count(device, n)
        except BaseException as err:  # counted: none expected
            errors.append(err)


def test_a_latency_budget_breached_during_the_trial_rolls_back(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """The candidate passes the gate (its golden run is short) but serves real traffic slower
    than its signed budget of 5 ms: the trial rolls back. The latency ratio threshold is set
    out of reach, so only the budget (microseconds in the metadata, nanoseconds in the
    trial) can catch it; a unit mix-up of 1000x would commit instead."""
    device = update_device(
        _spin(tmp_path / "v1.onnx"),
        trial_window_s=30.0,
        trial_min_requests=3,
        trial_max_latency_ratio=1e6,
        trial_latency_slack_ms=0.0,
    )
    slow = _spin_count(0.05, tmp_path / "v1.onnx")  # about 50 ms a request
    golden = _golden(tmp_path / "g2.npz", 10)
    meta = tuf_repo.publish(_spin(tmp_path / "v2.onnx"), "2", golden=golden, latency_budget_ms=5)
    assert meta.latency_budget_us == 5000
    stop, errors = threading.Event(), []
    load = threading.Thread(target=_traffic, args=(device, slow, stop, errors), name="traffic")
    load.start()
    start = time.monotonic()
    try:
        device.check()
    finally:
        stop.set()
        load.join()
    assert errors == []
    assert device.version == "1"
    assert device.states()[-3:] == ["trial", "rolled_back", "idle"], device.states()
    (reason,) = [m for k, m, f in device.events if k == "update" and f["state"] == "rolled_back"]
    assert "is over the budget 5 ms" in reason, reason
    assert time.monotonic() - start < 25, "the breach ended the trial, not its window"


def test_an_operator_rollback_during_the_trial_ends_it_at_once(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    device, watch, meta = _in_trial(update_device, tuf_repo, tmp_path)
    assert device.version == "2"
    start = time.monotonic()
    device.updater.request_rollback(SLOT)
    watch.wait("idle", timeout=20)
    assert time.monotonic() - start < 10, "the rollback waited for the trial window"
    assert device.version == "1"
    (reason,) = [m for k, m, f in device.events if k == "update" and f["state"] == "rolled_back"]
    assert reason == "trial -> rolled_back: trial failed: operator rollback"
    assert device.messages("rollback") == [
        "classifier rolled back from 2 to 1: trial failed: operator rollback"
    ]
    assert _record(device)["failed"] == [meta.seq]
    assert device.slot.last_update is not None
    assert device.slot.last_update.outcome == "rolled_back"


def test_a_clean_stop_during_the_trial_is_no_crash_and_the_trial_resumes(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """SIGTERM in the trial saves ``clean_stop``; the restart does not count it as a crash
    (``crash_loop_restarts: 1`` would roll back at the first one), boots the candidate and
    continues the same trial (same start time) to its end."""
    device, _watch, _meta = _in_trial(update_device, tuf_repo, tmp_path, crash_loop_restarts=1)
    device.updater.stop()
    saved = _record(device)
    assert saved["state"] == "trial" and saved["trial"]["clean_stop"] is True
    started_at = saved["trial"]["started_at"]

    restarted = update_device(
        classifier(tmp_path / "boot.onnx"),
        state_dir=device.state_dir,
        trial_window_s=1.0,
        crash_loop_restarts=1,
    )
    plan = restarted.updater.boot_plan()
    assert plan[SLOT].version == "2", "the candidate boots again: it was no crash"
    assert restarted.messages("restart") == []
    resumed = _record(restarted)
    assert resumed["state"] == "trial"
    assert resumed["trial"]["restarts"] == [] and resumed["trial"]["clean_stop"] is False
    assert resumed["trial"]["started_at"] == started_at, "the same trial goes on"
    restarted.slot.swap(restarted.slot.load(plan[SLOT].path, plan[SLOT].version))
    restarted.updater.run_pending()
    assert restarted.states() == ["committed", "idle"], restarted.states()
    assert restarted.version == "2"
    assert restarted.slot.last_update is not None
    assert restarted.slot.last_update.outcome == "committed"


def test_an_unclean_restart_in_the_trial_is_counted_where_a_clean_stop_is_not(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """The counterpart of the clean stop: the same restart without ``clean_stop`` saved (the
    process was killed) rolls back with ``crash_loop_restarts: 1``."""
    device, _watch, _meta = _in_trial(update_device, tuf_repo, tmp_path, crash_loop_restarts=1)
    saved = _record(device)  # what a SIGKILL leaves: the trial, no clean stop
    device.updater.stop()
    path = device.state_dir / "update" / "jobs" / f"{SLOT}.json"
    path.write_bytes(msgspec.json.encode(saved))
    restarted = update_device(
        classifier(tmp_path / "boot.onnx"), state_dir=device.state_dir, crash_loop_restarts=1
    )
    assert restarted.updater.boot_plan()[SLOT].seq == 0
    assert restarted.messages("restart")
    assert restarted.updater.state.value == "rolled_back"


# -- nothing to roll back to -------------------------------------------------------------------


def test_an_operator_rollback_with_no_previous_version_on_disk_is_refused(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    fresh = update_device(classifier(tmp_path / "fresh.onnx"))
    fresh.updater.request_rollback(SLOT)
    fresh.updater.run_pending()
    assert fresh.messages("rollback-refused") == ["classifier: no previous version on disk"]
    assert fresh.version == "1" and fresh.states() == []
    # updated once, then the version before is deleted from disk
    v1 = classifier(tmp_path / "v1.onnx")
    device = update_device(v1)
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    device.check()
    assert device.version == "2"
    v1.unlink()
    device.events.clear()
    device.updater.request_rollback(SLOT)
    device.updater.run_pending()
    assert device.messages("rollback-refused") == ["classifier: no previous version on disk"]
    assert device.states() == [] and device.version == "2"
    active = device.updater.store.active(SLOT)
    assert active is not None and active.version == "2"
    assert device.slot.predict({"x": np.zeros((1, 4), np.float32)})[0]["probs"].shape == (1, 3)


def test_a_failed_trial_with_no_previous_version_on_disk_reports_and_keeps_serving(
    tuf_repo: TufRepo, update_device: Callable[..., Device], tmp_path: Path
) -> None:
    """The trial fails but the version before was deleted meanwhile: the job says so in an
    ``update-error`` event, ends (no loop), and the slot keeps the only model it has."""
    v1 = elementwise(tmp_path / "v1.onnx", "Relu", TensorProto.FLOAT, [1, 4])
    device = update_device(v1, trial_window_s=30.0, trial_min_requests=5)
    original = device.emit

    def delete_previous_in_trial(kind: str, message: str, **fields: Any) -> None:
        original(kind, message, **fields)
        if fields.get("state") == "trial":
            v1.unlink()

    device.updater.emit = delete_previous_in_trial
    meta = tuf_repo.publish(failing(tmp_path / "bad.onnx"), "2")  # runs on zeros, fails on 0.5
    stop, errors = threading.Event(), []

    def bad_traffic() -> None:
        while not stop.is_set():
            try:
                device.slot.predict({"x": np.full((1, 4), 0.5, np.float32)})
            except Exception as err:  # the failures are the point
                errors.append(err)

    load = threading.Thread(target=bad_traffic, name="bad-traffic")
    load.start()
    try:
        device.check()
    finally:
        stop.set()
        load.join()
    assert errors, "the candidate failed requests during the trial"
    assert device.states()[-3:] == ["trial", "rolled_back", "idle"], device.states()
    assert device.messages("update-error") == [
        "classifier rolled_back: classifier: no previous version on disk to roll back to"
    ]
    assert device.messages("rollback") == []
    assert device.version == "2", "the only model on disk keeps serving"
    last = device.slot.last_update
    assert last is not None and (last.version, last.outcome) == ("2", "failed"), last
    assert last.reason.endswith("no previous version on disk, 2 keeps serving"), last.reason
    assert _record(device)["last"]["outcome"] == "failed"
    assert _record(device)["failed"] == [meta.seq]
    device.events.clear()
    device.check()
    assert device.states() == ["checking", "idle"], "no loop, and the failed version stays out"


# -- a state dir that fills up during a job ----------------------------------------------------


@pytest.fixture
def small_state_dir(tmpfs_factory: Callable[[str, str], Path]) -> Path:
    return tmpfs_factory("state", "2m")


def test_a_job_whose_state_cannot_be_saved_stops_with_one_line_and_finishes_once_it_can(
    tuf_repo: TufRepo,
    update_device: Callable[..., Device],
    tmp_path: Path,
    small_state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk fills up (other files) while a version downloads: the download fails, and so
    does saving the ``failed`` state. The job goes no further on a state it could not save,
    v1 serves throughout, the log says why in one line; once space is freed, the next check
    finishes the job's clean-up and installs the next version."""
    device = update_device(classifier(tmp_path / "v1.onnx"), state_dir=small_state_dir)
    watch = Watch(device)
    big = classifier(tmp_path / "v2.onnx", seed=2)
    model = onnx.load(str(big))
    model.graph.initializer.append(
        onnx.numpy_helper.from_array(np.ones(512 * 1024, np.float32), "pad")
    )
    onnx.save(model, str(big))
    tuf_repo.publish(big, "2")
    fillers: list[Path] = []
    original = device.updater.emit
    assert original is not None

    def fill_in_downloading(kind: str, message: str, **fields: Any) -> None:
        original(kind, message, **fields)
        if fields.get("state") == "downloading" and not fillers:
            fillers.append(fill(small_state_dir))

    device.updater.emit = fill_in_downloading
    caplog.set_level(logging.INFO, logger="updater")
    device.updater.start()
    watch.wait("downloading")
    deadline = time.monotonic() + 20
    while not [r for r in caplog.records if r.levelno >= logging.ERROR]:
        assert time.monotonic() < deadline, device.states()
        time.sleep(0.05)
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.exc_info is None, "one line, no traceback"
    assert "cannot save update state: No space left on device" in error.getMessage()
    assert _record(device)["state"] == "downloading", "the file keeps the last saved state"
    (cause,) = [
        r.getMessage() for r in caplog.records if "update downloading failed" in r.getMessage()
    ]
    assert "No space left on device" in cause and "trusted root" not in cause, cause
    assert device.version == "1"
    fillers[0].unlink()
    tuf_repo.publish(classifier(tmp_path / "v3.onnx", seed=3), "3")
    device.updater.request_check("space freed")
    watch.wait("committed")
    assert device.version == "3"


def test_update_events_a_full_spool_refuses_are_one_line_each_and_the_update_goes_on(
    tuf_repo: TufRepo,
    update_device: Callable[..., Device],
    tmp_path: Path,
    small_state_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The events go to a real spool whose disk is full: each refused event is one log line
    naming it, and the update installs all the same (serving matters more than telemetry)."""
    spool = Spool(small_state_dir / "spool.sqlite", 1 << 30)
    fill(small_state_dir)
    device = update_device(classifier(tmp_path / "v1.onnx"))

    def emit(kind: str, message: str, **fields: Any) -> None:
        device.emit(kind, message, **fields)
        spool.put("inferd/d/events", msgspec.json.encode({"kind": kind, "m": message}))

    device.updater.emit = emit
    tuf_repo.publish(classifier(tmp_path / "v2.onnx", seed=2), "2")
    caplog.set_level(logging.INFO, logger="updater")
    try:
        device.check()
    finally:
        spool.close()
    assert device.version == "2"
    refused = [r for r in caplog.records if r.getMessage().startswith("cannot emit update event")]
    assert len(refused) == len(device.events) > 5
    assert all(r.exc_info is None and "the disk is full" in r.getMessage() for r in refused)
