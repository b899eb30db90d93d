"""``make check-gpu``: serve the demo and zoo models on an NVIDIA GPU or a Jetson, check them.

NOT YET RUN ON A GPU. This was written from onnxruntime's TensorRT and CUDA execution provider
documentation on machines without one; every piece that runs without a GPU is tested
(tests/unit/bench/test_check_gpu.py), and a venv installed from requirements/device-gpu.txt was
seen to reach the GPU boundary (the CUDA provider loading everything up to libcuda.so.1, the
driver). The first run on a GPU host is its real test; expect to fix something.

What it does, in under 10 minutes (``DEADLINE_S``; past it the run fails):
  1. a venv (``~/.cache/inferd/gpu-*``) from the committed hashed lock: requirements/device-gpu.txt
     on x86_64 (onnxruntime-gpu with the CUDA and cuDNN libraries it was built for, nvidia-ml-py),
     plus TensorRT's libraries from NVIDIA's index (``tensorrt-cu<N>-libs``; PyPI's tensorrt
     packages are stubs that fetch those) unless the system has libnvinfer already; on a Jetson
     requirements/device.txt without onnxruntime, plus onnxruntime-gpu from ``--jetson-index``
     (JetPack brings CUDA, cuDNN and TensorRT);
  2. ``inferd run`` in that venv serving the demo and the zoo's ONNX models with ``providers:
     [cpu]``, ``[cuda, cpu]`` and ``[tensorrt, cuda, cpu]`` (TensorRT fp16), each answer compared
     with onnxruntime's CPU provider in the dev venv, within a tolerance that allows for TF32 and
     fp16; the providers each model really runs on must be those asked for;
  3. the TensorRT daemon started twice on one state dir: the engine cache is built on the first
     start and read back on the second (same files, untouched), start-to-ready both times;
  4. the validation gate and a hot swap under load on each GPU provider list
     (tests/support/gate_probe.py);
  5. one table: the checks (pass/FAIL), latency per model and provider list, engine build time,
     GPU memory from NVML in the daemon's metrics payload. Exit 1 on any FAIL.
Usage: python -m bench.check_gpu [--jetson-index URL] [--dry-run] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._checks import Check, gated, info, verdict
from tests.support.daemon import v2_inputs, v2_outputs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "models" / "demo.onnx"
LOCK_GPU = ROOT / "requirements" / "device-gpu.txt"
LOCK_DEVICE = ROOT / "requirements" / "device.txt"
ZOO_ONNX = ("silero-vad", "magika", "ocr-det", "ocr-cls")
DEADLINE_S = 600.0
TENSORRT_VERSION = "10.16.1.11"
"""TensorRT 10 (onnxruntime-gpu's TensorRT provider links libnvinfer.so.10)."""
NVIDIA_INDEX = "https://pypi.nvidia.com"
LISTS: tuple[tuple[str, ...], ...] = (("cpu",), ("cuda", "cpu"), ("tensorrt", "cuda", "cpu"))
TOLERANCE = {"cpu": (1e-3, 1e-4), "cuda": (1e-2, 1e-3), "tensorrt": (5e-2, 2e-2)}
"""(rtol, atol) against onnxruntime's CPU provider, by the first provider of the list: the CUDA
provider may run convolutions and matmuls in TF32 (10-bit mantissa); the TensorRT run uses
fp16 kernels (~3 significant digits, errors adding up layer by layer)."""
LATENCY_RUNS = 30
METRICS_INTERVAL_S = 1.0


def detect_platform(root: Path = Path("/")) -> str:
    """``jetson`` (JetPack's release file), ``nvidia`` (the driver is loaded) or ``none``."""
    if (root / "etc" / "nv_tegra_release").exists():
        return "jetson"
    if (root / "proc" / "driver" / "nvidia" / "version").exists():
        return "nvidia"
    return "none"


def locked_versions(text: str, environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """Package -> version that a hashed export installs on this interpreter (markers evaluated)."""
    from packaging.markers import Marker

    out = {}
    for line in text.splitlines():
        if not line or line[0] in " #-":
            continue
        spec, _, marker = line.rstrip(" \\").partition(";")
        name, _, version = spec.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate(dict(environment or {})):
            continue
        out[name.strip().lower()] = version.strip()
    return out


def cuda_major(versions: Mapping[str, str]) -> int | None:
    """The CUDA major version of the locked CUDA runtime wheel (what onnxruntime-gpu needs)."""
    if "nvidia-cuda-runtime-cu12" in versions:
        return 12
    version = versions.get("nvidia-cuda-runtime")
    return int(version.split(".")[0]) if version else None


def drop_packages(text: str, names: Sequence[str]) -> str:
    """A hashed export without ``names`` (each entry is its line and the hash lines after it)."""
    drop = {n.lower() for n in names}
    out, skipping = [], False
    for line in text.splitlines():
        if line and line[0] not in " #":
            skipping = line.split("==")[0].strip().lower() in drop
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def install_plan(
    where: str, versions: Mapping[str, str], jetson_index: str | None, system_tensorrt: bool
) -> tuple[Path, list[str], list[tuple[str, ...]]]:
    """(the hashed export, packages to leave out of it, further pip installs) for ``where``."""
    if where == "jetson":
        if not jetson_index:
            raise SystemExit(
                "a Jetson needs --jetson-index URL: NVIDIA's Jetson AI Lab pip index for this "
                "JetPack (e.g. .../jp6/cu126), where onnxruntime-gpu for JetPack comes from"
            )
        return (
            LOCK_DEVICE,
            ["onnxruntime"],
            [("--index-url", jetson_index, "--no-deps", "onnxruntime-gpu")],
        )
    extra: list[tuple[str, ...]] = []
    major = cuda_major(versions)
    if not system_tensorrt and major is not None:
        extra.append(tensorrt_pip_args(major))
    return LOCK_GPU, [], extra


def tensorrt_pip_args(major: int) -> tuple[str, ...]:
    """pip arguments that install TensorRT's libraries for CUDA ``major`` from NVIDIA's index."""
    return ("--extra-index-url", NVIDIA_INDEX, f"tensorrt-cu{major}-libs=={TENSORRT_VERSION}")


def has_system_tensorrt() -> bool:
    return ctypes.util.find_library("nvinfer") is not None


def model_config(
    name: str, path: Path, providers: Sequence[str], warmup_inputs: Path
) -> dict[str, Any]:
    """One slot of the daemon's config: the provider list, fp16 with TensorRT, and warm-up on
    the inputs the check sends (TensorRT builds an engine per input shape: warming up on the
    shapes served builds the one that serves, and only that one)."""
    return {
        "name": name,
        "path": str(path),
        "providers": list(providers),
        "tensorrt_fp16": "tensorrt" in providers,
        "warmup_inputs": str(warmup_inputs),
    }


def engine_files(state_dir: Path) -> dict[str, tuple[int, int]]:
    """TensorRT engine cache files under the state dir -> (size, mtime_ns)."""
    out = {}
    for p in sorted((state_dir / "cache").glob("*/trt/*")):
        if p.is_file() and p.suffix in (".engine", ".profile", ".timing"):
            st = p.stat()
            out[str(p.relative_to(state_dir))] = (st.st_size, st.st_mtime_ns)
    return out


def cache_reused(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    """Whether the second start read the first start's engines back: at least one engine was
    built, and no file was added or rewritten."""
    return any(k.endswith(".engine") for k in first) and dict(first) == dict(second)


def tolerance(providers: Sequence[str]) -> tuple[float, float]:
    return TOLERANCE[providers[0]]


def compare(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float, atol: float
) -> tuple[bool, float]:
    """(every output within tolerance, the largest absolute difference)."""
    worst, ok = 0.0, set(got) == set(want)
    for name, w in want.items():
        g = got.get(name)
        if g is None or np.shape(g) != np.shape(w):
            return False, float("inf")
        diff = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        ok = ok and bool(np.allclose(g, w, rtol=rtol, atol=atol))
    return ok, worst


def nvml_memory() -> dict[str, int] | None:
    """GPU 0's memory from NVML, or None where NVML is absent (no nvidia-ml-py, no driver, a
    Jetson)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
            return {"used": int(mem.used), "total": int(mem.total)}
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def label(providers: Sequence[str]) -> str:
    return "[" + ", ".join(providers) + "]"


def render(checks: Sequence[Check]) -> str:
    """The one table: verdict, what, measured, target, same-run baseline."""
    head = ("result", "what", "measured", "target", "baseline")
    rows = [
        (verdict(c), str(c["name"]), str(c["measured"]), str(c["target"]), str(c["baseline"]))
        for c in checks
    ]
    widths = [min(60, max(len(r[i]) for r in [head, *rows])) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


@dataclass
class Run:
    """Everything measured, turned into rows at the end."""

    checks: list[Check] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def gate(self, name: str, target: str, measured: object, baseline: str, ok: bool) -> None:
        self.checks.append(gated(name, target, measured, baseline, ok))

    def note(self, name: str, measured: object, baseline: str) -> None:
        self.checks.append(info(name, measured, baseline))

    def left(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.started)


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    warmup: Path


def cases(tmp: Path) -> list[Case]:
    """The demo and the zoo's ONNX models, with inputs and onnxruntime CPU references."""
    from runtime import bundle
    from tests.support.zoo import by_name, fetch, reference

    golden = bundle.read_golden(DEMO.with_suffix(".golden.npz"), ["x"], ["probs"])
    out = [Case("demo", DEMO, golden.inputs, golden.expected, tmp / "demo.warmup.npz")]
    rng = np.random.default_rng(0)
    for name in ZOO_ONNX:
        model = by_name(name)
        path = fetch(model)
        feeds = model.make_inputs(rng)
        out.append(Case(name, path, feeds, reference(model, path, feeds), tmp / f"{name}.npz"))
    for c in out:
        np.savez(c.warmup, **c.feeds)
    return out


@contextlib.contextmanager
def daemon(venv: Any, tmp: Path, models: list[Case], providers: Sequence[str], broker: Any,
           state: Path, timeout: float) -> Iterator[tuple[Any, float]]:  # fmt: skip
    """``inferd run`` in the GPU venv serving ``models`` on ``providers``; (daemon, seconds from
    start to ready)."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "device_id": "check-gpu",
        "state_dir": str(state),
        "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
        "telemetry": {"metrics_interval_s": METRICS_INTERVAL_S},
        "models": [model_config(c.name, c.path, providers, c.warmup) for c in models],
    }
    start = time.monotonic()
    proc = venv.start_daemon(tmp, config, timeout=timeout)
    ready_s = time.monotonic() - start
    try:
        yield proc, ready_s
    finally:
        proc.stop()


def serve_and_compare(run: Run, proc: Any, models: list[Case], providers: Sequence[str]) -> None:
    rtol, atol = tolerance(providers)
    for c in models:
        status, meta = proc.request("GET", f"/v2/models/{c.name}")
        active = meta.get("parameters", {}).get("providers", []) if status == 200 else []
        run.gate(f"{c.name} {label(providers)}: providers active", label(providers),
                 label(active), "as configured", list(active) == list(providers))  # fmt: skip
        body = v2_inputs(c.feeds)
        times = []
        got: dict[str, np.ndarray] = {}
        for _ in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            status, answer = proc.request("POST", f"/v2/models/{c.name}/infer", {"inputs": body})
            times.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                break
            got = v2_outputs(answer)
        ok, worst = compare(got, c.reference, rtol, atol) if status == 200 else (False, -1.0)
        run.gate(f"{c.name} {label(providers)}: outputs vs onnxruntime CPU",
                 f"rtol {rtol:g}, atol {atol:g}",
                 f"max abs diff {worst:.3g}" if status == 200 else f"HTTP {status}: {answer}",
                 "onnxruntime's CPU provider in the dev venv", ok)  # fmt: skip
        run.results.setdefault("latency_ms", {}).setdefault(c.name, {})[label(providers)] = round(
            statistics.median(times), 3
        )


def metrics_gpu_memory(capture: Any) -> str:
    for m in reversed(capture.on("/metrics")):
        system = json.loads(m.payload).get("system", {})
        if system.get("gpu_memory_used_bytes") is not None:
            used, total = system["gpu_memory_used_bytes"], system.get("gpu_memory_total_bytes")
            return f"{used / 2**20:.0f} MiB of {total / 2**20:.0f} MiB" if total else str(used)
    return "not reported (no NVML: a Jetson, or nvidia-ml-py missing)"


def check(args: argparse.Namespace) -> Run:
    from tests.support.broker import Broker, Capture
    from tests.support.locked_venv import LockedVenv

    run = Run()
    where = detect_platform()
    versions = locked_versions((LOCK_GPU if where != "jetson" else LOCK_DEVICE).read_text())
    lock, leave_out, extra = install_plan(
        where if where != "none" else "nvidia",
        versions,
        args.jetson_index,
        has_system_tensorrt() or args.no_tensorrt_install,
    )
    with tempfile.TemporaryDirectory(prefix="check-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        requirements = lock
        if leave_out:
            requirements = tmp / lock.name
            requirements.write_text(drop_packages(lock.read_text(), leave_out))
        venv = LockedVenv("gpu", requirements, tuple(extra))
        t0 = time.monotonic()
        venv.python()
        run.note("venv from the lock", f"{time.monotonic() - t0:.0f} s", str(venv.path))
        models = cases(tmp)
        broker = Broker(tmp)
        broker.start()
        capture = Capture(broker.host, broker.port, ("inferd/check-gpu/metrics",))
        try:
            for providers in LISTS:
                serve_list(run, venv, tmp, models, providers, broker, capture)
            for providers in LISTS[1:]:
                gate_probe(run, venv, tmp, providers)
        finally:
            capture.close()
            broker.stop()
    for name, per in run.results.get("latency_ms", {}).items():
        base = per.get(label(("cpu",)))
        for lst, ms in per.items():
            if lst != label(("cpu",)):
                run.note(f"{name} {lst}: p50 over HTTP", f"{ms} ms", f"[cpu] {base} ms")
    took = time.monotonic() - run.started
    run.gate("whole check", f"< {DEADLINE_S:.0f} s", f"{took:.0f} s", "", took < DEADLINE_S)
    return run


def serve_list(
    run: Run,
    venv: Any,
    tmp: Path,
    models: list[Case],
    providers: tuple[str, ...],
    broker: Any,
    capture: Any,
) -> None:
    """Serve every model on ``providers``: outputs, latency, GPU memory; with TensorRT a second
    start on the same state dir (the engine cache)."""
    state = tmp / ("state-" + "-".join(providers))
    logs = tmp / ("log-" + "-".join(providers))
    on = label(providers)
    try:
        with daemon(venv, logs / "1", models, providers, broker, state,
                    max(5.0, min(300.0, run.left()))) as (proc, ready_s):  # fmt: skip
            run.results.setdefault("ready_s", {})[on] = round(ready_s, 2)
            seen = len(capture.on("/metrics"))
            serve_and_compare(run, proc, models, providers)
            if providers[0] != "cpu":
                # a metrics payload sampled while this daemon serves on the GPU
                capture.wait(lambda: len(capture.on("/metrics")) > seen + 1,
                             4 * METRICS_INTERVAL_S)  # fmt: skip
                run.note(f"GPU memory, {on} serving", metrics_gpu_memory(capture),
                         "system.gpu_memory_used_bytes in the metrics payload")  # fmt: skip
        if providers[0] != "tensorrt":
            return
        first = engine_files(state)
        with daemon(venv, logs / "2", models, providers, broker, state,
                    max(5.0, min(300.0, run.left()))) as (_, again_s):  # fmt: skip
            second = engine_files(state)
    except AssertionError as err:  # the daemon exited or was not ready in time
        run.gate(f"inferd serves {on}", "ready", "not ready", str(err)[-300:], False)
        return
    engines = sum(k.endswith(".engine") for k in first)
    run.gate("TensorRT engine cache: built on the first start, read on the second",
             "same engine files, untouched",
             f"{engines} engines; start to ready {ready_s:.1f} s, then {again_s:.1f} s",
             "state_dir/cache/<slot>/trt", cache_reused(first, second))  # fmt: skip
    cpu_s = run.results["ready_s"].get(label(("cpu",)))
    if cpu_s is not None:
        run.note("TensorRT engine build (first start minus the [cpu] start)",
                 f"{ready_s - cpu_s:.1f} s", f"[cpu] start to ready {cpu_s:.1f} s")  # fmt: skip


def gate_probe(run: Run, venv: Any, tmp: Path, providers: Sequence[str]) -> None:
    args = ["-m", "tests.support.gate_probe", "--providers", ",".join(providers),
            "--state", str(tmp / ("gate-" + "-".join(providers)))]  # fmt: skip
    if "tensorrt" in providers:
        args.append("--fp16")
    done = venv.run(args, timeout=max(30.0, min(300.0, run.left())))
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr[-300:].replace("\n", " ")
        run.gate(f"gate + hot swap {label(providers)}", "runs", f"exit {done.returncode}", tail,
                 False)  # fmt: skip
        return
    on = label(providers)
    run.gate(
        f"gate {on}: wrong golden outputs refused",
        "refused",
        str(out.get("wrong_golden"))[:80],
        "",
        "differs beyond" in str(out["wrong_golden"]),
    )
    run.gate(f"gate {on}: right golden outputs pass", "passes", str(out.get("report"))[:80], "",
             isinstance(out.get("report"), dict))  # fmt: skip
    run.gate(f"gate {on}: candidate on the GPU", on, label(out.get("candidate", [])), "",
             out.get("candidate") == list(providers))  # fmt: skip
    swap = out.get("swap", {})
    run.gate(f"hot swap {on} under load", "0 failed", f"{swap.get('failed')} failed of "
             f"{swap.get('ok', 0) + swap.get('failed', 0)}", "", swap.get("failed") == 0
             and swap.get("ok", 0) > 0)  # fmt: skip


def plan_text(args: argparse.Namespace) -> str:
    """What the check would install and run here (``--dry-run``; no GPU needed)."""
    from runtime.backends.onnx import provider_options
    from runtime.options import RuntimeOptions

    where = detect_platform()
    versions = locked_versions((LOCK_GPU if where != "jetson" else LOCK_DEVICE).read_text())
    lines = [f"platform: {where} ({platform.machine()}, Python {platform.python_version()})"]
    try:
        lock, leave_out, extra = install_plan(
            where if where != "none" else "nvidia", versions, args.jetson_index,
            has_system_tensorrt(),
        )  # fmt: skip
    except SystemExit as err:
        return "\n".join([*lines, str(err)]) + "\n"
    lines.append(f"install: pip install --require-hashes -r {lock.relative_to(ROOT)}"
                 + (f" (without {', '.join(leave_out)})" if leave_out else ""))  # fmt: skip
    lines += [f"then:    pip install {' '.join(a)}" for a in extra]
    lines.append(f"onnxruntime-gpu {versions.get('onnxruntime-gpu', '(Jetson index)')}, CUDA "
                 f"{cuda_major(versions) or 'from JetPack'}")  # fmt: skip
    lines.append(f"NVML: {nvml_memory() or 'absent (GPU memory will not be reported)'}")
    for providers in LISTS:
        opts = RuntimeOptions(providers=providers, tensorrt_fp16="tensorrt" in providers)
        cache = Path("<state_dir>/cache/<slot>")
        shown = {p: provider_options(p, opts, None) for p in providers}
        if "tensorrt" in providers:
            shown["tensorrt"].update(
                trt_engine_cache_enable=True, trt_engine_cache_path=str(cache / "trt"),
                trt_timing_cache_enable=True, trt_timing_cache_path=str(cache / "trt"),
            )  # fmt: skip
        lines.append(f"serve {label(providers)}: {json.dumps(shown)}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jetson-index", help="pip index with onnxruntime-gpu for this JetPack")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--json", action="store_true", help="the rows as JSON after the table")
    parser.add_argument(
        "--no-tensorrt-install",
        action="store_true",
        help="do not pip-install TensorRT (it is on the library path some other way)",
    )
    parser.add_argument(
        "--allow-no-gpu",
        action="store_true",
        help="run without a GPU: every GPU row fails; tests the check itself up to the GPU",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        sys.stdout.write(plan_text(args))
        return 0
    if detect_platform() == "none" and not args.allow_no_gpu:
        sys.stderr.write(
            "check-gpu: no NVIDIA GPU here (no /proc/driver/nvidia/version, no "
            "/etc/nv_tegra_release); run it on a GPU host or a Jetson (--dry-run shows the plan)\n"
        )
        return 2
    run = check(args)
    sys.stdout.write(render(run.checks))
    if args.json:
        sys.stdout.write(json.dumps({"results": run.results, "checks": run.checks}) + "\n")
    return 1 if any(verdict(c) == "FAIL" for c in run.checks) else 0


if __name__ == "__main__":
    raise SystemExit(main())
