"""ONNX Runtime backend: execution providers in priority order with a clean fallback to CPU.

The TensorRT and CUDA paths are built from onnxruntime's documented provider options and have
not yet been run on a GPU here (``make check-gpu`` is the script that does). The OpenVINO path
runs in the tests on this machine's CPU, in a venv with ``onnxruntime-openvino`` (which replaces
``onnxruntime``). On a machine without a provider the session falls back to what is available,
with one warning naming what was skipped and the extra that brings it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.base import Backend, TensorSpec, one_line
from runtime.errors import BackendUnavailableError, ModelLoadError
from runtime.options import RuntimeOptions

try:
    import onnxruntime as ort
except ImportError as _err:  # pragma: no cover - onnxruntime is a core dependency
    raise BackendUnavailableError(
        "onnxruntime is not installed: pip install onnxruntime (or inferd[gpu])"
    ) from _err

log = logging.getLogger(__name__)


class _NeverRaisedError(Exception):
    """Stands in for onnxruntime's EPFail in a build without it."""


_EP_FAIL: type[Exception] = getattr(ort.capi._pybind_state, "EPFail", _NeverRaisedError)
"""A provider failing at run time: onnxruntime's ``InferenceSession.run`` then moves the
session to its fallback providers (the CPU) and runs again, once."""

ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PROVIDER_EXTRAS = {"tensorrt": "gpu", "cuda": "gpu", "openvino": "openvino"}
"""The pip extra (and requirements/device-<extra>.txt) that brings each accelerated provider."""
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ONNX tensor type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def available_providers() -> list[str]:
    """The inferd names of the execution providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [name for name, ort_name in ORT_PROVIDERS.items() if ort_name in have]


TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
"""What onnxruntime-gpu's TensorRT provider links (TensorRT 10), loaded from ``tensorrt_libs``."""


@functools.cache
def preload_gpu_libraries(tensorrt: bool) -> list[str]:
    """Load the CUDA, cuDNN (and TensorRT) libraries that pip installed beside onnxruntime-gpu,
    once per process; returns the TensorRT files loaded.

    Those wheels put the libraries under site-packages (nvidia/cu13/lib, tensorrt_libs/), where
    the dynamic linker does not look: without this the CUDA provider fails on libcublasLt and
    the session silently runs on the CPU. onnxruntime's ``preload_dlls`` covers CUDA and cuDNN;
    TensorRT's libraries are loaded by path, so that the provider's own ``dlopen`` by soname
    finds them already there. A system install (JetPack, CUDA from apt) needs neither and is
    left alone: whatever fails to load here is only a debug line.
    """
    quiet = io.StringIO()  # preload_dlls prints what it could not load
    with contextlib.redirect_stdout(quiet):
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
        except Exception as err:  # noqa: BLE001 - best effort: the session says what is missing
            log.debug("preload_dlls: %s", err)
    if quiet.getvalue().strip():
        log.debug("preload_dlls: %s", quiet.getvalue().strip())
    loaded: list[str] = []
    spec = importlib.util.find_spec("tensorrt_libs") if tensorrt else None
    if spec is not None and spec.submodule_search_locations:
        where = Path(next(iter(spec.submodule_search_locations)))
        for name in TENSORRT_LIBRARIES:
            try:
                ctypes.CDLL(str(where / name), mode=ctypes.RTLD_GLOBAL)
                loaded.append(name)
            except OSError as err:
                log.debug("cannot preload %s: %s", where / name, err)
    return loaded


def provider_options(name: str, opts: RuntimeOptions, cache_dir: Path | None) -> dict[str, Any]:
    """The documented onnxruntime options of one execution provider for a model, with the
    model's ``provider_options[name]`` over them; caches go under ``cache_dir`` (the slot's
    folder in the state dir), created here."""
    out: dict[str, Any] = {}
    if name == "tensorrt":
        out = {
            "device_id": opts.device_id,
            "trt_fp16_enable": opts.tensorrt_fp16,
            "trt_int8_enable": opts.tensorrt_int8,
        }
        if cache_dir is not None:
            # built engines are kept across restarts: the first load of a model takes
            # seconds to minutes on a Jetson, later ones read the engine back
            engine_dir = cache_dir / "trt"
            engine_dir.mkdir(parents=True, exist_ok=True)
            out["trt_engine_cache_enable"] = True
            out["trt_engine_cache_path"] = str(engine_dir)
            out["trt_timing_cache_enable"] = True
            out["trt_timing_cache_path"] = str(engine_dir)
    elif name == "cuda":
        out = {"device_id": opts.device_id}
    elif name == "openvino":
        out = {"device_type": opts.openvino_device_type}
        if opts.openvino_precision is not None:
            out["precision"] = opts.openvino_precision
        if opts.threads > 0:
            # OpenVINO runs the graph on its own thread pool, not ORT's intra-op one
            out["num_of_threads"] = opts.threads
        if cache_dir is not None:
            # compiled blobs, so that a restart skips OpenVINO's model compilation
            blob_dir = cache_dir / "openvino"
            blob_dir.mkdir(parents=True, exist_ok=True)
            out["cache_dir"] = str(blob_dir)
    out.update(opts.provider_options.get(name, {}))
    return out


