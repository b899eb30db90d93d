"""Write TFLite models without TensorFlow, from the flatc-generated schema bindings.

The `tflite` package (PyPI) carries the TFLite schema as flatbuffers builder functions; this module
assembles one-subgraph models from them: tensors (constant or not, optionally quantized, with
``-1`` for dynamic dimensions) and builtin operators with their options. ``make_demo.py`` calls
:func:`write_tflite_classifier` for the TFLite twin of the ONNX demo model, and the tests build
their TFLite models with :class:`TfliteGraph`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import flatbuffers
import numpy as np
import tflite

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
BUFFER_ALIGNMENT = 16  # what the TFLite converter uses, so kernels may read constants in place


class TfliteGraph:
    """A TFLite model with one subgraph, built tensor by tensor and operator by operator."""

    def __init__(self) -> None:
        # (name, numpy dtype name, shape with -1 for dynamic, buffer index, scale, zero point)
        self._tensors: list[tuple[str, str, tuple[int, ...], int, float | None, int | None]] = []
        self._buffers: list[bytes] = [b""]  # buffer 0 is the schema's empty sentinel
        self._opcodes: list[tuple[str, str | None]] = []
        self._ops: list[tuple[int, list[int], list[int], str, dict[str, object]]] = []

    def tensor(
        self,
        name: str,
        dtype: str,
        shape: Sequence[int],
        data: np.ndarray | None = None,
        scale: float | None = None,
        zero_point: int | None = None,
    ) -> int:
        """Add a tensor (constant when ``data`` is given); returns its index."""
        buffer = 0
        if data is not None:
            self._buffers.append(np.asarray(data, np.dtype(dtype).newbyteorder("<")).tobytes())
            buffer = len(self._buffers) - 1
        self._tensors.append((name, dtype, tuple(shape), buffer, scale, zero_point))
        return len(self._tensors) - 1

    def op(
        self,
        kind: str,
        inputs: Sequence[int],
        outputs: Sequence[int],
        custom_code: str | None = None,
        **options: object,
    ) -> None:
        """Add a builtin operator (``"FULLY_CONNECTED"``) or ``"CUSTOM"`` with ``custom_code``.

        ``options`` are the fields of the operator's options table in snake case, e.g.
        ``fused_activation_function="RELU"`` or ``beta=1.0``; ``-1`` in ``inputs`` is an absent
        optional input.
        """
        code = (kind, custom_code)
        if code not in self._opcodes:
            self._opcodes.append(code)
        self._ops.append((self._opcodes.index(code), list(inputs), list(outputs), kind, options))

    def to_bytes(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """Serialise with ``inputs``/``outputs`` (tensor indices) as the subgraph's signature."""
        b = flatbuffers.Builder(1024)
        buffers = [self._buffer(b, data) for data in self._buffers]
        tensors = [self._tensor(b, *t) for t in self._tensors]
        ops = [self._operator(b, *o) for o in self._ops]
        opcodes = [self._opcode(b, kind, custom) for kind, custom in self._opcodes]

        name = b.CreateString("main")
        tensor_vec = _offsets(b, tflite.SubGraphStartTensorsVector, tensors)
        op_vec = _offsets(b, tflite.SubGraphStartOperatorsVector, ops)
        in_vec = b.CreateNumpyVector(np.array(inputs, dtype=np.int32))
        out_vec = b.CreateNumpyVector(np.array(outputs, dtype=np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensor_vec)
        tflite.SubGraphAddInputs(b, in_vec)
        tflite.SubGraphAddOutputs(b, out_vec)
        tflite.SubGraphAddOperators(b, op_vec)
        tflite.SubGraphAddName(b, name)
        subgraph = tflite.SubGraphEnd(b)

        description = b.CreateString("written by inferd examples/models/make_tflite.py")
        opcode_vec = _offsets(b, tflite.ModelStartOperatorCodesVector, opcodes)
        subgraph_vec = _offsets(b, tflite.ModelStartSubgraphsVector, [subgraph])
        buffer_vec = _offsets(b, tflite.ModelStartBuffersVector, buffers)
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, SCHEMA_VERSION)
        tflite.ModelAddOperatorCodes(b, opcode_vec)
        tflite.ModelAddSubgraphs(b, subgraph_vec)
        tflite.ModelAddDescription(b, description)
        tflite.ModelAddBuffers(b, buffer_vec)
        b.Finish(tflite.ModelEnd(b), file_identifier=FILE_IDENTIFIER)
        return bytes(b.Output())

    def save(self, path: str | Path, inputs: Sequence[int], outputs: Sequence[int]) -> Path:
        """Write the model to ``path``; returns the path."""
        p = Path(path)
        p.write_bytes(self.to_bytes(inputs, outputs))
        return p

    @staticmethod
    def _buffer(b: flatbuffers.Builder, data: bytes) -> int:
        vec = None
        if data:
            b.StartVector(1, len(data), BUFFER_ALIGNMENT)
            b.head -= len(data)
            b.Bytes[b.head : b.head + len(data)] = data
            vec = b.EndVector()
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        return int(tflite.BufferEnd(b))

    @staticmethod
    def _tensor(
        b: flatbuffers.Builder,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        buffer: int,
        scale: float | None,
        zero_point: int | None,
    ) -> int:
        name_off = b.CreateString(name)
        # the schema's convention: `shape` holds 1 where `shape_signature` has -1 (dynamic)
        shape_vec = b.CreateNumpyVector(np.array([max(d, 1) for d in shape], dtype=np.int32))
        signature_vec = None
        if any(d < 0 for d in shape):
            signature_vec = b.CreateNumpyVector(np.array(shape, dtype=np.int32))
        quant = None
        if scale is not None:
            scale_vec = b.CreateNumpyVector(np.array([scale], dtype=np.float32))
            zp_vec = b.CreateNumpyVector(np.array([zero_point or 0], dtype=np.int64))
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale_vec)
            tflite.QuantizationParametersAddZeroPoint(b, zp_vec)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_vec)
        if signature_vec is not None:
            tflite.TensorAddShapeSignature(b, signature_vec)
        tflite.TensorAddType(b, getattr(tflite.TensorType, dtype.upper()))
        tflite.TensorAddBuffer(b, buffer)
        tflite.TensorAddName(b, name_off)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        return int(tflite.TensorEnd(b))

    @staticmethod
    def _operator(
        b: flatbuffers.Builder,
        opcode_index: int,
        inputs: list[int],
        outputs: list[int],
        kind: str,
        options: dict[str, object],
    ) -> int:
        # the options table of FULLY_CONNECTED is FullyConnectedOptions, of ADD AddOptions, ...
        table = _camel(kind.lower()) + "Options"
        options_type = getattr(tflite.BuiltinOptions, table, None)
        opts = None
        if options_type is not None:
            getattr(tflite, f"{table}Start")(b)
            for field, value in options.items():
                setter = getattr(tflite, f"{table}Add{_camel(field)}")
                if isinstance(value, str):  # an enum member such as an activation's name
                    setter(b, getattr(tflite.ActivationFunctionType, value))
                else:
                    setter(b, value)
            opts = getattr(tflite, f"{table}End")(b)
        elif options:
            raise ValueError(f"{kind} takes no options, got {', '.join(options)}")
        in_vec = b.CreateNumpyVector(np.array(inputs, dtype=np.int32))
        out_vec = b.CreateNumpyVector(np.array(outputs, dtype=np.int32))
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, opcode_index)
        tflite.OperatorAddInputs(b, in_vec)
        tflite.OperatorAddOutputs(b, out_vec)
        if opts is not None:
            tflite.OperatorAddBuiltinOptionsType(b, options_type)
            tflite.OperatorAddBuiltinOptions(b, opts)
        return int(tflite.OperatorEnd(b))

    @staticmethod
    def _opcode(b: flatbuffers.Builder, kind: str, custom_code: str | None) -> int:
        code = getattr(tflite.BuiltinOperator, kind)
        custom = b.CreateString(custom_code) if custom_code is not None else None
        tflite.OperatorCodeStart(b)
        # readers take max(builtin_code, deprecated_builtin_code); the old field is int8
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        if custom is not None:
            tflite.OperatorCodeAddCustomCode(b, custom)
        return int(tflite.OperatorCodeEnd(b))


