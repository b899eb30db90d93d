"""Dynamic batching: concurrent requests to one model run as one batch and are split back.

Triton's dynamic batcher in small: a model with ``max_batch`` > 1 gets a queue and a thread
(``inferd-batch-<model>``). The thread takes the oldest request, waits up to
``batch_window_us`` after it arrived for more requests that can share its run (same non-batch
shapes and dtypes, same requested outputs) until the batch holds ``max_batch`` rows, stacks their
inputs along axis 0, runs the model once and hands each request its own rows of every output.

What stays per request: the check of its inputs (before it joins a queue, so a bad input fails
alone with the same 400 as unbatched), its id, its latency (queue wait + run), its listeners'
record (metrics count, prediction log). What is per batch: the backend's run counters, its
observer and the run's error, which every request of that batch gets (each its own exception,
with its own latency). On this 2-core machine a request costs the HTTP path some hundreds of
microseconds whatever the model, so batching pays where the run itself is the larger part
(``bench/batching.py`` measures an MLP classifier; a model run under ~50 us gains nothing).

A model can be batched when every input has a dynamic first dimension (the same symbolic one,
where the runtime names them) and every output has a dynamic first dimension too; otherwise
:func:`batch_refusal` says why and the model serves unbatched. Whether the model's rows are
independent of each other (no op mixes rows) is for the operator who turns batching on to
know; a batch whose outputs do not have one row per input row is served request by request and
batching is turned off for that model with a warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from runtime.backends.base import Backend
from runtime.errors import BackendError, InferdError

log = logging.getLogger(__name__)

Clock = Callable[[], int]
"""Monotonic nanoseconds (``time.perf_counter_ns``; a fake in tests)."""

JOIN_TIMEOUT_S = 5.0
"""How long closing a batcher waits for its thread to finish the queue (a wedged run)."""


def batch_refusal(backend: Backend) -> str | None:
    """Why ``backend``'s model cannot be batched along axis 0, None when it can."""
    if not backend.inputs:
        return "the model has no inputs"
    first_names = set()
    for spec in backend.inputs:
        if not spec.shape or spec.shape[0] is not None:
            dims = [-1 if d is None else d for d in spec.shape]
            return f"input {spec.name!r} has no dynamic first dimension (shape {dims})"
        if spec.dim_names and spec.dim_names[0] is not None:
            first_names.add(spec.dim_names[0])
    if len(first_names) > 1:
        return (
            "the inputs' first dimensions are different symbols"
            f" ({', '.join(sorted(first_names))}), not one batch axis"
        )
    for spec in backend.outputs:
        if not spec.shape or spec.shape[0] is not None:
            dims = [-1 if d is None else d for d in spec.shape]
            return f"output {spec.name!r} has no dynamic first dimension (shape {dims})"
    return None


class _Request:
    """One request waiting in a batcher: its checked feeds, and its result once run."""

    __slots__ = (
        "done",
        "error",
        "feeds",
        "key",
        "latency_ns",
        "names",
        "outputs",
        "queued_ns",
        "rows",
    )

    def __init__(
        self,
        feeds: Mapping[str, np.ndarray],
        names: Sequence[str] | None,
        key: object,
        rows: int,
        queued_ns: int,
    ) -> None:
        self.feeds = feeds
        self.names = names
        self.key = key
        self.rows = rows
        self.queued_ns = queued_ns
        # a plain lock as a one-shot latch: the cheapest wake-up CPython has (an Event is a
        # Condition over one); held from here until the batcher has put the result in
        self.done = threading.Lock()
        self.done.acquire()
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.latency_ns = 0


def _key(feeds: Mapping[str, np.ndarray], names: Sequence[str] | None) -> tuple[object, int]:
    """(what requests must share to run together, rows). A request whose inputs disagree on
    their first dimension gets a key of its own: it runs alone, failing as it would unbatched."""
    rows = -1
    shapes = []
    for name in sorted(feeds):
        arr = feeds[name]
        if rows == -1:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            return object(), rows
        shapes.append((name, arr.shape[1:], arr.dtype.str))
    return (tuple(shapes), tuple(names) if names else None), rows


