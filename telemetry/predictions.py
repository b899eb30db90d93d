"""The prediction log: sampled records of served requests, batched onto ``predictions``.

The slot listener only decides sampling and queues the prediction (well under a microsecond);
the ``inferd-predictions`` thread turns queued predictions into
:class:`~telemetry.payloads.PredictionRecord` (output summary, input digest, optional full
tensors) and publishes one :class:`~telemetry.payloads.PredictionBatch` per ``batch_size``
records or ``batch_ms`` milliseconds, whichever comes first. A record that cannot be queued
because the thread is behind is dropped and counted, as are batches the spool drops.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import msgspec
import numpy as np

from telemetry.metrics import Served
from telemetry.payloads import (
    ClassScore,
    OutputSummary,
    PredictionBatch,
    PredictionRecord,
    SetSampling,
    TensorDump,
)
from telemetry.quality_monitor import PredictionLike

log = logging.getLogger(__name__)

TOP_K = 3
TOP_K_ROWS = 8
"""Rows of a batched classifier output that get a top-k summary."""
_SMALL = 256
"""Outputs up to this many values are summarised in Python: faster than numpy's per-call cost."""

Publish = Callable[[bytes, int], object]
"""``publish(payload, records)``: queue a batch of ``records`` prediction records."""


class Logged(PredictionLike, Served, Protocol):
    """What the log reads from a prediction (the agent's ``slots.Prediction`` fits)."""


