"""The model bundle: a model file and the files that travel with it, named and formatted once.

A bundle is a model file plus, optionally, golden inputs with their expected outputs and the
reference statistics drift is measured against. A model named in the config and a version an
update staged follow these names::

    demo.onnx           the model                    <slot>/<seq>-<version>/demo.onnx
    demo.golden.npz     golden inputs and outputs    <slot>/<seq>-<version>/golden.npz
    demo.ref.json       drift reference statistics   <slot>/<seq>-<version>/reference.json

The golden file has one format, written by :func:`golden_bytes` (``inferctl model add``
publishes it, the device's validation gate checks a candidate against it): an npz holding
``in.<input>`` and ``out.<output>`` arrays. :func:`read_golden` also reads the operator's
plain form, arrays named like the model's inputs and outputs (``--golden in.npz``,
``examples/models/demo.golden.npz``), which needs the model's tensor names to tell the two
apart. The reference statistics' content is the drift monitor's
(:mod:`telemetry.quality.drift`); this module only says where they are.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import BundleError

GOLDEN_SUFFIX = ".golden.npz"
"""Beside a configured model: ``demo.onnx`` -> ``demo.golden.npz``."""
REFERENCE_SUFFIX = ".ref.json"
"""Beside a configured model: ``demo.onnx`` -> ``demo.ref.json``."""
GOLDEN_FILE = "golden.npz"
"""In a staged version's folder, next to the model file."""
REFERENCE_FILE = "reference.json"
"""In a staged version's folder, next to the model file."""
IN_PREFIX = "in."
OUT_PREFIX = "out."


@dataclass(frozen=True)
class Golden:
    """Golden inputs and the outputs the model is expected to give on them, by tensor name."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] = field(default_factory=dict)


def golden_path(model_path: Path) -> Path | None:
    """The golden file that travels with ``model_path``, if there is one."""
    return _beside(model_path, GOLDEN_SUFFIX, GOLDEN_FILE)


def reference_path(model_path: Path) -> Path | None:
    """The drift reference statistics that travel with ``model_path``, if there are any."""
    return _beside(model_path, REFERENCE_SUFFIX, REFERENCE_FILE)


def _beside(model_path: Path, suffix: str, staged_name: str) -> Path | None:
    for candidate in (model_path.with_suffix(suffix), model_path.parent / staged_name):
        if candidate.is_file():
            return candidate
    return None


def load_npz(source: bytes | Path) -> dict[str, np.ndarray]:
    """Every array of an npz file or its bytes (pickles refused); BundleError when unreadable."""
    where = "npz data" if isinstance(source, bytes) else str(source)
    try:
        with np.load(
            io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False
        ) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise BundleError(f"{where}: not a readable .npz file: {err}") from err


def read_golden(
    source: bytes | Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] = (),
) -> Golden:
    """The golden inputs and expected outputs in ``source`` (either form, see the module doc).

    With ``input_names``, every input must be there (BundleError naming those missing); the
    plain form needs them to be read at all.
    """
    arrays = load_npz(source)
    where = "golden data" if isinstance(source, bytes) else str(source)
    if any(k.startswith((IN_PREFIX, OUT_PREFIX)) for k in arrays):
        golden = Golden(
            {k[len(IN_PREFIX) :]: v for k, v in arrays.items() if k.startswith(IN_PREFIX)},
            {k[len(OUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(OUT_PREFIX)},
        )
    elif input_names is not None:
        inputs = {n: arrays[n] for n in input_names if n in arrays}
        expected = {n: arrays[n] for n in output_names if n in arrays and n not in inputs}
        golden = Golden(inputs, expected)
    else:
        raise BundleError(f"{where}: no in.<input> arrays (arrays: {', '.join(sorted(arrays))})")
    if input_names is not None:
        missing = [n for n in input_names if n not in golden.inputs]
        if missing:
            raise BundleError(f"{where}: no array for input(s) {', '.join(missing)}")
    return golden


def read_inputs(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Model inputs from an npz (warm-up or timing inputs): arrays named like the inputs, or
    ``in.<input>``; BundleError naming the inputs it lacks."""
    return read_golden(path, input_names).inputs


def golden_bytes(golden: Golden) -> bytes:
    """``golden`` in the one published format: ``in.<input>`` and ``out.<output>`` arrays."""
    arrays: Mapping[str, np.ndarray] = {
        **{f"{IN_PREFIX}{k}": v for k, v in golden.inputs.items()},
        **{f"{OUT_PREFIX}{k}": v for k, v in golden.expected.items()},
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()
