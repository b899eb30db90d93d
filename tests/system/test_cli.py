"""The `inferd` one-shot commands: predict and info, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"


def inferd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_predict_writes_golden_output(tmp_path: Path) -> None:
    golden = np.load(MODELS / "demo.golden.npz")
    np.save(tmp_path / "x.npy", golden["x"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(MODELS / "demo.onnx")}]}))
    res = inferd(
        "predict",
        "-c",
        str(cfg),
        "-m",
        "m",
        "-i",
        str(tmp_path / "x.npy"),
        "-o",
        str(tmp_path / "out.npz"),
    )
    assert res.returncode == 0, res.stderr
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["probs"], golden["probs"], rtol=1e-5)
    printed = inferd("predict", "-c", str(cfg), "-m", "m", "-i", str(tmp_path / "x.npy"))
    assert "probs float32 [8, 3]" in printed.stdout


def test_predict_bad_input_is_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 5), np.float32))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "m", "path": str(MODELS / "demo.onnx")}]}))
    res = inferd("predict", "-c", str(cfg), "-m", "m", "-i", str(tmp_path / "x.npy"))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "inferd: input 'x' has shape [1, 5], the model expects [-1, 8]"
    )
    res = inferd("predict", "-c", str(cfg), "-m", "nope", "-i", str(tmp_path / "x.npy"))
    assert res.returncode == 78 and "no model named 'nope'" in res.stderr


def test_info_prints_signature() -> None:
    res = inferd("info", str(MODELS / "demo.onnx"))
    assert res.returncode == 0, res.stderr
    assert "input  x" in res.stdout and "['?', 8]" in res.stdout
    assert "output probs" in res.stdout


def test_info_on_missing_file_is_one_line(tmp_path: Path) -> None:
    res = inferd("info", str(tmp_path / "none.onnx"))
    assert res.returncode == 1
    assert res.stderr.strip() == f"inferd: {tmp_path / 'none.onnx'}: model file not found"
