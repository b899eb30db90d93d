"""ONNX Runtime backend: execution providers in priority order with a clean fallback to CPU.

The TensorRT and CUDA paths are built from onnxruntime's documented provider options and have
not yet been run on a GPU here; on a machine without them the session falls back to what is
available, with one warning naming what was skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.backends.base import Backend, TensorSpec, one_line
from runtime.errors import BackendUnavailableError, ModelLoadError

try:
    import onnxruntime as ort
except ImportError as _err:  # pragma: no cover - onnxruntime is a core dependency
    raise BackendUnavailableError(
        "onnxruntime is not installed: pip install onnxruntime (or inferd[gpu])"
    ) from _err

log = logging.getLogger(__name__)

ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
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
            provider_opts: dict[str, Any] = {}
            if name == "tensorrt":
                provider_opts = {
                    "device_id": opts.device_id,
                    "trt_fp16_enable": opts.tensorrt_fp16,
                    "trt_int8_enable": opts.tensorrt_int8,
                }
                if self.cache_dir is not None:
                    engine_dir = self.cache_dir / "trt"
                    engine_dir.mkdir(parents=True, exist_ok=True)
                    provider_opts["trt_engine_cache_enable"] = True
                    provider_opts["trt_engine_cache_path"] = str(engine_dir)
                    provider_opts["trt_timing_cache_enable"] = True
                    provider_opts["trt_timing_cache_path"] = str(engine_dir)
            elif name == "cuda":
                provider_opts = {"device_id": opts.device_id}
            provider_opts.update(opts.provider_options.get(name, {}))
            chosen.append((ort_name, provider_opts))
        if not any(n == ORT_PROVIDERS["cpu"] for n, _ in chosen):
            # CPU is always the last resort: a device without its GPU keeps serving, slower.
            chosen.append((ORT_PROVIDERS["cpu"], dict(opts.provider_options.get("cpu", {}))))
        if skipped:
            log.warning(
                "%s: execution provider(s) %s not available in this onnxruntime build; using %s",
                opts.name,
                ", ".join(skipped),
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
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=self._session_options(),
                providers=[n for n, _ in providers],
                provider_options=[o for _, o in providers],
            )
        except Exception as err:
            raise ModelLoadError(f"{self.path}: cannot load ONNX model: {one_line(err)}") from err
        self.inputs = tuple(_spec(i) for i in self.session.get_inputs())
        self.outputs = tuple(_spec(o) for o in self.session.get_outputs())
        reverse = {v: k for k, v in ORT_PROVIDERS.items()}
        self.providers = tuple(reverse.get(p, p) for p in self.session.get_providers())
        self._all_outputs = [o.name for o in self.outputs]

    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else self._all_outputs
        results = self.session.run(names, feeds if type(feeds) is dict else dict(feeds))
        return dict(zip(names, results, strict=True))

    def _warm_run(self, feeds: Mapping[str, np.ndarray]) -> None:
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # fatal only: the warm-up search expects failed runs
        self.session.run(self._all_outputs, dict(feeds), quiet)

    def close(self) -> None:
        self.__dict__.pop("session", None)


def _spec(node: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {node.name!r} has unsupported type {node.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    # symbolic dimensions ("batch", "N") tie dynamic sizes together for the warm-up search
    names = tuple(d if isinstance(d, str) and d else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape, dim_names=names)
