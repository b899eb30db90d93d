"""Input and output drift against reference statistics shipped with the model; no labels needed.

Reference statistics hold, per tensor and per feature (a column of a ``[N, F]`` tensor, a
channel of an image), the quantile bin edges of the training data, the share of values in each
bin, and mean and standard deviation. They travel in the model's update metadata (or in a
``<model>.ref.json`` file next to the initial model) and are made by :func:`compute_reference`.

On the device, :class:`DriftTracker` bins what the model sees in tumbling windows of
``window`` samples and reports per feature the population stability index (PSI), the mean
shift in reference standard deviations and the ratio of standard deviations. By the usual
rule of thumb a PSI under 0.1 is stable, 0.1-0.2 a moderate shift and above 0.2 a real one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np

from runtime.errors import TelemetryError
from telemetry.payloads import DriftQuality, FeatureDrift

REFERENCE_SCHEMA_VERSION = 1
PSI_FLOOR = 1e-4
"""Bin shares are floored here before the log, so an empty bin gives a large finite PSI."""
MAX_FEATURES = 64
"""Tensors with more features than this (audio samples, embeddings) are pooled into one."""


class DriftError(TelemetryError):
    """Reference statistics are missing, malformed or do not fit the model's tensors."""


class FeatureReference(msgspec.Struct, frozen=True, kw_only=True):
    """Reference distribution of one feature: inner bin edges, bin shares, mean and std."""

    edges: list[float]
    """Inner edges, ascending; bin ``i`` holds values in ``[edges[i-1], edges[i])``."""
    shares: list[float]
    """``len(edges) + 1`` shares summing to 1."""
    mean: float
    std: float


class TensorReference(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    axis: int | None
    """The feature axis of the tensor (batch axis 0 included), or None when pooled."""
    features: list[FeatureReference]


class ReferenceStats(msgspec.Struct, frozen=True, kw_only=True):
    """Reference statistics for some of a model's input and output tensors."""

    schema_version: int = REFERENCE_SCHEMA_VERSION
    samples: int
    tensors: list[TensorReference]

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)


def load_reference(data: bytes | str | Path | Mapping[str, object]) -> ReferenceStats:
    """Read reference statistics from JSON bytes, a file path, or an already-decoded mapping."""
    try:
        if isinstance(data, Path | str):
            path = Path(data)
            try:
                data = path.read_bytes()
            except OSError as err:
                raise DriftError(f"{path}: cannot read reference stats: {err.strerror}") from err
        if isinstance(data, bytes):
            return msgspec.json.decode(data, type=ReferenceStats)
        return msgspec.convert(data, ReferenceStats)
    except msgspec.ValidationError as err:
        raise DriftError(f"reference stats: {err}") from err
    except msgspec.DecodeError as err:
        raise DriftError(f"reference stats: invalid JSON: {err}") from err


def feature_axis(shape: tuple[int, ...]) -> int | None:
    """Where a tensor's features are: columns of ``[N, F]``, channels of ``[N, C, H, W]`` or
    ``[N, H, W, C]`` (whichever side has at most 4), pooled when there would be too many."""
    rank = len(shape)
    if rank <= 1:
        return None
    axis = rank - 1 if rank > 2 and shape[1] > 4 and shape[-1] <= 4 else 1
    return axis if shape[axis] <= MAX_FEATURES else None


