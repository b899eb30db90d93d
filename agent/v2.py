"""KServe Open Inference Protocol v2: JSON tensors in and out, shared by HTTP and MQTT.

Decoding checks everything a caller can get wrong (JSON, tensor names, datatypes, shapes, data
length) and raises :class:`InputError` with a message that says which tensor and what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from agent.backends.base import NUMPY_DTYPES, V2_DATATYPES, Backend
from agent.errors import InputError

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite"}


class _Tensor(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] = {}


class _OutputRequest(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    parameters: dict[str, Any] = {}


class _InferRequest(msgspec.Struct, forbid_unknown_fields=False):
    inputs: list[_Tensor]
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[_OutputRequest] | None = None


class InferRequest(msgspec.Struct, frozen=True):
    """A decoded request: numpy feeds, requested outputs (None: all) and the caller's id."""

    feeds: dict[str, np.ndarray]
    output_names: list[str] | None
    request_id: str | None
    parameters: dict[str, Any]
    classification: dict[str, int]
    """Requested output name -> top-k, from the classification extension."""


_decoder = msgspec.json.Decoder(_InferRequest)
_encoder = msgspec.json.Encoder()


def _json_error(err: msgspec.DecodeError) -> InputError:
    msg = str(err)
    if msg.startswith("Expected") or "`$" in msg:
        return InputError(f"invalid request: {msg}")
    return InputError(f"malformed JSON: {msg}")


def _tensor(t: _Tensor) -> np.ndarray:
    dtype = NUMPY_DTYPES.get(t.datatype)
    if dtype is None or dtype == "str":
        raise InputError(f"input {t.name!r}: unsupported datatype {t.datatype!r}")
    if any(d < 0 for d in t.shape):
        raise InputError(f"input {t.name!r}: shape {t.shape} has a negative dimension")
    count = math.prod(t.shape)
    try:
        # Nested (row-major) data is allowed by the spec; numpy takes both forms.
        arr = np.asarray(t.data, dtype=np.dtype(dtype))
    except (ValueError, TypeError, OverflowError) as err:
        raise InputError(f"input {t.name!r}: data is not {t.datatype}: {err}") from err
    if arr.size != count:
        raise InputError(
            f"input {t.name!r}: {arr.size} values do not fill shape {t.shape} ({count} values)"
        )
    return arr.reshape(t.shape)


def decode_infer_request(body: bytes, backend: Backend) -> InferRequest:
    """Parse and check a v2 infer request body for ``backend``; raises InputError."""
    try:
        req = _decoder.decode(body)
    except msgspec.DecodeError as err:
        raise _json_error(err) from err
    feeds: dict[str, np.ndarray] = {}
    for t in req.inputs:
        if t.name in feeds:
            raise InputError(f"input {t.name!r} is given twice")
        feeds[t.name] = _tensor(t)
    backend.check_feeds(feeds)
    names = None
    classification: dict[str, int] = {}
    if req.outputs:
        known = {o.name for o in backend.outputs}
        names = []
        for o in req.outputs:
            if o.name not in known:
                raise InputError(
                    f"unknown output {o.name!r}; the model gives {', '.join(sorted(known))}"
                )
            names.append(o.name)
            k = o.parameters.get("classification")
            if k is not None:
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise InputError(f"output {o.name!r}: classification must be an integer >= 1")
                classification[o.name] = k
    return InferRequest(feeds, names, req.id, req.parameters, classification)


def _classify(arr: np.ndarray, k: int, labels: Sequence[str]) -> list[str]:
    """Triton's classification extension: ``"score:index[:label]"`` for the top k of each row."""
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    out = []
    for row in rows:
        top = np.argsort(row)[::-1][:k]
        for i in top:
            label = f":{labels[i]}" if i < len(labels) else ""
            out.append(f"{float(row[i]):g}:{int(i)}{label}")
    return out


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    classification: Mapping[str, int] | None = None,
    labels: Sequence[str] = (),
) -> bytes:
    """The v2 infer response body for ``outputs``."""
    tensors = []
    for name, arr in outputs.items():
        k = classification.get(name) if classification else None
        if k is not None:
            data = _classify(arr, k, labels)
            rows = arr.shape[0] if arr.ndim > 1 else 1
            tensors.append(
                {
                    "name": name,
                    "datatype": "BYTES",
                    "shape": [rows, min(k, arr.size // rows)],
                    "data": data,
                }
            )
            continue
        tensors.append(
            {
                "name": name,
                "datatype": V2_DATATYPES.get(arr.dtype.name, "BYTES"),
                "shape": list(arr.shape),
                "data": arr.ravel().tolist(),
            }
        )
    return _encoder.encode(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "outputs": tensors,
        }
    )


def model_metadata(name: str, version: str, runtime: str, backend: Backend) -> dict[str, Any]:
    """The v2 model metadata document."""
    sig = backend.signature()
    return {
        "name": name,
        "versions": [version],
        "platform": PLATFORMS.get(runtime, runtime),
        "inputs": sig["inputs"],
        "outputs": sig["outputs"],
        "parameters": {"providers": list(backend.providers)},
    }


def error_body(message: str) -> bytes:
    """``{"error": message}`` as JSON bytes."""
    return _encoder.encode({"error": message})


def encode(obj: Any) -> bytes:
    """JSON-encode a plain object."""
    return _encoder.encode(obj)
