"""The v2 JSON decoder's fast path (flat lists packed by struct) against numpy's coercion: the
same values bit for bit, and whatever struct refuses still gets numpy's verdict and message."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.api.v2 import decode_infer_request
from runtime.errors import InputError
from runtime.tensors import NUMPY_DTYPES


def _decode(datatype: str, data: object, shape: list[int] | None = None) -> np.ndarray:
    n = len(data) if isinstance(data, list) else 1
    body = {
        "inputs": [
            {
                "name": "x",
                "shape": [n] if shape is None else shape,
                "datatype": datatype,
                "data": data,
            }
        ]
    }
    return decode_infer_request(json.dumps(body).encode()).feeds["x"]


def test_float32_values_round_as_numpy_rounds_them() -> None:
    rng = np.random.default_rng(7)
    for scale in (1e-42, 1e-30, 1.0, 1e30, 1e38):
        values = [*(rng.normal(size=2000) * scale).tolist(), 0.0, -0.0, 0.1, 1, True]
        values = [v for v in values if abs(v) < 3.4e38]
        got = _decode("FP32", values)
        want = np.asarray(values, dtype=np.float32)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("FP64", [0.1, -2.5e300, 7, 5e-324]),
        ("INT8", [-128, 127, 0]),
        ("UINT8", [0, 255, True]),
        ("INT16", [-32768, 32767]),
        ("UINT16", [65535]),
        ("INT32", [-(2**31), 2**31 - 1, 16000]),
        ("UINT32", [2**32 - 1]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("UINT64", [2**64 - 1, 0]),
    ],
)
def test_every_packed_datatype_equals_numpy(datatype: str, values: list[object]) -> None:
    got = _decode(datatype, values)
    want = np.asarray(values, dtype=NUMPY_DTYPES[datatype])
    assert got.dtype == want.dtype and np.array_equal(got, want)
    got[0] = got[0]  # writable, as numpy's own arrays are


def test_a_zero_dimensional_int64_is_a_scalar() -> None:
    got = _decode("INT64", [16000], shape=[])
    assert got.shape == () and got.dtype == np.int64 and int(got) == 16000


def test_nested_data_still_takes_numpys_way() -> None:
    got = _decode("FP32", [[1.0, 2.0], [3.0, 4.0]], shape=[2, 2])
    assert np.array_equal(got, np.array([[1, 2], [3, 4]], dtype=np.float32))


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT32", [2**31], "data is not INT32"),
        ("UINT8", [-1], "data is not UINT8"),
        ("INT64", [2**63], "data is not INT64"),
        ("FP32", ["nan"], "NaN or infinite"),
        ("FP32", [1e39], "NaN or infinite"),  # beyond float32: struct refuses, numpy says inf
        ("FP32", [1.0, "x"], "data is not FP32"),
        ("FP32", [1.0, 2.0, 3.0], "3 values do not fill shape [2]"),
    ],
)
def test_refusals_keep_their_messages(datatype: str, data: list[object], message: str) -> None:
    shape = [2] if message.startswith("3 values") else None
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _decode(datatype, data, shape=shape)


def _decode_binary(datatype: str, raw: bytes, shape: list[int]) -> np.ndarray:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": shape,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return decode_infer_request(head + raw, len(head)).feeds["x"]


@pytest.mark.parametrize("datatype", sorted(d for d, n in NUMPY_DTYPES.items() if n != "str"))
def test_binary_tensors_are_writable_copies_in_numpys_own_dtype(datatype: str) -> None:
    want = np.arange(6).astype(NUMPY_DTYPES[datatype]).reshape(2, 3)
    raw = want.astype(want.dtype.newbyteorder("<")).tobytes()
    got = _decode_binary(datatype, raw, [2, 3])
    assert np.array_equal(got, want)
    # the object numpy itself uses: the backend's dtype check passes on identity
    assert got.dtype is np.dtype(NUMPY_DTYPES[datatype])
    assert got.flags.owndata and got.flags.writeable  # kept arrays do not pin the body


@pytest.mark.parametrize("binary", [False, True])
def test_a_shape_no_array_can_have_is_refused(binary: bool) -> None:
    shape = [0, 2**62]  # zero values, but numpy refuses the dimension
    with pytest.raises(InputError, match="is beyond what an array can have"):
        _decode_binary("FP32", b"", shape) if binary else _decode("FP32", [], shape=shape)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "\xba", "inputs": []}',
        b'{"inputs": [{"name": "\xff\xfe", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    ],
)
def test_invalid_utf8_is_malformed_json_not_a_crash(body: bytes) -> None:
    """msgspec before 0.23 raised UnicodeDecodeError here (a 500 from the fuzz test under
    ``make check-oldest``); the bound in pyproject.toml keeps it a DecodeError, so a 400."""
    with pytest.raises(InputError, match="Invalid UTF-8"):
        decode_infer_request(body)
