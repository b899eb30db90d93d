"""Model quality from fed-back labels: the metrics, computed with numpy.

The metric functions reproduce scikit-learn's definitions (``accuracy_score``,
``precision_recall_fscore_support`` with ``zero_division=0``, ``roc_auc_score``,
``confusion_matrix``, ``mean_absolute_error``, root mean squared error) in a few lines of
numpy, because scikit-learn with scipy is far too heavy for a Raspberry Pi daemon; the tests
check equality against scikit-learn on random data. Where scikit-learn raises (ROC-AUC for a
class that has no positives or no negatives in the window) the metric here is ``None`` and the
macro average is taken over the classes where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from telemetry.payloads import (
    ClassificationQuality,
    ClassQuality,
    RegressionQuality,
    Task,
)

# -- payload types --------------------------------------------------------------------------


# -- metrics ---------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def binary_roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve for 0/1 truth and a score; None unless both classes occur.

    Computed as the Mann-Whitney U statistic with average ranks for ties, which equals the
    trapezoidal area scikit-learn integrates.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average rank (1-based) of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, ...]:
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return precision, recall, f1


def _per_class(
    names: Sequence[str],
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    support: np.ndarray,
    aucs: Sequence[float | None],
    max_classes: int,
) -> tuple[list[ClassQuality], float, float, float]:
    precision, recall, f1 = _prf(tp, fp, fn)
    # the classes that matter most to an operator: largest support first, then index order
    keep = sorted(range(len(names)), key=lambda i: (-int(support[i]), i))[:max_classes]
    per_class = [
        ClassQuality(
            label=names[i],
            support=int(support[i]),
            tp=int(tp[i]),
            fp=int(fp[i]),
            fn=int(fn[i]),
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
            roc_auc=aucs[i],
        )
        for i in sorted(keep)
    ]
    return per_class, float(precision.mean()), float(recall.mean()), float(f1.mean())


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_quality(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    label_names: Sequence[str] = (),
    max_classes: int = 20,
) -> ClassificationQuality:
    """Single-label metrics for integer class indices.

    ``scores`` is ``[n, C]`` (one column per class index, e.g. softmax output) and gives the
    one-vs-rest ROC-AUC per class and its macro average; for two columns the binary ROC-AUC of
    class 1. The classes reported are those present in ``y_true`` or ``y_pred``, as scikit-learn
    does by default.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    classes = np.union1d(y_true, y_pred)
    k = classes.size
    ti = np.searchsorted(classes, y_true)
    pi = np.searchsorted(classes, y_pred)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (ti, pi), 1)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    fp = confusion.sum(axis=0) - tp
    fn = support - tp
    aucs: list[float | None] = [None] * k
    roc_auc: float | None = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        s = s.reshape(s.shape[0], -1)
        n_cols = s.shape[1]
        for j, c in enumerate(classes):
            if 0 <= c < n_cols:
                aucs[j] = binary_roc_auc(y_true == c, s[:, c])
        binary = n_cols == 2
        roc_auc = binary_roc_auc(y_true == 1, s[:, 1]) if binary else _mean_defined(aucs)
    names = [_name(int(c), label_names) for c in classes]
    per_class, p_macro, r_macro, f1_macro = _per_class(
        names, tp, fp, fn, support, aucs, max_classes
    )
    small = k <= max_classes
    return ClassificationQuality(
        accuracy=float(tp.sum() / y_true.size) if y_true.size else 0.0,
        precision_macro=p_macro,
        recall_macro=r_macro,
        f1_macro=f1_macro,
        roc_auc=roc_auc,
        per_class=per_class,
        labels=names if small else None,
        confusion=confusion.tolist() if small else None,
    )


