"""Drift on synthetic data: a shifted feature is found, an unshifted one stays quiet, no labels."""

from __future__ import annotations

import numpy as np
import pytest

from telemetry.quality.drift import (
    DriftError,
    DriftTracker,
    compute_reference,
    feature_axis,
    load_reference,
    psi,
)


def feed(tracker: DriftTracker, name: str, data: np.ndarray, batch: int = 10) -> list:
    reports = []
    for i in range(0, len(data), batch):
        r = tracker.observe({name: data[i : i + batch]})
        if r is not None:
            reports.append(r)
    return reports


def test_shifted_feature_drifts_and_unshifted_does_not() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 3)).astype(np.float32)
    ref = compute_reference({"x": train})
    tracker = DriftTracker(ref, window=1000, threshold=0.2)

    same = rng.normal(size=(1000, 3)).astype(np.float32)
    (calm,) = feed(tracker, "x", same)
    assert not calm.drifted
    assert calm.psi_max < 0.05
    assert calm.samples == 1000

    shifted = rng.normal(size=(1000, 3)).astype(np.float32)
    shifted[:, 1] += 1.0  # one standard deviation on feature 1 only
    (report,) = feed(tracker, "x", shifted)
    assert report.drifted
    worst = report.features[0]
    assert (worst.tensor, worst.index) == ("x", 1)
    assert worst.psi > 0.5
    assert worst.mean_shift == pytest.approx(1.0, abs=0.1)
    assert worst.std_ratio == pytest.approx(1.0, abs=0.1)
    others = [f for f in report.features if f.index != 1]
    assert all(f.psi < 0.05 for f in others)


def test_spread_change_shows_in_std_ratio_and_psi() -> None:
    rng = np.random.default_rng(1)
    ref = compute_reference({"x": rng.normal(size=(4000, 1))})
    tracker = DriftTracker(ref, window=2000, threshold=0.2)
    (report,) = feed(tracker, "x", rng.normal(scale=2.0, size=(2000, 1)), batch=100)
    assert report.features[0].std_ratio == pytest.approx(2.0, rel=0.1)
    assert abs(report.features[0].mean_shift) < 0.15
    assert report.drifted


def test_image_channels_are_tracked_per_channel() -> None:
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(200, 3, 8, 8)).astype(np.float32)
    ref = compute_reference({"image": images}, bins=8)
    (tensor,) = ref.tensors
    assert tensor.axis == 1
    assert len(tensor.features) == 3
    tracker = DriftTracker(ref, window=50, threshold=0.2)
    darker = rng.uniform(size=(50, 3, 8, 8)).astype(np.float32)
    darker[:, 2] *= 0.5  # the blue channel only
    (report,) = feed(tracker, "image", darker)
    assert report.features[0].index == 2
    assert report.drifted
    assert {f.index for f in report.features if f.psi > 0.2} == {2}


def test_reference_survives_json_and_discrete_features() -> None:
    counts = np.array([[0], [1], [1], [2], [2], [2]] * 50, dtype=np.int64)
    ref = compute_reference({"k": counts}, bins=10)
    back = load_reference(ref.to_json())
    assert back == ref
    (feature,) = back.tensors[0].features
    assert len(feature.shares) == len(feature.edges) + 1
    assert sum(feature.shares) == pytest.approx(1.0)
    tracker = DriftTracker(back, window=len(counts), threshold=0.2)
    (report,) = feed(tracker, "k", counts, batch=len(counts))
    assert report.psi_max == pytest.approx(0.0, abs=1e-12)


def test_feature_axis_guesses() -> None:
    assert feature_axis((1, 20)) == 1
    assert feature_axis((1, 3, 224, 224)) == 1
    assert feature_axis((1, 224, 224, 3)) == 3
    assert feature_axis((1, 16000)) is None  # raw audio: pooled, not 16000 histograms
    assert feature_axis((8,)) is None


def test_psi_of_identical_shares_is_zero_and_empty_bins_are_finite() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert np.isfinite(psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]))


def test_reference_that_does_not_fit_the_tensor_is_an_error() -> None:
    ref = compute_reference({"x": np.zeros((10, 3))})
    tracker = DriftTracker(ref, window=5, threshold=0.2)
    with pytest.raises(DriftError, match="has 4 features, the reference has 3"):
        tracker.observe({"x": np.zeros((1, 4))})
    with pytest.raises(DriftError, match="reference stats"):
        load_reference(b'{"samples": 1}')


def test_reference_shipped_in_a_signed_update_drives_drift(tuf_repo, update_device, tmp_path):
    """The whole path: operator publishes v2 with reference stats, the device installs it and
    tracks drift of v2 against them; v1 had none, so it was never tracked."""
    from agent.config import parse_config
    from agent.quality import QualityService
    from tests.support.links import CallbackLink
    from tests.support.models import classifier

    rng = np.random.default_rng(3)
    v1 = classifier(tmp_path / "v1.onnx", n_features=4, n_classes=3, seed=1)
    v2 = classifier(tmp_path / "v2.onnx", n_features=4, n_classes=3, seed=2)
    ref = tmp_path / "v2.ref.json"
    ref.write_bytes(compute_reference({"x": rng.normal(size=(2000, 4))}).to_json())
    tuf_repo.publish(v2, "2", reference_stats=ref)
    device = update_device(v1)
    config = parse_config(
        {"device_id": "d", "quality": {"drift_window": 500}, "models": [
            {"name": "classifier", "path": str(v1)}]},
        environ={},
    )  # fmt: skip
    events: list[dict] = []
    link = CallbackLink(on_event=lambda kind, msg, **f: events.append(f | {"k": kind}))
    service = QualityService(config, {"classifier": device.slot}, link)

    def serve(shift: float) -> None:
        for _ in range(10):  # PSI needs a few hundred samples to be quiet on unshifted data
            device.predict((rng.normal(size=(50, 4)) + shift).astype(np.float32))
        service.monitor.drain()

    serve(3.0)  # v1, no reference: nothing to compare with
    assert events == []
    device.check()
    assert device.version == "2"
    serve(0.0)
    assert events == []  # v2 on data like its reference
    serve(3.0)
    (event,) = events
    assert event["k"] == "drift" and event["version"] == "2"
    assert {p.version for p in service.monitor.payloads()} == {"2"}


def test_publishing_refuses_reference_stats_that_do_not_fit_the_model(tuf_repo, tmp_path):
    from runtime.errors import OperatorError
    from tests.support.models import classifier

    model = classifier(tmp_path / "m.onnx", n_features=4, n_classes=3)
    wrong = tmp_path / "wrong.ref.json"
    wrong.write_bytes(compute_reference({"image": np.zeros((4, 3, 2, 2))}).to_json())
    with pytest.raises(OperatorError, match="statistics for image, which the model does not have"):
        tuf_repo.publish(model, "2", reference_stats=wrong)
    junk = tmp_path / "junk.json"
    junk.write_text('{"samples": "many"}')
    with pytest.raises(OperatorError, match="reference stats"):
        tuf_repo.publish(model, "2", reference_stats=junk)