def _columns(array: np.ndarray, axis: int | None) -> np.ndarray:
    """``[values, features]`` float64 view of a batch: the feature axis last, the rest flattened."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise DriftError(f"cannot track drift of a {a.dtype} tensor")
    a = a.astype(np.float64, copy=False)
    if axis is None:
        return a.reshape(-1, 1)
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def compute_reference(
    tensors: Mapping[str, np.ndarray], bins: int = 10, axes: Mapping[str, int | None] | None = None
) -> ReferenceStats:
    """Reference statistics of a dataset: ``{tensor name: [N, ...] array}`` with quantile bins.

    Use the training or validation inputs (and, for output drift, the model's outputs on them).
    The feature axis of each tensor is guessed by :func:`feature_axis` unless ``axes`` names it.
    """
    if bins < 2:
        raise DriftError("bins must be >= 2")
    refs = []
    samples = 0
    for name, array in tensors.items():
        a = np.asarray(array)
        if a.ndim == 0 or a.shape[0] == 0:
            raise DriftError(f"tensor {name!r}: need a batch of at least one sample")
        samples = max(samples, a.shape[0])
        axis = axes[name] if axes is not None and name in axes else feature_axis(a.shape)
        cols = _columns(a, axis)
        features = []
        for j in range(cols.shape[1]):
            x = cols[:, j]
            quantiles = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])
            edges = np.unique(quantiles)  # discrete features give repeated quantiles
            counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
            features.append(
                FeatureReference(
                    edges=edges.tolist(),
                    shares=(counts / x.size).tolist(),
                    mean=float(x.mean()),
                    std=float(x.std()),
                )
            )
        refs.append(TensorReference(name=name, axis=axis, features=features))
    return ReferenceStats(samples=samples, tensors=refs)


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """Population stability index between two vectors of bin shares."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class _Accumulator:
    ref: TensorReference
    edges: list[np.ndarray]
    counts: np.ndarray
    total: np.ndarray = field(init=False)
    squares: np.ndarray = field(init=False)
    n: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts[:] = 0
        self.total = np.zeros(len(self.edges))
        self.squares = np.zeros(len(self.edges))
        self.n = 0

    def add(self, array: np.ndarray) -> None:
        cols = _columns(array, self.ref.axis)
        if cols.shape[1] != len(self.edges):
            raise DriftError(
                f"tensor {self.ref.name!r} has {cols.shape[1]} features, "
                f"the reference has {len(self.edges)}"
            )
        for j, edges in enumerate(self.edges):
            idx = np.searchsorted(edges, cols[:, j], side="right")
            self.counts[j, : edges.size + 1] += np.bincount(idx, minlength=edges.size + 1)
        self.total += cols.sum(axis=0)
        self.squares += np.square(cols).sum(axis=0)
        self.n += cols.shape[0]


class DriftTracker:
    """Bins a model's tensors against its reference in tumbling windows of ``window`` samples.

    Not thread-safe: the owner serialises calls.
    """

    def __init__(self, reference: ReferenceStats, window: int, threshold: float) -> None:
        if window < 1:
            raise DriftError("drift window must be >= 1 sample")
        self.reference = reference
        self.window = window
        self.threshold = threshold
        self.samples = 0
        self.last: DriftQuality | None = None
        self._acc: dict[str, _Accumulator] = {}
        for ref in reference.tensors:
            edges = [np.asarray(f.edges, dtype=np.float64) for f in ref.features]
            width = max((e.size + 1 for e in edges), default=1)
            for f, e in zip(ref.features, edges, strict=True):
                if len(f.shares) != e.size + 1:
                    raise DriftError(f"reference for {ref.name!r}: shares do not match edges")
            counts = np.zeros((len(edges), width), dtype=np.int64)
            self._acc[ref.name] = _Accumulator(ref, edges, counts)

    @property
    def tensors(self) -> frozenset[str]:
        return frozenset(self._acc)

    def observe(self, tensors: Mapping[str, np.ndarray]) -> DriftQuality | None:
        """Add one request's tensors (batch axis first); returns a report when a window closes."""
        batch = 0
        for name, acc in self._acc.items():
            array = tensors.get(name)
            if array is None:
                continue
            acc.add(array)
            batch = max(batch, int(np.shape(array)[0]) if np.ndim(array) else 1)
        self.samples += batch
        if self.samples < self.window:
            return None
        report = self.report()
        for acc in self._acc.values():
            acc.reset()
        self.samples = 0
        self.last = report
        return report

    def report(self, top: int = 10) -> DriftQuality:
        """Drift of the samples seen in the current window, the ``top`` worst features first."""
        features = []
        for acc in self._acc.values():
            if acc.n == 0:
                continue
            mean = acc.total / acc.n
            std = np.sqrt(np.maximum(acc.squares / acc.n - np.square(mean), 0.0))
            for j, ref in enumerate(acc.ref.features):
                bins = len(ref.shares)
                actual = acc.counts[j, :bins] / acc.n
                scale = ref.std if ref.std > 0 else 1.0
                features.append(
                    FeatureDrift(
                        tensor=acc.ref.name,
                        index=j,
                        psi=psi(ref.shares, actual),
                        mean_shift=float((mean[j] - ref.mean) / scale),
                        std_ratio=float(std[j] / scale),
                    )
                )
        features.sort(key=lambda f: f.psi, reverse=True)
        worst = features[0].psi if features else 0.0
        return DriftQuality(
            samples=self.samples,
            psi_max=worst,
            threshold=self.threshold,
            drifted=worst > self.threshold,
            features=features[:top],
        )
