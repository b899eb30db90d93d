"""Rolling windows of labelled predictions, one per model version and task, scored on demand."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from telemetry.payloads import ClassificationQuality, RegressionQuality, Task
from telemetry.quality.scores import classification_quality, multilabel_quality, regression_quality


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled prediction row.

    ``truth``/``predicted`` are a class index (classification), a 0/1 vector (multilabel) or a
    float (regression); ``scores`` are the model's per-class scores where it gave any.
    """

    ts: float
    truth: int | float | np.ndarray
    predicted: int | float | np.ndarray
    scores: np.ndarray | None = None


class QualityWindow:
    """The last ``max_count`` samples no older than ``max_age_s`` for one model version and task."""

    def __init__(
        self,
        task: Task,
        max_count: int,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.task: Task = task
        self.max_age_s = max_age_s
        self.clock = clock
        self._samples: deque[Sample] = deque(maxlen=max_count)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def _prune(self) -> None:
        horizon = self.clock() - self.max_age_s
        while self._samples and self._samples[0].ts < horizon:
            self._samples.popleft()

    def __len__(self) -> int:
        self._prune()
        return len(self._samples)

    def compute(
        self, label_names: Sequence[str] = (), max_classes: int = 20
    ) -> ClassificationQuality | RegressionQuality | None:
        """Metrics over the current window; None when it is empty."""
        self._prune()
        samples = list(self._samples)
        if not samples:
            return None
        if self.task == "regression":
            return regression_quality(
                np.array([s.truth for s in samples]), np.array([s.predicted for s in samples])
            )
        scores = _stack_scores(samples)
        if self.task == "multilabel":
            return multilabel_quality(
                np.stack([np.asarray(s.truth) for s in samples]),
                np.stack([np.asarray(s.predicted) for s in samples]),
                scores,
                label_names=label_names,
                max_classes=max_classes,
            )
        return classification_quality(
            np.array([s.truth for s in samples]),
            np.array([s.predicted for s in samples]),
            scores,
            label_names=label_names,
            max_classes=max_classes,
        )


def _stack_scores(samples: Sequence[Sample]) -> np.ndarray | None:
    """Scores of all samples as one matrix, or None unless every sample has same-width scores."""
    first = samples[0].scores
    if first is None:
        return None
    width = first.shape[-1]
    rows = []
    for s in samples:
        if s.scores is None or s.scores.shape[-1] != width:
            return None
        rows.append(s.scores)
    return np.stack(rows)
