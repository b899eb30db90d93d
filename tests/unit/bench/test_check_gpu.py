"""``make check-gpu`` up to the GPU boundary: every piece that runs without an NVIDIA GPU.

The check itself (bench/check_gpu.py) has not yet run on a GPU. What is tested here: platform
detection, reading the lock for this interpreter, the install plan (TensorRT from NVIDIA's
index for the locked CUDA major, a Jetson's own onnxruntime-gpu), the provider options a GPU
run would use and where its caches go, the engine-cache reuse rule, the tolerances, NVML
absent, the table, and the refusal to run without a GPU.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import check_gpu as cg
from bench._checks import gated, info
from runtime.backends.onnx import provider_options
from runtime.options import RuntimeOptions

ROOT = Path(__file__).resolve().parents[3]


def test_platform_from_the_files_the_driver_and_jetpack_leave(tmp_path: Path) -> None:
    assert cg.detect_platform(tmp_path) == "none"
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text("NVRM version: 580\n")
    assert cg.detect_platform(tmp_path) == "nvidia"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    assert cg.detect_platform(tmp_path) == "jetson"


@pytest.mark.parametrize(
    ("python", "ort", "cuda"),
    [("3.10", "1.23.2", 12), ("3.11", "1.31.1", 13), ("3.13", "1.31.1", 13)],
)
def test_the_gpu_lock_read_for_each_python(python: str, ort: str, cuda: int) -> None:
    """The committed export, its markers evaluated as each target interpreter would."""
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "platform_machine": "x86_64", "sys_platform": "linux",
           "platform_python_implementation": "CPython"}  # fmt: skip
    versions = cg.locked_versions(cg.LOCK_GPU.read_text(), env)
    assert versions["onnxruntime-gpu"] == ort
    assert "onnxruntime" not in versions, "onnxruntime-gpu replaces onnxruntime"
    assert cg.cuda_major(versions) == cuda
    assert "nvidia-ml-py" in versions, "NVML for the GPU figures in the metrics"
    # no aarch64 GPU wheels on PyPI: a Jetson gets nothing of this
    arm = cg.locked_versions(cg.LOCK_GPU.read_text(), {**env, "platform_machine": "aarch64"})
    assert "onnxruntime-gpu" not in arm and cg.cuda_major(arm) is None


def test_tensorrt_comes_from_nvidia_for_the_locked_cuda_unless_the_system_has_it() -> None:
    versions = {"onnxruntime-gpu": "1.31.1", "nvidia-cuda-runtime": "13.5.37"}
    lock, leave_out, extra = cg.install_plan("nvidia", versions, None, system_tensorrt=False)
    assert lock == cg.LOCK_GPU and leave_out == []
    assert extra == [("--extra-index-url", "https://pypi.nvidia.com",
                      f"tensorrt-cu13-libs=={cg.TENSORRT_VERSION}")]  # fmt: skip
    assert cg.TENSORRT_VERSION.startswith("10."), "the provider links libnvinfer.so.10"
    cu12 = {"nvidia-cuda-runtime-cu12": "12.9.79"}
    assert cg.install_plan("nvidia", cu12, None, False)[2][0][-1].startswith("tensorrt-cu12-libs")
    assert cg.install_plan("nvidia", versions, None, system_tensorrt=True)[2] == []


def test_a_jetson_takes_the_device_lock_and_onnxruntime_gpu_from_its_index() -> None:
    with pytest.raises(SystemExit, match="--jetson-index"):
        cg.install_plan("jetson", {}, None, system_tensorrt=True)
    url = "https://pypi.jetson-ai-lab.io/jp6/cu126"
    lock, leave_out, extra = cg.install_plan("jetson", {}, url, system_tensorrt=True)
    assert lock == cg.LOCK_DEVICE and leave_out == ["onnxruntime"]
    assert extra == [("--index-url", url, "--no-deps", "onnxruntime-gpu")]
    trimmed = cg.drop_packages(cg.LOCK_DEVICE.read_text(), leave_out)
    assert "\nonnxruntime==" not in trimmed and "--hash" in trimmed
    kept = cg.locked_versions(trimmed, {"python_version": "3.10", "python_full_version":
                                        "3.10.12", "platform_machine": "aarch64",
                                        "sys_platform": "linux"})  # fmt: skip
    assert "onnxruntime" not in kept and "numpy" in kept and "paho-mqtt" in kept


def test_drop_packages_keeps_every_other_entry_whole() -> None:
    text = (
        "# header\n"
        "a==1 ; python_version < '3.14' \\\n    --hash=sha256:aa\n    # via x\n"
        "onnxruntime==1.0 \\\n    --hash=sha256:bb \\\n    --hash=sha256:cc\n"
        "z==2 \\\n    --hash=sha256:dd\n"
    )
    out = cg.drop_packages(text, ["onnxruntime"])
    assert "onnxruntime" not in out and "sha256:bb" not in out and "sha256:cc" not in out
    assert "a==1" in out and "sha256:aa" in out and "z==2" in out and "sha256:dd" in out


def test_gpu_runs_serve_with_fp16_engines_cached_in_the_state_dir(tmp_path: Path) -> None:
    slot = cg.model_config("m", Path("m.onnx"), ("tensorrt", "cuda", "cpu"), tmp_path / "w.npz")
    assert slot["tensorrt_fp16"] is True and slot["warmup_inputs"] == str(tmp_path / "w.npz")
    assert cg.model_config("m", Path("m.onnx"), ("cuda", "cpu"), tmp_path)["tensorrt_fp16"] is False
    opts = RuntimeOptions(providers=("tensorrt", "cuda", "cpu"), tensorrt_fp16=True)
    trt = provider_options("tensorrt", opts, tmp_path / "state" / "cache" / "m")
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
    assert Path(trt["trt_engine_cache_path"]) == tmp_path / "state" / "cache" / "m" / "trt"
    assert Path(trt["trt_engine_cache_path"]).is_dir()
    assert provider_options("cuda", opts, None) == {"device_id": 0}


def test_engine_cache_counts_as_reused_only_when_untouched(tmp_path: Path) -> None:
    trt = tmp_path / "cache" / "m" / "trt"
    trt.mkdir(parents=True)
    assert not cg.cache_reused(cg.engine_files(tmp_path), cg.engine_files(tmp_path)), "none built"
    engine = trt / "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm86.engine"
    engine.write_bytes(b"engine")
    (trt / "TensorrtExecutionProvider_cache_sm86.timing").write_bytes(b"timing")
    first = cg.engine_files(tmp_path)
    assert set(first) == {
        "cache/m/trt/TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_sm86.engine",
        "cache/m/trt/TensorrtExecutionProvider_cache_sm86.timing",
    }
    assert cg.cache_reused(first, cg.engine_files(tmp_path))
    os.utime(engine, ns=(1, 1))  # rewritten: built again
    assert not cg.cache_reused(first, cg.engine_files(tmp_path))
    (trt / "other_0_1_sm86.engine").write_bytes(b"new")
    assert not cg.cache_reused(cg.engine_files(tmp_path) | {}, first)


def test_tolerances_allow_for_tf32_and_fp16_and_no_more() -> None:
    want = {"y": np.array([0.5, 0.25, 0.125], np.float32)}
    fp16 = {"y": want["y"].astype(np.float16).astype(np.float32) + np.float32(1e-3)}
    assert cg.compare(fp16, want, *cg.tolerance(("tensorrt", "cuda", "cpu")))[0]
    assert not cg.compare(fp16, want, *cg.tolerance(("cpu",)))[0]
    wrong = {"y": want["y"][::-1].copy()}
    for providers in cg.LISTS:
        ok, worst = cg.compare(wrong, want, *cg.tolerance(providers))
        assert not ok and worst == pytest.approx(0.375)
    assert cg.compare({}, want, 1, 1) == (False, float("inf"))
    assert cg.compare({"y": want["y"][:2]}, want, 1, 1)[0] is False


def test_nvml_absent_is_none_not_an_error() -> None:
    """No nvidia-ml-py in the dev venv, no driver on this machine."""
    assert cg.nvml_memory() is None


def test_v2_round_trip_keeps_dtypes_and_scalars() -> None:
    feeds = {"audio": np.ones((1, 4), np.float32), "sr": np.array(16000, np.int64)}
    body = cg.v2_inputs(feeds)
    assert body[1] == {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}
    back = cg.v2_outputs({"outputs": body})
    assert back["sr"].dtype == np.int64 and back["sr"].shape == ()
    np.testing.assert_array_equal(back["audio"], feeds["audio"])


def test_one_table_with_every_row() -> None:
    rows = [gated("outputs", "rtol 0.01", "max abs diff 0.002", "cpu", True),
            gated("engine cache", "untouched", "rewritten", "trt", False),
            info("latency", "1.2 ms", "[cpu] 3.4 ms")]  # fmt: skip
    table = cg.render(rows).splitlines()
    assert table[0].split()[:2] == ["result", "what"] and set(table[1]) <= {"-", " "}
    assert [ln.split()[0] for ln in table[2:]] == ["pass", "FAIL", "info"]


def test_without_a_gpu_it_refuses_to_run_and_the_plan_shows_what_it_would_do() -> None:
    if cg.detect_platform() != "none":
        pytest.skip("this machine has an NVIDIA GPU: make check-gpu is the test")
    run = [sys.executable, "-m", "bench.check_gpu"]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no NVIDIA GPU here" in done.stderr
    assert done.stderr.count("\n") == 1, "one line, no traceback"
    plan = subprocess.run([*run, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "pip install --require-hashes -r requirements/device-gpu.txt" in plan
    if platform.machine() == "x86_64":
        assert "tensorrt-cu" in plan and "pypi.nvidia.com" in plan
    assert '"trt_engine_cache_path": "<state_dir>/cache/<slot>/trt"' in plan
    assert "NVML: absent" in plan


def test_the_shell_script_says_it_has_not_run_on_a_gpu_and_hands_over() -> None:
    script = (ROOT / "scripts" / "check-gpu.sh").read_text()
    assert "has not yet run on a GPU" in script
    assert "bench.check_gpu" in script
    assert "check-gpu:" in (ROOT / "Makefile").read_text()


def test_preloading_gpu_libraries_is_harmless_without_them() -> None:
    """The CPU build has no CUDA to preload and no tensorrt_libs: nothing loaded, nothing raised
    (a venv from device-gpu.txt was seen to get the CUDA provider as far as the driver)."""
    from runtime.backends.onnx import preload_gpu_libraries

    assert preload_gpu_libraries(tensorrt=True) == []
