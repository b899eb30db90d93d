"""The OpenVINO provider's options and its fallback where onnxruntime-openvino is not installed.

This venv has the plain onnxruntime (no OpenVINO): what runs here is the option building, the
validation of the config keys and the clean fallback. The provider itself runs in
tests/integration/runtime/test_openvino.py, in a venv with onnxruntime-openvino.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import numpy as np
import pytest

from agent.config import ModelConfig
from agent.tune import space
from runtime.backends import open_backend
from runtime.backends.onnx import provider_options
from runtime.options import RuntimeOptions


def test_openvino_absent_falls_back_to_cpu_naming_the_extra(
    model_factory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = model_factory("classifier")
    options = RuntimeOptions(providers=("openvino", "cpu"), name="cls")
    with caplog.at_level(logging.WARNING):
        backend = open_backend(path, options, cache_dir=tmp_path / "cache")
    assert backend.providers == ("cpu",)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "openvino" in warnings[0] and "inferd[openvino]" in warnings[0]
    assert "requirements/device-openvino.txt" in warnings[0]
    assert backend.run({"x": np.zeros((2, 4), np.float32)})["probs"].shape == (2, 3)


def test_openvino_options_follow_the_config(tmp_path: Path) -> None:
    opts = RuntimeOptions(
        providers=("openvino", "cpu"),
        threads=3,
        openvino_device_type="GPU.1",
        openvino_precision="FP16",
        provider_options={"openvino": {"num_streams": 2}},
    )
    got = provider_options("openvino", opts, tmp_path / "slot")
    assert got == {
        "device_type": "GPU.1",
        "precision": "FP16",
        "num_of_threads": 3,
        "cache_dir": str(tmp_path / "slot" / "openvino"),
        "num_streams": 2,
    }
    assert (tmp_path / "slot" / "openvino").is_dir(), "the blob cache folder is made at load"


def test_openvino_defaults_leave_the_runtime_its_choices() -> None:
    got = provider_options("openvino", RuntimeOptions(threads=0), None)
    assert got == {"device_type": "CPU"}, "no precision, no thread count, no cache without a dir"


def test_provider_options_override_what_inferd_sets(tmp_path: Path) -> None:
    opts = RuntimeOptions(provider_options={"openvino": {"device_type": "NPU"}})
    assert provider_options("openvino", opts, None)["device_type"] == "NPU"


@pytest.mark.parametrize("device", ["CPU", "GPU", "GPU.0", "NPU", "AUTO", "AUTO:GPU,CPU",
                                    "HETERO:NPU,CPU", "MULTI:GPU.0,GPU.1"])  # fmt: skip
def test_openvino_device_types_accepted(device: str) -> None:
    assert RuntimeOptions(openvino_device_type=device).openvino_device_type == device


@pytest.mark.parametrize("device", ["TPU", "cpu", "GPU.", "GPU.x", "AUTO:", "AUTO:TPU", "CPU:GPU"])
def test_openvino_device_types_refused(device: str) -> None:
    with pytest.raises(ValueError, match="openvino_device_type"):
        RuntimeOptions(openvino_device_type=device)


def test_config_errors_name_the_field() -> None:
    raw = b'{"name": "m", "path": "m.onnx", "openvino_precision": "FP16"}'
    with pytest.raises(msgspec.ValidationError, match="FP16 needs a GPU or NPU"):
        msgspec.json.decode(raw, type=ModelConfig)
    raw = b'{"name": "m", "path": "m.onnx", "providers": ["openvino", "tpu"]}'
    with pytest.raises(msgspec.ValidationError, match=r"providers\[1\]"):
        msgspec.json.decode(raw, type=ModelConfig)
    assert RuntimeOptions(provider_options={"openvino": {"num_streams": 1}})
    with pytest.raises(ValueError, match="openvino, cpu"):
        RuntimeOptions(provider_options={"vino": {}})


def test_tune_tries_openvino_where_the_build_has_it() -> None:
    cfg = ModelConfig(name="m", path="x.onnx")
    chains = {c.providers for c in space(cfg, ["openvino", "cpu"], cpus=2)}
    assert chains == {("cpu",), ("openvino", "cpu")}
    assert ("openvino", "cpu") not in {c.providers for c in space(cfg, ["cpu"], cpus=2)}
