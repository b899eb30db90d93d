"""The prediction log: sampled records of served requests, batched onto ``predictions``.

The slot listener only decides sampling and appends a reference to the prediction to a deque
(a fraction of a microsecond). The ``inferd-predictions`` thread takes up to ``batch_size``
queued predictions at a time and builds their :class:`~telemetry.payloads.PredictionRecord`
together: outputs of the same name, dtype and shape are stacked and summarised with one numpy
call per batch (top-k of classifier rows, else min/max/mean), input digests reuse one hash
prefix per input signature, and the :class:`~telemetry.payloads.PredictionBatch` is encoded
once. A batch goes out per ``batch_size`` records or ``batch_ms`` milliseconds, whichever comes
first. A record that cannot be queued because the thread is behind is dropped and counted, as
are batches the spool drops.
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
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any, cast

import msgspec
import numpy as np

from runtime.errors import InferdError
from telemetry.payloads import (
    ClassScore,
    OutputSummary,
    PredictionBatch,
    PredictionRecord,
    SetSampling,
    TensorDump,
)
from telemetry.prediction import Prediction, tensor_bytes

log = logging.getLogger(__name__)

TOP_K = 3
TOP_K_ROWS = 8
"""Rows of a batched classifier output that get a top-k summary."""
STACK_MAX_VALUES = 4096
"""Outputs up to this many values are stacked across a batch; bigger ones are summarised one
by one (stacking a batch of images or masks would copy hundreds of megabytes)."""
_SORT_MAX_CLASSES = 64
"""Up to this many classes a stable sort is cheapest; above, a partition first."""

Publish = Callable[[bytes, int], object]
"""``publish(payload, records)``: queue a batch of ``records`` prediction records."""

_encode = msgspec.json.Encoder().encode
_UTC = timezone.utc
_blake2b = hashlib.blake2b
_dtype_of = attrgetter("dtype")
_shape_of = attrgetter("shape")
_feeds_of = attrgetter("feeds")
_outputs_of = attrgetter("outputs")
_model_of = attrgetter("model")


# --- input digests ------------------------------------------------------------------------------


def _chunks(arrays: list[np.ndarray]) -> list[Any]:
    """The bytes of each array as the digest reads them (C order)."""
    first = arrays[0]
    if first.dtype == object:
        return [repr(a.tolist()).encode() for a in arrays]
    if len(arrays) > 1 and first.size <= STACK_MAX_VALUES:
        blob = np.asarray(arrays).tobytes()  # one copy for the batch instead of one per array
        step = first.nbytes
        return (
            [blob[o : o + step] for o in range(0, len(blob), step)] if step else [b""] * len(arrays)
        )
    return [(a if a.flags.c_contiguous else np.ascontiguousarray(a)).data for a in arrays]


def _uniform(dicts: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether all ``dicts`` have the same names in the same order and one dtype and shape per
    name: the usual batch of one model, checked by map() in C instead of a key per dict."""
    if len(set(map(tuple, dicts))) != 1:
        return False
    for name in dicts[0]:
        arrays = list(map(itemgetter(name), dicts))
        if len(set(map(_dtype_of, arrays))) != 1 or len(set(map(_shape_of, arrays))) != 1:
            return False
    return True


def _signature_groups(dicts: Sequence[Mapping[str, np.ndarray]]) -> list[list[int]]:
    """Indices of ``dicts`` grouped by their names, dtypes and shapes."""
    if _uniform(dicts):
        return [list(range(len(dicts)))]
    groups: dict[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], list[int]] = {}
    for i, d in enumerate(dicts):
        key = tuple([(name, arr.dtype, arr.shape) for name, arr in d.items()])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def input_digests(feeds: Sequence[Mapping[str, np.ndarray]]) -> list[str]:
    """:func:`input_digest` of many requests: inputs of one signature are hashed as a group."""
    out: list[str] = [""] * len(feeds)
    for members in _signature_groups(feeds):
        group = [feeds[i] for i in members]
        first = group[0]
        names = sorted(first)
        heads = [f"{n}\0{first[n].dtype.str}\0{first[n].shape}".encode() for n in names]
        base = hashlib.blake2b(heads[0] if heads else b"", digest_size=8)
        hashes = list(map(_blake2b.copy, repeat(base, len(group))))
        for j, name in enumerate(names):
            if j:
                list(map(_blake2b.update, hashes, repeat(heads[j])))
            list(map(_blake2b.update, hashes, _chunks(list(map(itemgetter(name), group)))))
        digests = list(map(_blake2b.hexdigest, hashes))
        if len(members) == len(out):
            return digests
        for i, digest in zip(members, digests, strict=True):
            out[i] = digest
    return out


