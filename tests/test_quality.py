"""Quality metrics equal scikit-learn's on random data; rolling windows forget by count and age."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from telemetry.quality import (
    QualityWindow,
    Sample,
    binary_roc_auc,
    classification_quality,
    multilabel_quality,
    regression_quality,
)

SETTINGS = settings(max_examples=60, deadline=None)
# scikit-learn warns when a random draw has one class only; those draws are still compared
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


@st.composite
def class_data(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, size=n)
    # coarse scores make ties likely, which is where ROC-AUC implementations differ
    logits = np.round(rng.normal(size=(n, n_classes)) + np.eye(n_classes)[y_true], 1)
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_pred = scores.argmax(axis=1)
    return y_true, y_pred, scores


@SETTINGS
@given(class_data())
def test_classification_metrics_equal_sklearn(data: tuple[np.ndarray, ...]) -> None:
    y_true, y_pred, scores = data
    q = classification_quality(y_true, y_pred, scores, max_classes=50)
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for ours, avg in (("precision_macro", "macro"),):
        assert getattr(q, ours) == pytest.approx(
            skm.precision_score(y_true, y_pred, average=avg, zero_division=0)
        )
    assert q.recall_macro == pytest.approx(
        skm.recall_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.f1_macro == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    labels = np.union1d(y_true, y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [c.label for c in q.per_class] == [str(c) for c in labels]
    assert [c.precision for c in q.per_class] == pytest.approx(p)
    assert [c.recall for c in q.per_class] == pytest.approx(r)
    assert [c.f1 for c in q.per_class] == pytest.approx(f)
    assert [c.support for c in q.per_class] == list(s)
    assert q.confusion == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()

    # one-vs-rest ROC-AUC per class, wherever scikit-learn defines it
    for c in q.per_class:
        k = int(c.label)
        present = 0 < (y_true == k).sum() < y_true.size
        if present:
            assert c.roc_auc == pytest.approx(skm.roc_auc_score(y_true == k, scores[:, k]))
        else:
            assert c.roc_auc is None
    n_classes = scores.shape[1]
    if set(y_true.tolist()) == set(range(n_classes)):
        if n_classes == 2:
            expected = skm.roc_auc_score(y_true, scores[:, 1])
        else:
            expected = skm.roc_auc_score(
                y_true, scores, multi_class="ovr", average="macro", labels=range(n_classes)
            )
        assert q.roc_auc == pytest.approx(expected)


@SETTINGS
@given(
    st.integers(1, 60),
    st.integers(2, 5),  # one column is binary classification to scikit-learn
    st.integers(0, 2**32 - 1),
)
def test_multilabel_metrics_equal_sklearn(n: int, n_labels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=(n, n_labels))
    scores = np.round(np.clip(0.3 * rng.normal(size=(n, n_labels)) + 0.4 * y_true + 0.3, 0, 1), 1)
    y_pred = (scores >= 0.5).astype(int)
    q = multilabel_quality(y_true, y_pred, scores)
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert q.precision_macro == pytest.approx(
        skm.precision_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.recall_macro == pytest.approx(
        skm.recall_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert q.f1_macro == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    defined = [j for j in range(n_labels) if 0 < y_true[:, j].sum() < n]
    if len(defined) == n_labels:
        assert q.roc_auc == pytest.approx(skm.roc_auc_score(y_true, scores, average="macro"))
    for j in defined:
        assert q.per_class[j].roc_auc == pytest.approx(
            skm.roc_auc_score(y_true[:, j], scores[:, j])
        )


@SETTINGS
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=50))
def test_regression_metrics_equal_sklearn(pairs: list[tuple[float, float]]) -> None:
    y_true = np.array([a for a, _ in pairs])
    y_pred = np.array([b for _, b in pairs])
    q = regression_quality(y_true, y_pred)
    assert q.mae == pytest.approx(skm.mean_absolute_error(y_true, y_pred), abs=1e-9)
    assert q.rmse == pytest.approx(math.sqrt(skm.mean_squared_error(y_true, y_pred)), abs=1e-9)
    assert q.bias == pytest.approx(float(np.mean(y_pred - y_true)), abs=1e-9)


def test_roc_auc_undefined_for_one_class() -> None:
    assert binary_roc_auc(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9])) is None
    assert binary_roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


def test_per_class_is_capped_to_the_largest_classes() -> None:
    y_true = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 2)
    q = classification_quality(
        y_true, y_true, label_names=["cat", "dog", "eel", "fox"], max_classes=2
    )
    assert [c.label for c in q.per_class] == ["cat", "dog"]
    assert q.confusion is None  # 4 classes > max_classes
    assert q.f1_macro == 1.0  # the macro average still covers every class


def test_window_forgets_by_count_and_by_age() -> None:
    now = [1000.0]
    win = QualityWindow("classification", max_count=4, max_age_s=10.0, clock=lambda: now[0])
    for i in range(6):
        win.add(Sample(ts=1000.0 + i, truth=i % 2, predicted=0))
    assert len(win) == 4  # count bound: samples 2..5
    q = win.compute()
    assert q is not None
    assert q.accuracy == 0.5
    now[0] = 1013.5  # samples at 1002 and 1003 are now older than 10 s
    assert len(win) == 2
    now[0] = 1100.0
    assert win.compute() is None
