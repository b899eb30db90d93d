"""Model slots: a named place that serves one model version at a time and swaps atomically.

A swap replaces the slot's reference in one assignment. Requests that already hold the old
model finish on it; the old backend is closed when the last of them returns, so no request
fails because of a swap.

With dynamic batching on (``max_batch`` > 1, :mod:`agent.batching`) each loaded model has its
own batcher. Requests queued for the old model at a swap finish on it, as every other request
that already held it: its batcher runs what is queued without waiting out windows, then its
thread ends and is joined when the old model closes. Nothing is re-queued to the new model.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from agent.batching import Batcher, Clock, batch_refusal
from agent.config import ModelConfig
from runtime.backends import Backend, open_backend
from runtime.errors import BackendError, NotReadyError
from telemetry.payloads import EventSink, LastUpdate, UpdateState

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Prediction:
    """What listeners hear about each request: enough for metrics, prediction logs and quality."""

    model: str
    version: str
    request_id: str
    ts: float
    latency_ns: int
    feeds: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    error: str | None = None


Listener = Callable[[Prediction], None]
Later = list[Callable[[], None]]
"""Work a caller runs once its reply is out (see :meth:`ModelSlot.predict`)."""

# Request ids: 20 random hex digits per process and a 12-digit counter, the length of a uuid4
# hex and as unique across restarts, at a seventh of uuid4's 2.5 us (next() on a count is
# atomic under the GIL, so threads never share one).
_ID_PREFIX = os.urandom(10).hex()
_ids = itertools.count()


@dataclass(eq=False)
class LoadedModel:
    """One loaded model version; reference-counted so a swap never closes it under a request."""

    backend: Backend
    version: str
    path: Path
    digest: str
    loaded_at: float = field(default_factory=time.time)
    batcher: Batcher | None = None
    """Queues and batches this model's requests (dynamic batching); None: unbatched."""
    _inflight: int = 0
    _waiting: int = 0
    _retired: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _idle: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self._lock)

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                if self._waiting:  # a Condition's notify_all costs 1.5 us, waiters or not
                    self._idle.notify_all()
                if self._retired:
                    self._close_locked()

    def retire(self) -> None:
        """Stop taking new requests; close once the in-flight ones have finished."""
        if self.batcher is not None:
            self.batcher.stop()  # runs what is queued at once, without waiting out windows
        with self._lock:
            self._retired = True
            if self._inflight == 0:
                self._close_locked()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request holds this model; False on timeout."""
        with self._lock:
            self._waiting += 1
            try:
                return self._idle.wait_for(lambda: self._inflight == 0, timeout)
            finally:
                self._waiting -= 1

    def _close_locked(self) -> None:
        if not self._closed:
            self._closed = True
            if self.batcher is not None:
                self.batcher.join()  # nothing is queued: every queued request holds the model
            self.backend.close()

    @property
    def inflight(self) -> int:
        return self._inflight


def load_model(
    config: ModelConfig, path: str | Path, version: str, cache_dir: Path | None
) -> LoadedModel:
    """Open a backend for ``path`` (warmed up) and wrap it with its version and digest."""
    p = Path(path)
    backend = open_backend(p, config, cache_dir)
    return LoadedModel(backend=backend, version=version, path=p, digest=file_digest(p))


class ModelSlot:
    """Serves the current model of one configured slot; ``predict`` is thread-safe."""

    def __init__(self, config: ModelConfig, cache_dir: Path | None = None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self._current: LoadedModel | None = None
        self._swap_lock = threading.Lock()
        # max_concurrency run tokens; a C SimpleQueue costs 0.05 us a request where a
        # BoundedSemaphore (Python, over a Condition) cost 2 us, a third of the slot's overhead
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(config.max_concurrency):
            self._tokens.put(None)
        self.listeners: list[Listener] = []
        self.update_state = UpdateState.IDLE
        self.last_update: LastUpdate | None = None
        """How the last update job of this slot ended (set by the updater)."""
        self.emit_event: EventSink | None = None
        """Where the slot's own events go (a failed warm-up); set by telemetry when it runs."""
        self.batch_clock: Clock = time.perf_counter_ns
        """The clock of the batchers of models loaded from now on (tests give a fake)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def current(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise NotReadyError(f"model {self.name!r} is not loaded")
        return model

    @property
    def ready(self) -> bool:
        return self._current is not None

    def load(self, path: str | Path, version: str) -> LoadedModel:
        """Load a model file for this slot without serving it (validation, then :meth:`swap`).

        A failed warm-up is a warning event, not a failure: the model loaded and serves.
        """
        model = load_model(self.config, path, version, self.cache_dir)
        error = model.backend.warmup_error
        if error is not None and self.emit_event is not None:
            self.emit_event(
                "warmup-failed",
                f"{self.name} {version}: {error}; the model serves",
                level="warning",
                model=self.name,
                version=version,
            )
        if self.config.max_batch > 1:
            self._set_up_batching(model)
        return model

    def _set_up_batching(self, model: LoadedModel) -> None:
        """Give ``model`` a batcher (started when it is swapped in), or say why it has none."""
        why = batch_refusal(model.backend)
        if why is None:
            model.batcher = Batcher(
                self.name,
                model.backend,
                self.config.max_batch,
                self.config.batch_window_us,
                self.batch_clock,
            )
            return
        message = (
            f"{self.name} {model.version}: batching refused: {why}; the model serves unbatched"
        )
        log.warning("%s", message)
        if self.emit_event is not None:
            self.emit_event(
                "batching-refused", message, level="warning", model=self.name, version=model.version
            )

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        """Serve ``new`` from now on; the previous model is retired and returned."""
        if new.batcher is not None:
            new.batcher.start()
        with self._swap_lock:
            old = self._current
            self._current = new
        if old is not None:
            old.retire()
        log.info("%s: now serving version %s", self.name, new.version)
        return old

    def _acquire(self) -> LoadedModel:
        while True:
            model = self._current
            if model is None:
                raise NotReadyError(f"model {self.name!r} is not loaded")
            if model.acquire():
                return model

    def predict(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        request_id: str | None = None,
        later: Later | None = None,
    ) -> tuple[dict[str, np.ndarray], LoadedModel, str]:
        """Check and run ``feeds``; returns (outputs, the model that served, request id).

        The backend checks the feeds and output names and times the run, once
        (:meth:`runtime.backends.base.Backend.run_timed`): listeners get its latency.
        With ``later``, a successful request's listeners are told by a job appended to it,
        which the caller runs once its reply is sent: the HTTP API does, so its client does not
        wait for the metrics, quality and prediction-log bookkeeping, which overlaps the
        client's own work when the two run on different cores (there, 10-20 us of a small
        request's p50 on the 2-core development machine). A failed request's listeners are
        told at once.
        """
        model = self._acquire()
        try:
            rid = request_id or f"{_ID_PREFIX}{next(_ids):012x}"
            if model.batcher is not None:
                return self._predict_batched(model, model.batcher, rid, feeds, output_names, later)
            tokens = self._tokens
            tokens.get()  # waits while max_concurrency requests run
            try:
                outputs, latency = model.backend.run_timed(feeds, output_names)
            except BackendError as err:
                self._tell(model, rid, err.latency_ns or 0, feeds, None, str(err))
                raise
            finally:
                tokens.put(None)
            self._tell(model, rid, latency, feeds, outputs, None, later)
            return outputs, model, rid
        finally:
            model.release()

    def _predict_batched(
        self,
        model: LoadedModel,
        batcher: Batcher,
        rid: str,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None,
        later: Later | None,
    ) -> tuple[dict[str, np.ndarray], LoadedModel, str]:
        """:meth:`predict` through the model's batcher: one check here, one run per batch;
        the latency listeners hear is this request's queue wait plus its batch's run.

        The slot's run tokens are not taken: the batcher is the one thread running this model
        (two during a swap, the old model's finishing its queue).
        """
        try:
            outputs, latency = batcher.submit(feeds, output_names)
        except BackendError as err:
            self._tell(model, rid, err.latency_ns or 0, feeds, None, str(err))
            raise
        self._tell(model, rid, latency, feeds, outputs, None, later)
        return outputs, model, rid

    def _tell(
        self,
        model: LoadedModel,
        rid: str,
        latency_ns: int,
        feeds: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        error: str | None,
        later: Later | None = None,
    ) -> None:
        """Tell the listeners about a request, now or (with ``later``) once its reply is out."""
        if not self.listeners:
            return
        args = (model.version, rid, time.time(), latency_ns, feeds, outputs, error)
        if later is None:
            self._tell_now(*args)
        else:  # even the event is made after the reply
            later.append(partial(self._tell_now, *args))

    def _tell_now(
        self,
        version: str,
        rid: str,
        ts: float,
        latency_ns: int,
        feeds: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray] | None,
        error: str | None,
    ) -> None:
        event = Prediction(self.name, version, rid, ts, latency_ns, feeds, outputs, error)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("%s: prediction listener failed", self.name)

    def close(self) -> None:
        """Stop serving; requests already queued or running finish first (SIGTERM drains)."""
        with self._swap_lock:
            old, self._current = self._current, None
        if old is not None:
            old.retire()
            if old.batcher is not None:
                old.batcher.join()  # the queue is run before the thread ends