def input_digest(feeds: Mapping[str, np.ndarray]) -> str:
    """blake2b-64 over each input's name, dtype, shape and bytes, in name order."""
    return input_digests([feeds])[0]


# --- output summaries ---------------------------------------------------------------------------


def _top_k(rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values along the last axis, largest first, ties to the
    lower index (as a stable sort gives them)."""
    if rows.shape[-1] <= _SORT_MAX_CLASSES:
        return np.argsort(-rows, axis=-1, kind="stable")[..., :k]
    part = np.argpartition(-rows, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(rows, part, -1)
    order = np.lexsort((part, -vals), axis=-1)
    top = np.take_along_axis(part, order, -1)
    # The partition picks any of several equal values at the k-th place: where the row holds
    # more values >= the k-th than k, sort that row for the lowest indices.
    kth = np.take_along_axis(rows, top[..., -1:], -1)
    tied = (rows >= kth).sum(axis=-1) > k
    if tied.any():
        top[tied] = np.argsort(-rows[tied], axis=-1, kind="stable")[..., :k]
    return top


def _summaries_of_stack(
    stack: np.ndarray, shape: list[int], labels: Sequence[str]
) -> list[OutputSummary]:
    """Summaries of ``stack[i]`` for every i: same-shape outputs of many requests."""
    n = stack.shape[0]
    if stack.dtype.kind not in "biuf" or stack.size == 0:
        return [OutputSummary(shape=shape) for _ in range(n)]
    out: list[OutputSummary | None] = [None] * n
    is_clf = np.zeros(n, dtype=bool)
    width = shape[-1] if shape else 0
    if stack.dtype.kind == "f" and len(shape) in (1, 2) and width >= 2:
        rows = stack.reshape(n, -1, width)[:, :TOP_K_ROWS]
        if labels and width == len(labels):
            is_clf[:] = True
        else:  # without labels, rows that look like probabilities (a softmax output)
            flat = rows.reshape(n, -1)
            deviation = np.abs(rows.sum(axis=2, dtype=np.float64) - 1).max(axis=1)
            is_clf = (flat >= 0).all(axis=1) & (flat <= 1).all(axis=1) & (deviation <= 1e-3)
        picked = np.flatnonzero(is_clf)
        if picked.size:
            # Flat lists, slices and map() over the classes themselves: a nested tolist() would
            # allocate a list per row and item, and a comprehension run a frame per score.
            clf_rows = rows[picked]
            k = min(TOP_K, width)
            top = _top_k(clf_rows, k)
            per_item = top.shape[1]
            index = top.reshape(-1).tolist()
            score = np.take_along_axis(clf_rows, top, -1).reshape(-1).tolist()
            # Tuples, not lists: the garbage collector tracks every list it is given, and a
            # list per row was a third of the time of a classifier's summary.
            if labels:
                names: list[str | None] = [*labels[:width], *[None] * (width - len(labels))]
                scores = tuple(map(ClassScore, index, score, [names[c] for c in index]))
            else:
                scores = tuple(map(ClassScore, index, score))
            tops: list[tuple[tuple[ClassScore, ...], ...]]
            if per_item == 1:
                tops = [(scores[o : o + k],) for o in range(0, len(scores), k)]
            else:
                rows_k = tuple([scores[o : o + k] for o in range(0, len(scores), k)])
                tops = [rows_k[o : o + per_item] for o in range(0, len(rows_k), per_item)]
            summaries = list(map(OutputSummary, repeat(shape, len(tops)), tops))
            if picked.size == n:
                return summaries
            for i, summary in zip(picked.tolist(), summaries, strict=True):
                out[i] = summary
    rest = np.flatnonzero(~is_clf)
    if rest.size:
        flat = stack.reshape(n, -1) if rest.size == n else stack.reshape(n, -1)[rest]
        mins = flat.min(axis=1).astype(np.float64).tolist()
        maxs = flat.max(axis=1).astype(np.float64).tolist()
        means = flat.mean(axis=1, dtype=np.float64).tolist()
        for i, lo, hi, mean in zip(rest.tolist(), mins, maxs, means, strict=True):
            out[i] = OutputSummary(shape=shape, min=lo, max=hi, mean=mean)
    return out  # type: ignore[return-value]  # every index was filled above


def _summaries_of_group(
    arrays: list[np.ndarray], shape: list[int], labels: Sequence[str]
) -> list[OutputSummary]:
    """Summaries of outputs that share one dtype and ``shape``."""
    if len(arrays) > 1 and arrays[0].size <= STACK_MAX_VALUES:
        return _summaries_of_stack(np.asarray(arrays), shape, labels)
    return [_summaries_of_stack(a[np.newaxis], shape, labels)[0] for a in arrays]


def output_summaries(
    arrays: Sequence[np.ndarray], labels: Sequence[str] = ()
) -> list[OutputSummary]:
    """:func:`summarize` of many outputs, vectorised over those of the same dtype and shape."""
    out: list[OutputSummary | None] = [None] * len(arrays)
    groups: dict[tuple[np.dtype[Any], tuple[int, ...]], tuple[list[int], list[np.ndarray]]] = {}
    for i, arr in enumerate(arrays):
        group = groups.get((arr.dtype, arr.shape))
        if group is None:
            groups[(arr.dtype, arr.shape)] = ([i], [arr])
        else:
            group[0].append(i)
            group[1].append(arr)
    for (_, shape), (members, same) in groups.items():
        for i, summary in zip(members, _summaries_of_group(same, list(shape), labels), strict=True):
            out[i] = summary
    return out  # type: ignore[return-value]  # every index was filled above


def summarize(arr: np.ndarray, labels: Sequence[str] = ()) -> OutputSummary:
    """Top-k classes for a classifier output, else min/max/mean (nothing for non-numbers).

    A classifier output is float ``[N, C]`` (or ``[C]``) with ``C`` labels configured, or,
    without labels, rows that look like probabilities (softmax output); its first
    :data:`TOP_K_ROWS` rows get the top :data:`TOP_K` classes each.
    """
    return output_summaries([np.asarray(arr)], labels)[0]


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
        max_queue_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.device = device
        self.publish = publish
        self.batch_size = batch_size
        self.batch_s = batch_ms / 1000.0
        self.labels = dict(labels or {})
        self.log_tensors = frozenset(log_tensors)
        self.max_queue = max_queue
        # A queued prediction keeps its feeds and outputs alive: count bytes, not only records.
        self.max_queue_bytes = max_queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self.default_rate = sample_rate
        self.rates: dict[str, float] = {}
        """Per-model sample rates set by ``set-sampling``; others use ``default_rate``."""
        self.dropped = 0
        """Records dropped because the queue was full (the thread fell behind) or because they
        could not be built or queued in the spool."""
        self._refused = False
        self._queue: deque[Prediction] = deque()
        self._sizes: deque[int] = deque()
        """The tensor bytes of queued predictions (counted once, on the request path). Not
        paired with the predictions in tuples: 50,000 queued tuples are as many objects for the
        garbage collector to walk. Each listener appends its size before its prediction, so
        there are always at least as many sizes as predictions to take; with several request
        threads the sizes taken with a batch may belong to other predictions, but every size
        is taken once, so the byte count stays exact whenever the queue is quiet."""
        self._wake = threading.Event()
        self._full = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- request path -------------------------------------------------------------------------

    def listener(self, p: Prediction) -> None:
        """Slot listener: sample and queue; the work happens on the logger's thread."""
        rate = self.rates.get(p.model, self.default_rate)
        if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
            return
        q = self._queue
        size = tensor_bytes(p)
        with self._bytes_lock:
            room = len(q) < self.max_queue and self._queued_bytes + size <= self.max_queue_bytes
            if room:
                self._queued_bytes += size
        if not room:
            self.dropped += 1
            return
        self._sizes.append(size)
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
        stop = self._stop
        q = self._queue
        while not stop.is_set():
            self._wake.wait()
            # Cleared before the flush: a record queued after it sets the flag again. stop()
            # sets _stop before _wake, so the loop condition sees a stop that this clears.
            self._wake.clear()
            deadline = time.monotonic() + self.batch_s
            while len(q) < self.batch_size and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._full.wait(left)
                self._full.clear()
            # When the count was reached, only whole batches go: the records queued meanwhile
            # wait for their own count or time, instead of leaving at once as a short batch.
            self._flush(whole=len(q) >= self.batch_size)
            if q:
                self._wake.set()
        self._flush()

    def _flush(self, *, whole: bool = False) -> None:
        """Publish what is queued (only whole batches when ``whole``)."""
        q = self._queue
        while len(q) >= (self.batch_size if whole else 1):
            # Only this thread takes from the queue, so len(q) items are there to pop.
            take = range(min(self.batch_size, len(q)))
            batch = [q.popleft() for _ in take]
            sizes = self._sizes
            taken = sum([sizes.popleft() for _ in take])
            with self._bytes_lock:
                self._queued_bytes -= taken
            try:
                records = self.records(batch)
            except Exception:
                log.exception("predictions: cannot build a batch; building its records one by one")
                records = self._records_one_by_one(batch)
            if not records:
                continue
            try:
                self.publish_records(records)
            except InferdError as err:  # the spool refused (a full or failing disk): count
                self.dropped += len(records)
                if not self._refused:  # one line, not one per batch for as long as it lasts
                    self._refused = True
                    log.error(
                        "predictions: cannot queue %d records: %s (records are dropped and "
                        "counted until the spool takes them again)",
                        len(records),
                        err,
                    )
            except Exception:  # a bug: keep the thread alive, show where
                log.exception("predictions: cannot queue %d records", len(records))
                self.dropped += len(records)
            else:
                if self._refused:
                    self._refused = False
                    log.info("predictions: the spool takes records again")

    def _records_one_by_one(self, batch: list[Prediction]) -> list[PredictionRecord]:
        records = []
        for p in batch:
            try:
                records.append(self.records([p])[0])
            except Exception:
                log.exception("predictions: cannot build the record of %s", p.request_id)
                self.dropped += 1
        return records

    def publish_records(self, records: list[PredictionRecord]) -> None:
        """Encode and queue one batch."""
        self.publish(_encode(PredictionBatch(device=self.device, records=records)), len(records))

    def records(self, batch: Sequence[Prediction]) -> list[PredictionRecord]:
        """The log records of ``batch``, in order; see the module docstring."""
        n = len(batch)
        digests = input_digests(list(map(_feeds_of, batch)))
        outputs: list[dict[str, OutputSummary] | None] = [None] * n
        outs = list(map(_outputs_of, batch))
        if len(set(map(_model_of, batch))) == 1:
            by_model: dict[str, list[int]] = {batch[0].model: list(range(n))} if n else {}
        else:
            by_model = {}
            for i, p in enumerate(batch):
                by_model.setdefault(p.model, []).append(i)
        for model, indices in by_model.items():
            labels = self.labels.get(model, ())
            served = [i for i in indices if outs[i]]
            dicts = cast(list[Mapping[str, np.ndarray]], [outs[i] for i in served])
            for group in _signature_groups(dicts):
                members = [served[g] for g in group]
                same = [dicts[g] for g in group]
                first = same[0]
                names = list(first)
                columns = [
                    _summaries_of_group(
                        list(map(itemgetter(name), same)), list(first[name].shape), labels
                    )
                    for name in names
                ]
                if len(names) == 1:
                    name = names[0]
                    for i, summary in zip(members, columns[0], strict=True):
                        outputs[i] = {name: summary}
                else:
                    for i, row in zip(members, zip(*columns, strict=True), strict=True):
                        outputs[i] = dict(zip(names, row, strict=True))
        fromts = datetime.fromtimestamp
        records = [
            PredictionRecord(
                ts=fromts(p.ts, _UTC),
                model=p.model,
                version=p.version,
                request_id=p.request_id,
                latency_ms=p.latency_ns / 1e6,
                input_digest=digest,
                outputs={} if summary is None else summary,
                error=p.error,
            )
            for p, digest, summary in zip(batch, digests, outputs, strict=True)
        ]
        if self.log_tensors:
            for p, rec in zip(batch, records, strict=True):
                if p.model in self.log_tensors:
                    rec.inputs_tensors = {n: dump(np.asarray(a)) for n, a in p.feeds.items()}
                    rec.outputs_tensors = {
                        n: dump(np.asarray(a)) for n, a in (p.outputs or {}).items()
                    }
        return records

    def record(self, p: Prediction) -> PredictionRecord:
        """The log record of one prediction."""
        return self.records([p])[0]
