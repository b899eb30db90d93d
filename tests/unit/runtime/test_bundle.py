"""The model bundle: where golden inputs and reference statistics travel with a model, and the
one golden format (both what the operator hands in and what devices check against)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime import bundle
from runtime.errors import BundleError


def test_files_beside_a_configured_model_and_in_a_staged_folder(tmp_path: Path) -> None:
    initial = tmp_path / "demo.onnx"
    initial.write_bytes(b"m")
    assert bundle.golden_path(initial) is None and bundle.reference_path(initial) is None
    (tmp_path / "demo.golden.npz").write_bytes(b"g")
    (tmp_path / "demo.ref.json").write_text("{}")
    assert bundle.golden_path(initial) == tmp_path / "demo.golden.npz"
    assert bundle.reference_path(initial) == tmp_path / "demo.ref.json"
    staged = tmp_path / "state" / "models" / "clf" / "000007-2" / "clf.onnx"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"m")
    (staged.parent / bundle.GOLDEN_FILE).write_bytes(b"g")  # as the update flow stages them
    (staged.parent / bundle.REFERENCE_FILE).write_text("{}")
    assert bundle.golden_path(staged) == staged.parent / "golden.npz"
    assert bundle.reference_path(staged) == staged.parent / "reference.json"


def test_published_form_round_trips_and_plain_form_needs_the_names(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array(3, dtype=np.int64)
    probs = np.ones((2, 2), np.float32)
    data = bundle.golden_bytes(bundle.Golden({"x": x, "k": k}, {"probs": probs}))
    golden = bundle.read_golden(data)
    assert sorted(golden.inputs) == ["k", "x"] and list(golden.expected) == ["probs"]
    np.testing.assert_array_equal(golden.inputs["x"], x)
    assert golden.inputs["k"].shape == () and golden.inputs["k"].dtype == np.int64

    plain = tmp_path / "in.npz"
    np.savez(plain, x=x, k=k, probs=probs)
    with pytest.raises(BundleError, match=r"no in.<input> arrays \(arrays: k, probs, x\)"):
        bundle.read_golden(plain)
    golden = bundle.read_golden(plain, ["x", "k"], ["probs", "other"])
    assert sorted(golden.inputs) == ["k", "x"] and list(golden.expected) == ["probs"]
    assert list(bundle.read_inputs(plain, ["x"])) == ["x"]


def test_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    plain = tmp_path / "in.npz"
    np.savez(plain, x=np.zeros(3))
    with pytest.raises(BundleError, match=f"{plain}: no array for input\\(s\\) k, s"):
        bundle.read_golden(plain, ["x", "k", "s"])
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match=f"{broken}: not a readable \\.npz file") as info:
        bundle.read_golden(broken, ["x"])
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=r"npz data: not a readable \.npz file"):
        bundle.read_golden(b"\x00" * 10)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(BundleError, match=r"not a readable \.npz file"):
        bundle.read_golden(pickled, ["x"])  # never unpickled
