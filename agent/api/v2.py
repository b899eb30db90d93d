"""KServe Open Inference Protocol v2: JSON tensors in and out, shared by HTTP and MQTT.

Decoding checks everything a caller can get wrong (JSON, tensor names, datatypes, shapes, data
length) and raises :class:`InputError` with a message that says which tensor and what is wrong.

The binary tensor extension (as in KServe/Triton) is supported both ways: the JSON header is
followed by raw little-endian tensor bytes, its length given in ``Inference-Header-Content-Length``;
an input carries ``parameters.binary_data_size`` instead of ``data``, an output asks for
``parameters.binary_data: true`` (or the request for ``parameters.binary_data_output: true``).
Parsing thousands of JSON floats costs more than the model run for mid-size inputs; raw bytes
cost a copy.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from agent.slots import Later, ModelSlot
from runtime.backends.base import Backend
from runtime.errors import InputError, NotReadyError
from runtime.tensors import NUMPY_DTYPES, V2_DATATYPES

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite"}


class _Tensor(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
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
    binary_outputs: frozenset[str] | bool = False
    """Outputs to send as raw bytes (True: all of them)."""


_decoder = msgspec.json.Decoder(_InferRequest)
_encoder = msgspec.json.Encoder()

MAX_DIMS = 32
"""Dimensions of one tensor (numpy stops at 64; no model here comes near)."""
MAX_ID_LENGTH = 256
"""Characters in a request ``id``: ids are kept for the quality join, so their size is bounded."""


def _json_error(err: msgspec.DecodeError) -> InputError:
    msg = str(err)
    if msg.startswith("Expected") or "`$" in msg:
        return InputError(f"invalid request: {msg}")
    return InputError(f"malformed JSON: {msg}")


_PACK: dict[str, tuple[str, np.dtype[Any]]] = {
    "FP32": ("f", np.dtype(np.float32)),
    "FP64": ("d", np.dtype(np.float64)),
    "INT8": ("b", np.dtype(np.int8)),
    "INT16": ("h", np.dtype(np.int16)),
    "INT32": ("i", np.dtype(np.int32)),
    "INT64": ("q", np.dtype(np.int64)),
    "UINT8": ("B", np.dtype(np.uint8)),
    "UINT16": ("H", np.dtype(np.uint16)),
    "UINT32": ("I", np.dtype(np.uint32)),
    "UINT64": ("Q", np.dtype(np.uint64)),
}
"""struct codes (standard sizes, native order) of the datatypes a flat list is packed from."""


_WIRE_DTYPES = {
    v2: np.dtype(np.dtype(name).newbyteorder("<").str)
    for v2, name in NUMPY_DTYPES.items()
    if name != "str"
}
"""v2 datatype -> the little-endian dtype of the binary extension's raw bytes (through its
``str``: numpy's own object where that is the native order, so a copy needs no conversion)."""
_NATIVE_DTYPES = {v2: np.dtype(name) for v2, name in NUMPY_DTYPES.items() if name != "str"}
"""v2 datatype -> numpy's own dtype object: arrays made with it pass the backend's dtype check
on identity (comparing ``dtype.name`` costs 2.5 us a tensor here)."""
_V2_BY_DTYPE = {np.dtype(name): v2 for name, v2 in V2_DATATYPES.items() if name != "str"}
"""numpy dtype -> v2 datatype, looked up without ``dtype.name``."""
_LITTLE = sys.byteorder == "little"


def _packed(data: list[Any], datatype: str) -> np.ndarray | None:
    """A flat list of numbers as an array, or None when numpy has to judge it.

    ``struct`` converts a list of Python numbers in one C loop, 2-3x faster than numpy's
    per-element coercion (the largest cost of a JSON request of a few thousand numbers), with
    the same rounding (float64 to float32 as C does). Whatever it refuses (a nested list, a
    string, a float for an integer type, a value out of range) goes the numpy way, whose errors
    are the ones callers see.
    """
    spec = _PACK.get(datatype)
    if spec is None:
        return None
    code, dtype = spec
    buf = bytearray(len(data) * dtype.itemsize)  # writable, like numpy's own arrays
    try:
        struct.pack_into(f"={len(data)}{code}", buf, 0, *data)
    except (struct.error, OverflowError, TypeError):
        return None
    return np.frombuffer(buf, dtype=dtype)


def _shape_error(t: _Tensor) -> InputError:
    """numpy refuses the shape (a dimension beyond its range, with a zero elsewhere)."""
    return InputError(f"input {t.name!r}: shape {t.shape} is beyond what an array can have")