class OnnxBackend(Backend):
    runtime = "onnxruntime"

    def _provider_list(self) -> list[tuple[str, dict[str, Any]]]:
        opts = self.options
        have = set(ort.get_available_providers())
        chosen: list[tuple[str, dict[str, Any]]] = []
        skipped = []
        for name in opts.providers:
            ort_name = ORT_PROVIDERS[name]
            if ort_name not in have:
                skipped.append(name)
                continue
            chosen.append((ort_name, provider_options(name, opts, self.cache_dir)))
        if any(n in (ORT_PROVIDERS["cuda"], ORT_PROVIDERS["tensorrt"]) for n, _ in chosen):
            preload_gpu_libraries(tensorrt=any(n == ORT_PROVIDERS["tensorrt"] for n, _ in chosen))
        if not any(n == ORT_PROVIDERS["cpu"] for n, _ in chosen):
            # CPU is always the last resort: a device without its GPU keeps serving, slower.
            chosen.append((ORT_PROVIDERS["cpu"], provider_options("cpu", opts, self.cache_dir)))
        if skipped:
            extras = sorted({PROVIDER_EXTRAS[n] for n in skipped if n in PROVIDER_EXTRAS})
            log.warning(
                "%s: execution provider(s) %s not available in this onnxruntime build (%s); "
                "using %s",
                opts.name,
                ", ".join(skipped),
                ", ".join(f"install inferd[{e}] from requirements/device-{e}.txt" for e in extras)
                or "see the README's Hardware acceleration section",
                ", ".join(n for n, _ in chosen),
            )
        return chosen

    def _session_options(self) -> ort.SessionOptions:
        opts = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.threads
        so.inter_op_num_threads = opts.inter_op_threads
        so.graph_optimization_level = _OPT_LEVELS[opts.graph_optimization]
        so.log_severity_level = 3
        if opts.optimized_model_cache and self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            so.optimized_model_filepath = str(self.cache_dir / f"{self.path.stem}.opt.onnx")
        return so

    def _load(self) -> None:
        providers = self._provider_list()
        reverse = {v: k for k, v in ORT_PROVIDERS.items()}
        while True:
            try:
                self.session = ort.InferenceSession(
                    str(self.path),
                    sess_options=self._session_options(),
                    providers=[n for n, _ in providers],
                    provider_options=[o for _, o in providers],
                )
                break
            except Exception as err:
                if len(providers) == 1:
                    raise ModelLoadError(
                        f"{self.path}: cannot load ONNX model: {one_line(err)}"
                    ) from err
                # An accelerator that cannot compile this model (OpenVINO's CPU plugin refuses
                # silero-vad's If with a dynamic-rank branch) fails the whole session: the
                # model is served by the next provider in the list rather than not at all.
                log.warning(
                    "%s: execution provider %s cannot run %s (%s); trying %s",
                    self.options.name,
                    reverse[providers[0][0]],
                    self.path.name,
                    _last_line(err),
                    ", ".join(reverse[n] for n, _ in providers[1:]),
                )
                providers = providers[1:]
        self.inputs = tuple(_spec(i) for i in self.session.get_inputs())
        self.outputs = tuple(_spec(o) for o in self.session.get_outputs())
        self.providers = tuple(reverse.get(p, p) for p in self.session.get_providers())
        dropped = [reverse[n] for n, _ in providers if reverse[n] not in self.providers]
        if dropped:
            # onnxruntime skips a provider it offers but cannot start (no such OpenVINO device,
            # a precision the device lacks, no CUDA driver) and says so only on stderr
            log.warning(
                "%s: execution provider(s) %s failed to start (see onnxruntime's message above); "
                "serving with %s",
                self.options.name,
                ", ".join(dropped),
                ", ".join(self.providers),
            )
        self._all_outputs = [o.name for o in self.outputs]

    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._all_outputs
        feed = feeds if type(feeds) is dict else dict(feeds)
        session = self.session
        # The compiled session's run, past onnxruntime's Python wrapper: the wrapper checks the
        # inputs again (``run_timed`` has, against the model's signature) and costs 2.5 us,
        # a third of a small request's in-process overhead. Its one other duty, falling back
        # to the CPU when a provider fails at run time, is kept: that failure goes to it.
        # (``_sess`` is the wrapper's attribute for the compiled session since onnxruntime
        # 1.0; without it the wrapper runs.)
        try:
            results = getattr(session, "_sess", session).run(names, feed, None)
        except _EP_FAIL:
            results = session.run(names, feed)
        return dict(zip(names, results, strict=True))

    def _warm_run(self, feeds: Mapping[str, np.ndarray]) -> None:
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # fatal only: the warm-up search expects failed runs
        self.session.run(self._all_outputs, dict(feeds), quiet)

    def close(self) -> None:
        self.__dict__.pop("session", None)


def _last_line(err: BaseException, limit: int = 300) -> str:
    """The last line of a runtime's multi-line error, where OpenVINO and TensorRT say why (the
    first is a C++ stack frame)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec(node: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    # symbolic dimensions ("batch", "N") tie dynamic sizes together for the warm-up search
    names = tuple(d if isinstance(d, str) and d else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape, dim_names=names)
