"""Ground-truth feedback: the label forms callers send, and the join of labels to predictions.

A caller sends the ``id`` of an earlier inference request with one of:

- ``label``: a class index or class name, or a list of them, one per row of a batched request;
- ``labels``: the set of classes of a multi-label prediction (a list of lists for a batch);
- ``value``: the true value of a regression, or a list of them for a batch.

The body is one such object or a JSON array of them. Predictions wait for their label in a
window bounded by age and count; labels that arrive before their prediction (the feedback can
overtake the prediction on its way to the monitor) wait the same way. Every label ends up
counted: matched, late (its prediction already left the window), unknown (no prediction with
that id showed up in time), duplicate or invalid.

The window is bounded in bytes as well as by count and age (``quality.join_max_bytes``): callers
choose the size of ids and outputs, so ten thousand entries can be megabytes or gigabytes.
Held predictions, early labels and the ids remembered to tell late labels from unknown ones all
count; the oldest go first (remembered ids, then predictions, counted as evicted, then labels,
counted as unknown).

Labels received over HTTP are also published on ``feedback`` (:class:`FeedbackLog`) for
``inferctl collect``.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from runtime.errors import TelemetryError
from telemetry.payloads import FeedbackCommand, FeedbackItem

LabelKind = Literal["class", "multilabel", "value"]
JoinStatus = Literal["matched", "pending", "late", "duplicate"]


class FeedbackError(TelemetryError):
    """A feedback body is malformed; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Label:
    """Ground truth for one request, one entry per row of the request's batch.

    ``rows`` holds class indices (``class``), tuples of class indices (``multilabel``) or
    floats (``value``).
    """

    kind: LabelKind
    rows: tuple[Any, ...]


FeedbackBody = FeedbackItem | list[FeedbackItem]
_DECODER = msgspec.json.Decoder(FeedbackBody)


def command_items(cmd: FeedbackCommand) -> list[FeedbackItem]:
    """The feedback items a ``cmd/feedback`` body carries; FeedbackError when it is malformed."""
    if cmd.items is not None:
        if cmd.id is not None:
            raise FeedbackError("give either items or one id with its label, not both")
        items = cmd.items
    elif cmd.id is None:
        raise FeedbackError("feedback needs an id (or items)")
    else:
        items = [FeedbackItem(cmd.id, cmd.label, cmd.labels, cmd.value)]
    return _check(items)


def parse_command(args: Any) -> FeedbackCommand:
    """Validate a decoded ``cmd/feedback`` body."""
    try:
        cmd = msgspec.convert(args, FeedbackCommand)
    except msgspec.ValidationError as err:
        raise FeedbackError(f"invalid feedback: {err}") from err
    command_items(cmd)
    return cmd


def parse_feedback(body: bytes) -> list[FeedbackItem]:
    """Decode a feedback body (one object or an array); FeedbackError names what is wrong."""
    try:
        decoded = _DECODER.decode(body)
    except msgspec.DecodeError as err:
        raise FeedbackError(f"invalid feedback: {err}") from err
    return _check(decoded if isinstance(decoded, list) else [decoded])


def _check(items: list[FeedbackItem]) -> list[FeedbackItem]:
    for item in items:
        given = [f for f in ("label", "labels", "value") if getattr(item, f) is not None]
        if len(given) != 1:
            raise FeedbackError(
                f"feedback for id {item.id!r} must give exactly one of label, labels, value"
            )
    return items


def to_label(item: FeedbackItem, label_names: Sequence[str] = ()) -> Label:
    """The normalised :class:`Label` of one item; class names map to indices via ``label_names``."""

    def index(cls: int | str) -> int:
        if isinstance(cls, int) and not isinstance(cls, bool):
            if cls < 0:
                raise FeedbackError(f"feedback for id {item.id!r}: class index {cls} is negative")
            return cls
        if isinstance(cls, str):
            try:
                return label_names.index(cls)
            except ValueError:
                raise FeedbackError(
                    f"feedback for id {item.id!r}: unknown class name {cls!r}"
                ) from None
        raise FeedbackError(f"feedback for id {item.id!r}: class must be an index or a name")

    if item.label is not None:
        raw = item.label if isinstance(item.label, list) else [item.label]
        return Label("class", tuple(index(c) for c in raw))
    if item.labels is not None:
        labels = item.labels
        batch = bool(labels) and all(isinstance(x, list) for x in labels)
        rows = labels if batch else [labels]
        for row in rows:
            if not isinstance(row, list):
                raise FeedbackError(
                    f"feedback for id {item.id!r}: labels must be a list of classes, "
                    "or a list of such lists for a batch"
                )
        return Label("multilabel", tuple(tuple(sorted({index(c) for c in row})) for row in rows))
    assert item.value is not None  # parse_feedback checked that one field is set
    raw_values = item.value if isinstance(item.value, list) else [item.value]
    return Label("value", tuple(float(v) for v in raw_values))


# -- the join --------------------------------------------------------------------------------

P = TypeVar("P")
L = TypeVar("L")


@dataclass
class JoinCounts:
    """Running totals since start; pending counts are the current sizes of the two queues."""

    matched: int = 0
    late: int = 0
    unknown: int = 0
    duplicate: int = 0
    invalid: int = 0
    expired_predictions: int = 0
    evicted_predictions: int = 0


ENTRY_OVERHEAD = 200
"""Bytes counted per held entry on top of its key and value (dict slot, tuple, float, refs)."""


