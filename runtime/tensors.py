"""The tensor and signature vocabulary both sides speak: KServe v2 datatypes and signatures.

Signatures use the KServe v2 metadata form (``{"name", "datatype", "shape"}`` with ``-1`` for a
dynamic dimension): the backends report it, the operator signs it into a model's metadata, and
the device's validation gate compares the two directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

# numpy dtype name -> KServe v2 datatype: the vocabulary of signatures, shared with the backends
V2_DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "str": "BYTES",
}
NUMPY_DTYPES: dict[str, str] = {v: k for k, v in V2_DATATYPES.items()}


class TensorMeta(msgspec.Struct, frozen=True):
    """One input or output in the v2 metadata form."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Signature(msgspec.Struct, frozen=True):
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        """From the ``{"inputs": [...], "outputs": [...]}`` dict a backend reports."""
        return msgspec.convert(
            {"inputs": list(data["inputs"]), "outputs": list(data["outputs"])}, cls, strict=False
        )