class Batcher:
    """The queue and batching thread of one loaded model; ``submit`` is thread-safe.

    Lifecycle: :meth:`start` when the model starts serving, :meth:`stop` when it is retired
    (the thread runs what is queued without waiting for windows, then ends; a request that
    comes after runs alone on the caller's thread), :meth:`join` when the model closes.
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        max_batch: int,
        window_us: int,
        clock: Clock = time.perf_counter_ns,
    ) -> None:
        self.name = name
        self.backend = backend
        self.max_batch = max_batch
        self.window_ns = window_us * 1000
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[_Request] = deque()
        self._stopping = False
        self._split_ok = True
        self._thread: threading.Thread | None = None
        # Wake-ups cost a thread switch each (tens of us on a busy 2-core machine, as much as
        # a small model's run): a submitter wakes the thread only when it waits for a first
        # request, or when the rows it is short of (``_need``) for its batch have arrived.
        self._idle = False
        self._forming_key: object = None
        self._need = 0
        self.batches = 0
        """Batches run (each one backend run), for tests and the curious."""
        self.forming = 0
        """Requests in the batch being gathered right now (0 when none is)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batching thread (idempotent)."""
        with self._cond:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(
                target=self._loop, name=f"inferd-batch-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Take no more requests into the queue; the thread finishes the queue, then ends."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Stop and wait for the thread to end; False (and a warning) if it did not in time."""
        self.stop()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s: batching thread still running after %.0f s", self.name, timeout)
            return False
        return True

    def wake(self) -> None:
        """Make the thread look at the clock again (a test's fake clock moved)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Requests waiting that no batch has taken yet."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        """Requests waiting for a run: queued, or in the batch being gathered."""
        with self._cond:
            return len(self._pending) + self.forming

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the request side --------------------------------------------------------------------

    def submit(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """Check ``feeds``, queue them, wait for their batch: (outputs, latency in ns).

        InputError before queueing (nothing runs, nothing is counted); BackendError with its
        ``latency_ns`` when the batch's run failed. The latency counts from the moment the
        request joined the queue to the end of its batch's run.
        """
        backend = self.backend
        backend.check_feeds(feeds)
        if output_names:
            backend.check_output_names(output_names)
        key, rows = _key(feeds, output_names)
        request = _Request(feeds, output_names, key, rows, self.clock())
        cond = self._cond
        with cond:
            queued = not self._stopping and self._thread is not None
            if queued:
                self._pending.append(request)
                if self._idle:
                    cond.notify()
                elif key == self._forming_key:
                    self._need -= rows
                    if self._need <= 0:
                        cond.notify()
        if not queued:  # retired while this request was on its way in: run it here, alone
            self._run([request])
        request.done.acquire()
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs, request.latency_ns

    # -- the batching thread -----------------------------------------------------------------

    def _loop(self) -> None:
        cond = self._cond
        pending = self._pending
        while True:
            with cond:
                while not pending and not self._stopping:
                    self._idle = True
                    cond.wait()
                    self._idle = False
                if not pending:
                    return  # stopping, and the queue is empty
                batch = self._gather()
            self._run(batch)

    def _gather(self) -> list[_Request]:
        """Under the lock: the oldest request and what may join it, within its window."""
        pending = self._pending
        first = pending.popleft()
        batch = [first]
        rows = first.rows
        deadline = first.queued_ns + self.window_ns
        max_batch = self.max_batch
        if not self._split_ok:
            return batch
        key = first.key
        scanned = 0  # requests before this index in ``pending`` cannot join
        while rows < max_batch:
            too_big = False
            i = scanned
            while i < len(pending):
                other = pending[i]
                if other.key != key:
                    i += 1
                elif rows + other.rows <= max_batch:
                    del pending[i]
                    batch.append(other)
                    rows += other.rows
                else:
                    too_big = True  # it starts the next batch; this one will not fill up
                    i += 1
            scanned = len(pending)
            self.forming = len(batch)
            if rows >= max_batch or too_big or self._stopping:
                break
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._forming_key, self._need = key, max_batch - rows
            self._cond.wait(remaining / 1e9)
            self._forming_key = None
        self.forming = 0
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """Run ``batch`` once and give every request its rows, or the run's error; always
        releases every request (a waiting client is never left hanging)."""
        try:
            if len(batch) == 1:
                self._run_alone(batch[0])
            else:
                self._run_together(batch)
        except Exception as err:  # handed to each request, raised in its thread
            log.exception("%s: batched run failed unexpectedly", self.name)
            end = self.clock()
            for request in batch:
                if request.outputs is None and request.error is None:
                    request.error = BackendError(f"{self.name}: batched run failed")
                    request.error.__cause__ = err
                    request.error.latency_ns = end - request.queued_ns
        finally:
            self.batches += 1
            for request in batch:
                request.done.release()

    def _run_alone(self, request: _Request) -> None:
        try:
            request.outputs, _ = self.backend.run_timed(request.feeds, request.names)
        except InferdError as err:
            request.error = err
            if isinstance(err, BackendError):
                err.latency_ns = self.clock() - request.queued_ns
        else:
            request.latency_ns = self.clock() - request.queued_ns

    def _run_together(self, batch: list[_Request]) -> None:
        first = batch[0]
        # one concatenation per input; the merged batch passes run_timed's check once more (a
        # microsecond for the batch; every request was checked when it joined)
        feeds = {name: np.concatenate([r.feeds[name] for r in batch]) for name in first.feeds}
        total = sum(r.rows for r in batch)
        try:
            outputs, _ = self.backend.run_timed(feeds, first.names)
        except InferdError as err:
            end = self.clock()
            for request in batch:
                request.error = _own_error(err, end - request.queued_ns)
            return
        end = self.clock()
        wrong = [n for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != total]
        if wrong:
            self._split_ok = False
            log.warning(
                "%s: batching turned off: output %r of a %d-row batch does not have %d rows"
                " (the model mixes rows); serving request by request",
                self.name,
                wrong[0],
                total,
                total,
            )
            for request in batch:
                self._run_alone(request)
            return
        start = 0
        for request in batch:
            stop = start + request.rows
            # copies, not views: a view would keep the whole batch's output alive for as long
            # as any one request's record (the prediction log holds some for a while)
            request.outputs = {n: a[start:stop].copy() for n, a in outputs.items()}
            request.latency_ns = end - request.queued_ns
            start = stop


def _own_error(err: InferdError, latency_ns: int) -> BackendError:
    """A request's own copy of its batch's error (threads must not raise one object at once)."""
    mine = BackendError(str(err))
    mine.__cause__ = err
    mine.latency_ns = latency_ns
    return mine