def _offsets(b: flatbuffers.Builder, start: object, offsets: list[int]) -> int:
    """A vector of table offsets (the builder wants them prepended in reverse)."""
    start(b, len(offsets))  # type: ignore[operator]
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


def write_tflite_classifier(
    path: str | Path, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> Path:
    """softmax(relu(x @ w1 + b1) @ w2 + b2) as TFLite: input ``x`` [-1, in], output ``probs``.

    The weights are given as for ``x @ w`` ([in, out], the ONNX MatMul layout); TFLite's
    FULLY_CONNECTED wants [out, in], so they are transposed here.
    """
    n_in, n_hidden = w1.shape
    n_out = w2.shape[1]
    g = TfliteGraph()
    x = g.tensor("x", "float32", (-1, n_in))
    fc1_w = g.tensor("W1", "float32", (n_hidden, n_in), np.asarray(w1, np.float32).T)
    fc1_b = g.tensor("b1", "float32", (n_hidden,), np.asarray(b1, np.float32))
    h = g.tensor("h", "float32", (-1, n_hidden))
    fc2_w = g.tensor("W2", "float32", (n_out, n_hidden), np.asarray(w2, np.float32).T)
    fc2_b = g.tensor("b2", "float32", (n_out,), np.asarray(b2, np.float32))
    logits = g.tensor("logits", "float32", (-1, n_out))
    probs = g.tensor("probs", "float32", (-1, n_out))
    g.op("FULLY_CONNECTED", [x, fc1_w, fc1_b], [h], fused_activation_function="RELU")
    g.op("FULLY_CONNECTED", [h, fc2_w, fc2_b], [logits], fused_activation_function="NONE")
    g.op("SOFTMAX", [logits], [probs], beta=1.0)
    return g.save(path, [x], [probs])
