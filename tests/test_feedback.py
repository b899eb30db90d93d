"""Feedback bodies and the label join: window edges by age and by count, nothing lost silently."""

from __future__ import annotations

import pytest

from telemetry.feedback import FeedbackError, JoinWindow, Label, parse_feedback, to_label


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(max_age_s: float = 10.0, max_pending: int = 100) -> tuple[JoinWindow[str, str], Clock]:
    clock = Clock()
    return JoinWindow(max_age_s, max_pending, clock), clock


def test_label_inside_the_window_edge_matches() -> None:
    join, clock = window(max_age_s=10.0)
    assert join.add_prediction("r1", "pred1") is None
    clock.now += 10.0  # exactly at the edge: still inside
    assert join.add_label("r1", "cat") == ("matched", ("pred1", "cat"))
    assert join.counts.matched == 1
    assert join.pending_predictions == 0


def test_label_just_past_the_window_edge_is_late_and_counted() -> None:
    join, clock = window(max_age_s=10.0)
    join.add_prediction("r1", "pred1")
    clock.now += 10.001
    assert join.add_label("r1", "cat") == ("late", None)
    assert join.counts.late == 1
    assert join.counts.expired_predictions == 1
    assert join.counts.matched == 0


def test_label_before_prediction_waits_and_joins() -> None:
    join, clock = window(max_age_s=10.0)
    assert join.add_label("r1", "cat") == ("pending", None)
    assert join.pending_labels == 1
    clock.now += 9.0
    assert join.add_prediction("r1", "pred1") == ("pred1", "cat")
    assert join.counts.matched == 1
    assert join.pending_labels == 0


def test_early_label_whose_prediction_never_comes_counts_as_unknown() -> None:
    join, clock = window(max_age_s=10.0)
    join.add_label("ghost", "cat")
    clock.now += 10.5
    join.expire()
    assert join.counts.unknown == 1
    assert join.pending_labels == 0
    # the prediction turning up after the label expired is simply unlabelled
    assert join.add_prediction("ghost", "pred") is None


def test_count_bound_evicts_the_oldest_prediction() -> None:
    join, _ = window(max_pending=3)
    for i in range(4):
        join.add_prediction(f"r{i}", f"p{i}")
    assert join.pending_predictions == 3
    assert join.counts.evicted_predictions == 1
    assert join.add_label("r0", "x") == ("late", None)  # evicted at the count edge
    assert join.add_label("r1", "x") == ("matched", ("p1", "x"))  # the oldest one kept
    assert join.add_label("r3", "x")[0] == "matched"


def test_count_bound_on_early_labels() -> None:
    join, _ = window(max_pending=2)
    for i in range(3):
        join.add_label(f"r{i}", "x")
    assert join.pending_labels == 2
    assert join.counts.unknown == 1
    assert join.add_prediction("r0", "p0") is None  # its label was the one pushed out
    assert join.add_prediction("r1", "p1") == ("p1", "x")


def test_second_label_for_a_request_is_a_duplicate() -> None:
    join, _ = window()
    join.add_prediction("r1", "p")
    join.add_label("r1", "cat")
    assert join.add_label("r1", "dog") == ("duplicate", None)
    join.add_label("r2", "cat")
    assert join.add_label("r2", "dog") == ("duplicate", None)
    assert join.counts.duplicate == 2


def test_reused_request_id_labels_the_newer_prediction() -> None:
    join, _ = window()
    join.add_prediction("r1", "old")
    join.add_prediction("r1", "new")
    assert join.add_label("r1", "cat") == ("matched", ("new", "cat"))


def test_parse_label_forms() -> None:
    items = parse_feedback(
        b'[{"id": "a", "label": 2}, {"id": "b", "label": "dog"}, {"id": "c", "label": [0, "cat"]},'
        b' {"id": "d", "labels": ["cat", 2]}, {"id": "e", "labels": [[0], [1, 2]]},'
        b' {"id": "f", "value": 3.5}, {"id": "g", "value": [1, 2.5]}]'
    )
    names = ("cat", "dog", "eel")
    got = {i.id: to_label(i, names) for i in items}
    assert got["a"] == Label("class", (2,))
    assert got["b"] == Label("class", (1,))
    assert got["c"] == Label("class", (0, 0))
    assert got["d"] == Label("multilabel", ((0, 2),))
    assert got["e"] == Label("multilabel", ((0,), (1, 2)))
    assert got["f"] == Label("value", (3.5,))
    assert got["g"] == Label("value", (1.0, 2.5))
    single = parse_feedback(b'{"id": "z", "labels": []}')
    assert to_label(single[0]) == Label("multilabel", ((),))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "invalid feedback"),
        (b'{"label": 1}', "missing required field `id`"),
        (b'{"id": "a"}', "exactly one of label, labels, value"),
        (b'{"id": "a", "label": 1, "value": 2.0}', "exactly one of"),
        (b'{"id": "a", "label": 1, "extra": 2}', "unknown field"),
        (b'{"id": "a", "value": "high"}', "Expected `float | array`"),
    ],
)
def test_bad_bodies_say_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(FeedbackError, match=message):
        parse_feedback(body)


def test_unknown_class_name_is_rejected() -> None:
    (item,) = parse_feedback(b'{"id": "a", "label": "zebra"}')
    with pytest.raises(FeedbackError, match="unknown class name 'zebra'"):
        to_label(item, ("cat", "dog"))