def key_bytes(key: Hashable) -> int:
    """Bytes an id takes in the window (its text, or what Python says for other keys)."""
    if isinstance(key, str | bytes):
        return len(key) + 49
    return sys.getsizeof(key)


def _pop_older(
    entries: OrderedDict[Hashable, tuple[float, Any, int]], horizon: float
) -> Iterator[tuple[Hashable, int]]:
    """Remove the entries stamped before ``horizon`` (oldest first); yield (key, bytes)."""
    while entries:
        key, (t, _, size) = next(iter(entries.items()))
        if t >= horizon:
            return
        entries.popitem(last=False)
        yield key, size


class JoinWindow(Generic[P, L]):
    """Pairs predictions and labels by request id within ``max_age_s``, ``max_pending`` entries
    of each kind and ``max_bytes`` in all.

    ``sizeof`` gives the bytes of a held prediction or label (without its key). Not
    thread-safe: the owner serialises calls. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        max_age_s: float,
        max_pending: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_bytes: int | None = None,
        sizeof: Callable[[Any], int] = sys.getsizeof,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self.clock = clock
        self.counts = JoinCounts()
        self._predictions: OrderedDict[Hashable, tuple[float, P, int]] = OrderedDict()
        self._labels: OrderedDict[Hashable, tuple[float, L, int]] = OrderedDict()
        # ids whose prediction was matched or left the window, to tell late and duplicate labels
        # from ones whose prediction has not arrived yet
        self._gone: OrderedDict[Hashable, tuple[bool, int]] = OrderedDict()
        self._bytes = 0

    @property
    def pending_predictions(self) -> int:
        return len(self._predictions)

    @property
    def pending_labels(self) -> int:
        return len(self._labels)

    @property
    def size_bytes(self) -> int:
        """Bytes held: predictions, early labels and remembered ids, by the window's count."""
        return self._bytes

    def _forget(self, key: Hashable, matched: bool) -> None:
        old = self._gone.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        size = key_bytes(key) + ENTRY_OVERHEAD // 2
        self._gone[key] = (matched, size)
        self._bytes += size
        while len(self._gone) > self.max_pending:
            self._bytes -= self._gone.popitem(last=False)[1][1]

    def _fit(self) -> None:
        """Drop the oldest entries until the window is within ``max_bytes``."""
        if self.max_bytes is None:
            return
        while self._bytes > self.max_bytes and self._gone:
            self._bytes -= self._gone.popitem(last=False)[1][1]
        while self._bytes > self.max_bytes and self._predictions:
            # not remembered as gone: that would take bytes again (a late label counts unknown)
            _, (_, _, size) = self._predictions.popitem(last=False)
            self._bytes -= size
            self.counts.evicted_predictions += 1
        while self._bytes > self.max_bytes and self._labels:
            _, (_, _, size) = self._labels.popitem(last=False)
            self._bytes -= size
            self.counts.unknown += 1

    def expire(self) -> None:
        """Drop predictions and early labels older than the window."""
        horizon = self.clock() - self.max_age_s
        for key, size in _pop_older(self._predictions, horizon):
            self._bytes -= size
            self.counts.expired_predictions += 1
            self._forget(key, matched=False)
        for _, size in _pop_older(self._labels, horizon):
            self._bytes -= size
            self.counts.unknown += 1
        self._fit()

    def _hold(
        self, entries: OrderedDict[Hashable, tuple[float, Any, int]], key: Hashable, value: Any
    ) -> None:
        old = entries.pop(key, None)  # a reused id: the newer request is the one labelled
        if old is not None:
            self._bytes -= old[2]
        size = key_bytes(key) + self.sizeof(value) + ENTRY_OVERHEAD
        entries[key] = (self.clock(), value, size)
        self._bytes += size

    def add_prediction(self, key: Hashable, prediction: P) -> tuple[P, L] | None:
        """Hold ``prediction`` for its label; returns the pair at once when the label came first."""
        self.expire()
        early = self._labels.pop(key, None)
        if early is not None:
            self._bytes -= early[2]
            self.counts.matched += 1
            self._forget(key, matched=True)
            self._fit()
            return prediction, early[1]
        self._hold(self._predictions, key, prediction)
        if len(self._predictions) > self.max_pending:
            old_key, (_, _, size) = self._predictions.popitem(last=False)
            self._bytes -= size
            self.counts.evicted_predictions += 1
            self._forget(old_key, matched=False)
        self._fit()
        return None

    def add_label(self, key: Hashable, label: L) -> tuple[JoinStatus, tuple[P, L] | None]:
        """Match ``label`` to its prediction, or hold it; the status says which happened."""
        self.expire()
        held = self._predictions.pop(key, None)
        if held is not None:
            self._bytes -= held[2]
            self.counts.matched += 1
            self._forget(key, matched=True)
            self._fit()
            return "matched", (held[1], label)
        gone = self._gone.get(key)
        if gone is not None:
            if gone[0]:
                self.counts.duplicate += 1
                return "duplicate", None
            self.counts.late += 1
            return "late", None
        if key in self._labels:
            self.counts.duplicate += 1
            return "duplicate", None
        self._hold(self._labels, key, label)
        if len(self._labels) > self.max_pending:
            _, (_, _, size) = self._labels.popitem(last=False)
            self._bytes -= size
            self.counts.unknown += 1
        self._fit()
        return "pending", None
