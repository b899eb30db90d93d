"""The runtime backend contract: load a model file, describe its tensors, run it.

The base class owns what every backend shares: timing each run with a monotonic clock, counting
runs and errors, wrapping foreign exceptions into :class:`BackendError`, and warm-up. Subclasses
only call their runtime.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import BackendError, InferdError, InputError, ModelLoadError
from runtime.options import RuntimeOptions
from runtime.tensors import V2_DATATYPES

Dim = int | None
Observer = Callable[[int, bool], None]
"""Called after every run with (latency in ns, succeeded)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name, shape (``None`` for a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    scale: float | None = None
    zero_point: int | None = None

    def to_json(self) -> dict[str, object]:
        """The OIP v2 metadata form (``-1`` for dynamic dimensions)."""
        out: dict[str, object] = {
            "name": self.name,
            "datatype": V2_DATATYPES[self.dtype],
            "shape": [-1 if d is None else d for d in self.shape],
        }
        if self.scale is not None:
            out["parameters"] = {"scale": self.scale, "zero_point": self.zero_point}
        return out

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a concrete shape fits this spec (rank and every fixed dimension)."""
        if len(shape) != len(self.shape):
            return False
        return all(d is None or d == s for d, s in zip(self.shape, shape, strict=True))


@dataclass
class RunStats:
    """Counters kept by every backend; read without a lock, written under one."""

    runs: int = 0
    errors: int = 0
    total_ns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Backend(ABC):
    """A loaded model in one runtime. Create with :meth:`open`; thread-safe ``run``."""

    runtime: str = ""
    extra: str = ""
    """The pip extra that installs this runtime, named in BackendUnavailableError."""

    def __init__(self, path: Path, options: RuntimeOptions, cache_dir: Path | None) -> None:
        self.path = path
        self.options = options
        self.cache_dir = cache_dir
        self.stats = RunStats()
        self.observer: Observer | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.providers: tuple[str, ...] = ()
        # thread id -> perf_counter_ns when its run began; the watchdog's wedged-backend check
        self._running: dict[int, int] = {}

    @classmethod
    def open(
        cls, path: str | Path, options: RuntimeOptions, cache_dir: Path | None = None
    ) -> Backend:
        """Load ``path`` with ``options`` and warm it up; raises ModelLoadError with one line."""
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"{p}: model file not found")
        backend = cls(p, options, cache_dir)
        backend._load()
        backend.warm_up(options.warmup_runs)
        return backend

    @abstractmethod
    def _load(self) -> None:
        """Load the model and fill ``inputs``, ``outputs`` and ``providers``."""

    @abstractmethod
    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        """Run the runtime once; foreign exceptions may escape, the caller wraps them."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once, timed and counted; any runtime failure becomes BackendError."""
        start = time.perf_counter_ns()
        me = threading.get_ident()
        self._running[me] = start
        ok = False
        try:
            out = self._run(feeds, output_names)
            ok = True
            return out
        except InferdError:
            raise
        except Exception as err:
            raise BackendError(f"{self.runtime} run failed: {one_line(err)}") from err
        finally:
            elapsed = time.perf_counter_ns() - start
            del self._running[me]
            stats = self.stats
            with stats.lock:
                stats.runs += 1
                stats.total_ns += elapsed
                if not ok:
                    stats.errors += 1
            if self.observer is not None:
                self.observer(elapsed, ok)

    def oldest_run_start_ns(self) -> int | None:
        """``perf_counter_ns`` at the start of the longest run still going; None when idle."""
        return min(self._running.copy().values(), default=None)  # copy: atomic under the GIL

    def example_feeds(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Zero-valued feeds matching the inputs, dynamic dimensions set to ``batch``/1."""
        feeds = {}
        for spec in self.inputs:
            shape = tuple(
                (batch if j == 0 else 1) if d is None else d for j, d in enumerate(spec.shape)
            )
            feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
        return feeds

    def warm_up(self, runs: int) -> None:
        """Run zero inputs ``runs`` times so first requests do not pay for lazy initialisation."""
        if runs <= 0:
            return
        feeds = self.example_feeds()
        try:
            for _ in range(runs):
                self._run(feeds, None)
        except Exception as err:
            raise ModelLoadError(f"{self.path}: warm-up failed: {one_line(err)}") from err

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputError unless ``feeds`` names every input with a fitting shape and dtype."""
        expected = {s.name: s for s in self.inputs}
        for name in feeds:
            if name not in expected:
                raise InputError(
                    f"unknown input {name!r}; the model takes {', '.join(sorted(expected))}"
                )
        for name, spec in expected.items():
            if name not in feeds:
                raise InputError(f"missing input {name!r}")
            arr = feeds[name]
            if arr.dtype.name != spec.dtype:
                got = V2_DATATYPES.get(arr.dtype.name, arr.dtype.name)
                want = V2_DATATYPES[spec.dtype]
                raise InputError(f"input {name!r} has datatype {got}, the model expects {want}")
            if not spec.accepts(arr.shape):
                dims = [-1 if d is None else d for d in spec.shape]
                raise InputError(
                    f"input {name!r} has shape {list(arr.shape)}, the model expects {dims}"
                )

    def signature(self) -> dict[str, list[dict[str, object]]]:
        """Inputs and outputs in the OIP v2 metadata form."""
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (runtimes print multi-line dumps)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