def input_digest(feeds: Mapping[str, np.ndarray]) -> str:
    """blake2b-64 over each input's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(feeds) if len(feeds) > 1 else feeds:
        arr = feeds[name]
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}".encode())
        h.update(arr.data if arr.dtype != object else repr(arr.tolist()).encode())
    return h.hexdigest()


def _classifier_rows(arr: np.ndarray, labels: Sequence[str]) -> list[list[float]] | None:
    """The first rows of a classifier output as lists, or None when it is not one.

    A classifier output is float ``[N, C]`` (or ``[C]``) with ``C`` labels configured, or, without
    labels, rows that look like probabilities (softmax output).
    """
    if arr.dtype.kind != "f" or arr.ndim not in (1, 2) or arr.shape[-1] < 2:
        return None
    rows = arr.reshape(-1, arr.shape[-1])[:TOP_K_ROWS]
    if labels and arr.shape[-1] == len(labels):
        return list(rows.tolist())
    if rows.size > _SMALL:
        if rows.min() < 0 or rows.max() > 1 or np.abs(rows.sum(axis=1) - 1).max() > 1e-3:
            return None
        return list(rows.tolist())
    values: list[list[float]] = rows.tolist()
    for row in values:
        if min(row) < 0 or max(row) > 1 or abs(sum(row) - 1) > 1e-3:
            return None
    return values


def summarize(arr: np.ndarray, labels: Sequence[str] = ()) -> OutputSummary:
    """Top-k classes for a classifier output, else min/max/mean (nothing for non-numbers)."""
    shape = list(arr.shape)
    rows = _classifier_rows(arr, labels)
    if rows is not None:
        width = arr.shape[-1]
        k = min(TOP_K, width)
        top: list[list[ClassScore]] = []
        for row in rows:
            best = sorted(range(width), key=row.__getitem__, reverse=True)[:k]
            top.append(
                [
                    ClassScore(index=i, score=row[i], label=labels[i] if i < len(labels) else None)
                    for i in best
                ]
            )
        return OutputSummary(shape=shape, top_k=top)
    if arr.dtype.kind not in "biuf" or arr.size == 0:
        return OutputSummary(shape=shape)
    if arr.size <= _SMALL:
        values = arr.ravel().tolist()
        return OutputSummary(
            shape=shape,
            min=float(min(values)),
            max=float(max(values)),
            mean=float(sum(values)) / len(values),
        )
    return OutputSummary(
        shape=shape, min=float(arr.min()), max=float(arr.max()), mean=float(arr.mean())
    )


def dump(arr: np.ndarray) -> TensorDump:
    """A whole tensor as JSON-able data (flattened, row-major)."""
    return TensorDump(datatype=arr.dtype.name, shape=list(arr.shape), data=arr.ravel().tolist())


class PredictionLogger:
    """Samples served predictions and publishes them in batches; see the module docstring."""

    def __init__(
        self,
        device: str,
        publish: Publish,
        *,
        sample_rate: float = 1.0,
        batch_size: int = 500,
        batch_ms: int = 1000,
        labels: Mapping[str, Sequence[str]] | None = None,
        log_tensors: Collection[str] = (),
        max_queue: int = 50_000,
    ) -> None:
        self.device = device
        self.publish = publish
        self.batch_size = batch_size
        self.batch_s = batch_ms / 1000.0
        self.labels = dict(labels or {})
        self.log_tensors = frozenset(log_tensors)
        self.max_queue = max_queue
        self.default_rate = sample_rate
        self.rates: dict[str, float] = {}
        """Per-model sample rates set by ``set-sampling``; others use ``default_rate``."""
        self.dropped = 0
        """Records dropped because the queue was full (the thread fell behind)."""
        self._queue: deque[Logged] = deque()
        self._wake = threading.Event()
        self._full = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- request path -------------------------------------------------------------------------

    def listener(self, p: Logged) -> None:
        """Slot listener: sample and queue; the work happens on the logger's thread."""
        rate = self.rates.get(p.model, self.default_rate)
        if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
            return
        q = self._queue
        if len(q) >= self.max_queue:
            self.dropped += 1
            return
        q.append(p)
        n = len(q)
        # Only the first record and a full batch wake the thread: an Event.set() per record
        # would cost more than the rest of this call when the thread is behind.
        if n == 1:
            self._wake.set()
        elif n == self.batch_size:
            self._full.set()

    # --- control ------------------------------------------------------------------------------

    def set_sampling(self, rate: float, model: str | None = None) -> dict[str, Any]:
        """Change the sample rate of one model, or of all (clearing per-model rates)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if model is None:
            self.default_rate = rate
            self.rates.clear()
        else:
            self.rates[model] = rate
        log.info("prediction sample rate of %s set to %g", model or "all models", rate)
        return {"default_rate": self.default_rate, "rates": dict(self.rates)}

    def set_sampling_command(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The ``set-sampling`` command body (:class:`SetSampling`); ValidationError if bad."""
        cmd = msgspec.convert(args, SetSampling)
        return self.set_sampling(cmd.rate, cmd.model)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inferd-predictions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Publish what is queued, then end the thread."""
        self._stop.set()
        self._wake.set()
        self._full.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # --- the logger thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                self._flush()
                return
            deadline = time.monotonic() + self.batch_s
            while len(self._queue) < self.batch_size and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._full.wait(left)
                self._full.clear()
            self._wake.clear()
            self._flush()
            if self._queue:
                self._wake.set()

    def _flush(self) -> None:
        q = self._queue
        while q:
            batch = []
            for _ in range(min(self.batch_size, len(q))):
                try:
                    batch.append(self.record(q.popleft()))
                except IndexError:
                    break
                except Exception:
                    log.exception("predictions: cannot build a record")
            if batch:
                self.publish_records(batch)

    def publish_records(self, records: list[PredictionRecord]) -> None:
        """Encode and queue one batch."""
        payload = msgspec.json.encode(PredictionBatch(device=self.device, records=records))
        self.publish(payload, len(records))

    def record(self, p: Logged) -> PredictionRecord:
        """The log record of one prediction."""
        labels = self.labels.get(p.model, ())
        outputs = p.outputs or {}
        rec = PredictionRecord(
            ts=datetime.fromtimestamp(p.ts, timezone.utc),
            model=p.model,
            version=p.version,
            request_id=p.request_id,
            latency_ms=p.latency_ns / 1e6,
            input_digest=input_digest(p.feeds),
            outputs={name: summarize(np.asarray(arr), labels) for name, arr in outputs.items()},
            error=p.error,
        )
        if p.model in self.log_tensors:
            rec.inputs_tensors = {n: dump(np.asarray(a)) for n, a in p.feeds.items()}
            rec.outputs_tensors = {n: dump(np.asarray(a)) for n, a in outputs.items()}
        return rec
