"""``inferd tune``: finds the setting that wins on a model built to depend on it, within budget."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent.cli import main
from agent.config import ModelConfig, load_config
from agent.tune import Candidate, dropin, space, tune
from tests.support.lifecycle import foldable
from tests.support.models import classifier


@pytest.fixture(scope="module")
def slow_unless_folded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return foldable(tmp_path_factory.mktemp("tune") / "foldable.onnx", size=256, chain=4)


def write_config(tmp_path: Path, model: Path, **options: object) -> Path:
    cfg = tmp_path / "inferd.yaml"
    entry = {"name": "m", "path": str(model), **options}
    body = {"device_id": "dev", "state_dir": str(tmp_path / "state"), "models": [entry]}
    cfg.write_bytes(msgspec.yaml.encode(body))
    return cfg


def test_tune_finds_that_graph_optimisation_wins(slow_unless_folded) -> None:
    cfg = ModelConfig(name="m", path=str(slow_unless_folded), graph_optimization="disable")
    result = tune(cfg, slow_unless_folded, budget_s=20, threads=[1])
    assert result.baseline.candidate.graph_optimization == "disable"
    best = result.best
    # folding removes the whole MatMul chain: a difference of ~100x, not a close call
    assert best.candidate.graph_optimization != "disable"
    measured = {t.candidate.graph_optimization for t in result.trials}
    assert measured == {"disable", "basic", "extended", "all"}
    assert len(result.trials) == result.planned  # 20 s is plenty for 8 settings


def test_cli_writes_a_drop_in_that_load_config_merges(tmp_path, capsys, slow_unless_folded) -> None:
    config = write_config(tmp_path, slow_unless_folded, graph_optimization="disable", threads=1)
    code = main(["tune", "--config", str(config), "--model", "m", "--budget-s", "15",
                 "--threads", "1", "--runs", "10"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "on generated inputs (no golden inputs found)" in out
    assert "* best" in out
    dropin_file = tmp_path / "inferd.yaml.d" / "tune-m.yaml"
    assert f"wrote {dropin_file}" in out
    merged = load_config(config).model("m")
    assert merged.graph_optimization != "disable"
    assert merged.path == str(slow_unless_folded)  # the rest of the entry is kept
    assert "was" in dropin_file.read_text()


def test_budget_is_respected(slow_unless_folded) -> None:
    """Judged on a clock that moves 10 ms per reading, so the machine's load cannot decide it."""
    cfg = ModelConfig(name="m", path=str(slow_unless_folded), graph_optimization="disable")
    readings = itertools.count()
    result = tune(
        cfg,
        slow_unless_folded,
        budget_s=1.0,
        threads=[1, 2],
        runs=1000,
        clock=lambda: next(readings) * 0.01,
    )
    # one load and three runs of a setting is the most a trial can overrun its slice
    assert result.elapsed_s <= 1.0 + 0.1, result.elapsed_s
    assert 1 <= len(result.trials) < result.planned, (len(result.trials), result.planned)


def test_dynamic_batch_sweep_and_golden_inputs(tmp_path, capsys) -> None:
    model = classifier(tmp_path / "clf.onnx", n_features=4, n_classes=3)
    golden = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    np.savez(tmp_path / "clf.golden.npz", x=golden, probs=np.zeros((2, 3), np.float32))
    config = write_config(tmp_path, model)
    code = main(["tune", "--config", str(config), "--model", "m", "--budget-s", "4",
                 "--search", "random", "--trials", "3", "--runs", "20"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert f"timing {model} on {tmp_path / 'clf.golden.npz'}" in out
    assert "ms/sample" in out
    text = (tmp_path / "inferd.yaml.d" / "tune-m.yaml").read_text()
    assert "# dynamic batch:" in text


def test_search_space_follows_the_device() -> None:
    cfg = ModelConfig(name="m", path="x.onnx")
    cpu_only = space(cfg, ["cpu"], cpus=4)
    assert {c.providers for c in cpu_only} == {("cpu",)}
    assert {c.threads for c in cpu_only} == {1, 2, 4}
    gpu = space(cfg, ["tensorrt", "cuda", "cpu"], cpus=1)
    assert {c.providers for c in gpu} == {("cpu",), ("cuda", "cpu"), ("tensorrt", "cuda", "cpu")}
    lite = space(ModelConfig(name="m", path="x.tflite", runtime="tflite"), [], cpus=2)
    assert [c.threads for c in lite] == [1, 2]


def test_dropin_names_the_best_options() -> None:
    from agent.tune import Trial, TuneResult

    slow = Trial(Candidate(("cpu",), 1, 1, "disable"), 5, 10.0, 11.0, 0.1)
    fast = Trial(Candidate(("cpu",), 2, 1, "all"), 5, 2.0, 2.5, 0.1)
    text = dropin(TuneResult("m", slow, [slow, fast], [], 2, 1.0))
    assert "(5.00x)" in text
    body = msgspec.yaml.decode(text)
    assert body == {
        "models": [
            {"name": "m", "providers": ["cpu"], "threads": 2, "inter_op_threads": 1,
             "graph_optimization": "all"}
        ]
    }  # fmt: skip


def test_unknown_model_is_a_config_error(tmp_path, capsys, slow_unless_folded) -> None:
    config = write_config(tmp_path, slow_unless_folded)
    assert main(["tune", "--config", str(config), "--model", "nope"]) == 78
    assert "no model named 'nope'" in capsys.readouterr().err


def test_near_ties_keep_the_configured_setting_or_the_fewest_threads() -> None:
    from agent.tune import Trial, TuneResult

    base = Trial(Candidate(("cpu",), 2, 1, "all"), 5, 1.02, 1.1, 0.1)
    other = Trial(Candidate(("cpu",), 4, 2, "all"), 5, 1.00, 1.1, 0.1)
    assert TuneResult("m", base, [base, other], [], 2, 1.0).best is base  # 2 % is noise
    slow = Trial(Candidate(("cpu",), 1, 1, "disable"), 5, 9.0, 9.5, 0.1)
    lean = Trial(Candidate(("cpu",), 1, 1, "all"), 5, 1.03, 1.1, 0.1)
    assert TuneResult("m", slow, [slow, other, lean], [], 3, 1.0).best is lean


def test_generated_inputs_are_ones_the_model_takes(tmp_path: Path) -> None:
    """A model that refuses every dynamic dimension at 1 (reflection padding of an audio frame)
    is timed on the shapes its warm-up found, with random floats and its integers kept."""
    from tests.support.models import reflect_pad_refuses_short_axis, vad_like

    path = vad_like(tmp_path / "vad.onnx")
    if not reflect_pad_refuses_short_axis(path):
        pytest.skip("this onnxruntime pads a length-1 axis by reflection: dims of 1 would run")
    cfg = ModelConfig(name="m", path=str(path))
    result = tune(cfg, path, budget_s=30, search="random", trials=1, runs=3, providers=[])
    for trial in (result.baseline, *result.trials):
        assert trial.error is None, trial.error
        assert trial.runs >= 3 and np.isfinite(trial.p50_ms)
