"""Runtime backends and their registry; a runtime is imported only when a model needs it."""

from __future__ import annotations

import importlib
from pathlib import Path

from runtime.backends.base import Backend, TensorSpec
from runtime.errors import BackendUnavailableError
from runtime.options import RuntimeOptions, runtime_for

__all__ = [
    "REGISTRY",
    "Backend",
    "TensorSpec",
    "backend_class",
    "open_backend",
    "runtime_for",
]

# runtime name -> (module, class, pip extra that provides it)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": (
        "runtime.backends.onnx",
        "OnnxBackend",
        "inferd (onnxruntime is a core dependency)",
    ),
    "tflite": ("runtime.backends.tflite", "TfliteBackend", "inferd[tflite]"),
}


def backend_class(runtime: str) -> type[Backend]:
    """The Backend subclass for ``runtime``; BackendUnavailableError when it cannot be imported."""
    try:
        module_name, class_name, _extra = REGISTRY[runtime]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown runtime {runtime!r}; known: {', '.join(REGISTRY)}"
        ) from None
    module = importlib.import_module(module_name)
    cls: type[Backend] = getattr(module, class_name)
    return cls


def open_backend(
    path: str | Path, options: RuntimeOptions, cache_dir: Path | None = None
) -> Backend:
    """Load a model with the backend its config names, warmed up and ready to run."""
    return backend_class(options.runtime).open(path, options, cache_dir)