def _tensor(t: _Tensor, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """The tensor's array and the offset just past its binary data (if it had any)."""
    wire = _WIRE_DTYPES.get(t.datatype)
    if wire is None:
        raise InputError(f"input {t.name!r}: unsupported datatype {t.datatype!r}")
    shape = t.shape
    if len(shape) > MAX_DIMS:
        raise InputError(f"input {t.name!r}: {len(shape)} dimensions; the limit is {MAX_DIMS}")
    if shape and min(shape) < 0:
        raise InputError(f"input {t.name!r}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    size = t.parameters.get("binary_data_size") if t.parameters else None
    if size is not None:
        if not isinstance(size, int) or size != count * wire.itemsize:
            raise InputError(
                f"input {t.name!r}: binary_data_size {size} does not match shape {shape} of"
                f" {t.datatype} ({count * wire.itemsize} bytes)"
            )
        if offset + size > len(binary):
            raise InputError(
                f"input {t.name!r}: binary data ends after {len(binary) - offset} bytes"
            )
        # A copy, not a view of the body: the array is writable like any other, and a kept
        # array (the quality join, a batch) does not hold the whole request alive. Made in
        # numpy's own dtype object, the backend's dtype check passes on identity.
        try:
            view = np.ndarray(shape, wire, binary, offset)
        except ValueError as err:
            raise _shape_error(t) from err
        native = _NATIVE_DTYPES[t.datatype]
        return (view.copy() if wire is native else view.astype(native)), offset + size
    data = t.data
    if data is None:
        raise InputError(f"input {t.name!r}: needs data or parameters.binary_data_size")
    packed = _packed(data, t.datatype)
    if packed is not None:
        # Finite: JSON has no NaN or infinity (the decoder refuses numbers beyond float64),
        # and struct refuses a float64 beyond float32's range.
        arr = packed
    else:
        try:
            # Nested (row-major) data is allowed by the spec; numpy takes both forms.
            arr = np.asarray(data, dtype=_NATIVE_DTYPES[t.datatype])
        except (ValueError, TypeError, OverflowError) as err:
            raise InputError(f"input {t.name!r}: data is not {t.datatype}: {err}") from err
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            # JSON numbers cannot be NaN or infinite: these came from strings ("nan", "inf")
            # or from numbers beyond the datatype's range, and would poison outputs and
            # statistics.
            raise InputError(f"input {t.name!r}: data holds NaN or infinite values")
    if arr.size != count:
        raise InputError(
            f"input {t.name!r}: {arr.size} values do not fill shape {shape} ({count} values)"
        )
    try:
        return arr.reshape(shape), offset
    except ValueError as err:
        raise _shape_error(t) from err


def decode_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse a v2 infer request into numpy feeds; raises InputError.

    ``header_length`` is the ``Inference-Header-Content-Length`` of a binary request: the JSON
    is that many bytes and raw tensor data follows. Whether the tensors and output names fit
    the model is checked once, by the backend that runs them (``Backend.run_timed``).
    """
    view = memoryview(body)
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise InputError(
                f"Inference-Header-Content-Length {header_length} is outside the body"
                f" of {len(body)} bytes"
            )
        head, binary = view[:header_length], view[header_length:]
    else:
        head, binary = view, memoryview(b"")
    try:
        req = _decoder.decode(head)
    except msgspec.DecodeError as err:
        raise _json_error(err) from err
    except RecursionError as err:  # msgspec's guard against deep nesting (about 1000 levels)
        raise InputError("malformed JSON: nested too deeply") from err
    if req.id is not None and len(req.id) > MAX_ID_LENGTH:
        raise InputError(f"id is {len(req.id)} characters long; the limit is {MAX_ID_LENGTH}")
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for t in req.inputs:
        if t.name in feeds:
            raise InputError(f"input {t.name!r} is given twice")
        feeds[t.name], offset = _tensor(t, binary, offset)
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data belong to no input")
    names = None
    classification: dict[str, int] = {}
    binary_all = req.parameters.get("binary_data_output") is True
    binary_outputs: set[str] = set()
    if req.outputs:
        names = []
        for o in req.outputs:
            names.append(o.name)
            if o.parameters.get("binary_data", binary_all) is True:
                binary_outputs.add(o.name)
            k = o.parameters.get("classification")
            if k is not None:
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise InputError(f"output {o.name!r}: classification must be an integer >= 1")
                classification[o.name] = k
    return InferRequest(
        feeds,
        names,
        req.id,
        req.parameters,
        classification,
        frozenset(binary_outputs) if req.outputs else binary_all,
    )


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
    binary_outputs: frozenset[str] | bool = False,
) -> tuple[bytes, int | None]:
    """The v2 infer response: (body, JSON header length when binary data follows, else None)."""
    tensors = []
    raw: list[bytes] = []
    for name, arr in outputs.items():
        k = classification.get(name) if classification else None
        if k is not None:
            data = _classify(arr, k, labels)
            rows = arr.shape[0] if arr.ndim > 1 else 1
            shape = [rows, min(k, arr.size // rows)]
            tensors.append({"name": name, "datatype": "BYTES", "shape": shape, "data": data})
            continue
        dtype = arr.dtype
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": _V2_BY_DTYPE.get(dtype) or V2_DATATYPES.get(dtype.name, "BYTES"),
            "shape": list(arr.shape),
        }
        if binary_outputs is True or (binary_outputs and name in binary_outputs):
            if _LITTLE and dtype.byteorder != ">":
                chunk = arr.tobytes()  # C order, already little-endian
            else:
                chunk = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            raw.append(chunk)
        else:
            tensor["data"] = arr.ravel().tolist()
        tensors.append(tensor)
    head = _encoder.encode(
        {
            "model_name": model_name,
            "model_version": model_version,
            "id": request_id,
            "outputs": tensors,
        }
    )
    if not raw:
        return head, None
    return head + b"".join(raw), len(head)


def infer(
    slot: ModelSlot, body: bytes, header_length: int | None = None, later: Later | None = None
) -> tuple[bytes, int | None]:
    """Decode a v2 request for ``slot``, run it, encode the response (HTTP and MQTT share this).

    ``later``: see :meth:`ModelSlot.predict`."""
    if not slot.ready:  # 503 before 400: a caller retrying a bad body learns the model is down
        raise NotReadyError(f"model {slot.name!r} is not loaded")
    req = decode_infer_request(body, header_length)
    outputs, model, rid = slot.predict(req.feeds, req.output_names, req.request_id, later)
    return encode_infer_response(
        slot.name,
        model.version,
        rid,
        outputs,
        req.classification,
        slot.config.labels,
        req.binary_outputs,
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