def multilabel_quality(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    label_names: Sequence[str] = (),
    max_classes: int = 20,
) -> ClassificationQuality:
    """Multi-label metrics for ``[n, L]`` 0/1 indicator matrices (subset accuracy, macro P/R/F1)."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    tp = (t & p).sum(axis=0)
    fp = (~t & p).sum(axis=0)
    fn = (t & ~p).sum(axis=0)
    support = t.sum(axis=0)
    n_labels = t.shape[1]
    aucs: list[float | None] = [None] * n_labels
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        aucs = [binary_roc_auc(t[:, j], s[:, j]) for j in range(n_labels)]
    names = [_name(j, label_names) for j in range(n_labels)]
    per_class, p_macro, r_macro, f1_macro = _per_class(
        names, tp, fp, fn, support, aucs, max_classes
    )
    return ClassificationQuality(
        accuracy=float(np.all(t == p, axis=1).mean()) if t.shape[0] else 0.0,
        precision_macro=p_macro,
        recall_macro=r_macro,
        f1_macro=f1_macro,
        roc_auc=_mean_defined(aucs) if scores is not None else None,
        per_class=per_class,
    )


def regression_quality(y_true: np.ndarray, y_pred: np.ndarray) -> RegressionQuality:
    """MAE, RMSE and mean error of predictions against true values."""
    err = (
        np.asarray(y_pred, dtype=np.float64).ravel() - np.asarray(y_true, dtype=np.float64).ravel()
    )
    return RegressionQuality(
        mae=float(np.abs(err).mean()),
        rmse=math.sqrt(float(np.square(err).mean())),
        bias=float(err.mean()),
    )


def _name(index: int, label_names: Sequence[str]) -> str:
    return label_names[index] if 0 <= index < len(label_names) else str(index)


# -- reading model outputs -------------------------------------------------------------------


def output_rows(outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The output quality is judged on, as ``[batch, values]``: the first floating-point output
    (class scores, a probability, a value), else the first output (a class index)."""
    if not outputs:
        return None
    arrays = [np.asarray(a) for a in outputs.values()]
    a = next((a for a in arrays if a.dtype.kind == "f"), arrays[0])
    if a.dtype.kind not in "biuf":
        return None
    return a.reshape(1, -1) if a.ndim == 0 else a.reshape(a.shape[0], -1)


def interpret(rows: np.ndarray, task: Task) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions, scores) from output rows; ValueError when the rows cannot serve ``task``.

    Classification: two or more scores are argmax-ed (and kept as scores), one score is the
    probability of class 1, an integer is the class itself. Multi-label: a score >= 0.5 is a
    predicted label. Regression: the row's single value.
    """
    width = rows.shape[1]
    is_float = rows.dtype.kind == "f"
    if task == "regression":
        if width != 1:
            raise ValueError(f"a regression value needs one output value per row, not {width}")
        return rows[:, 0].astype(np.float64), None
    if task == "multilabel":
        if not is_float:
            raise ValueError("multi-label truth needs per-label scores from the model")
        scores = rows.astype(np.float64)
        return (scores >= 0.5).astype(np.int8), scores
    if not is_float:
        if width != 1:
            raise ValueError(f"an integer output needs one class per row, not {width}")
        return rows[:, 0].astype(np.int64), None
    if width == 1:
        p = rows[:, 0].astype(np.float64)
        return (p >= 0.5).astype(np.int64), np.stack([1.0 - p, p], axis=1)
    scores = rows.astype(np.float64)
    return scores.argmax(axis=1), scores


def task_of(truth: np.ndarray) -> Task:
    """The task a labelled dataset implies: float values regression, a 2-D indicator matrix
    multi-label, integer classes classification."""
    t = np.asarray(truth)
    if t.ndim == 2 and t.shape[1] > 1:
        return "multilabel"
    return "regression" if t.dtype.kind == "f" else "classification"


def quality_of(
    task: Task,
    truth: np.ndarray,
    rows: np.ndarray,
    *,
    label_names: Sequence[str] = (),
    max_classes: int = 20,
) -> ClassificationQuality | RegressionQuality:
    """Metrics of a whole labelled dataset given the model's output rows."""
    predicted, scores = interpret(rows, task)
    if task == "regression":
        return regression_quality(truth, predicted)
    if task == "multilabel":
        if np.asarray(truth).shape != predicted.shape:
            raise ValueError(
                f"truth has shape {list(np.shape(truth))}, the model gives {list(predicted.shape)}"
            )
        return multilabel_quality(
            truth, predicted, scores, label_names=label_names, max_classes=max_classes
        )
    return classification_quality(
        np.asarray(truth).ravel(),
        predicted,
        scores,
        label_names=label_names,
        max_classes=max_classes,
    )


# -- rolling windows -------------------------------------------------------------------------
