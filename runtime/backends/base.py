"""The runtime backend contract: load a model file, describe its tensors, run it.

The base class owns what every backend shares: checking a request's feeds and output names,
timing each run with a monotonic clock, counting runs and errors, wrapping foreign exceptions
into :class:`BackendError`, and warm-up. Subclasses only call their runtime.

Each of those happens once per request, here: the HTTP and MQTT decoders and the model slot
leave checking and timing to :meth:`Backend.run_timed` (on the demo model the request path
measured 25 us over a 7.8 us ``session.run`` while it checked and timed everything twice).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import bundle
from runtime.errors import BackendError, BundleError, InferdError, InputError, ModelLoadError
from runtime.options import RuntimeOptions
from runtime.tensors import V2_DATATYPES

log = logging.getLogger(__name__)

Dim = int | None
Feeds = Mapping[str, np.ndarray]
Observer = Callable[[int, bool], None]
"""Called after every run with (latency in ns, succeeded)."""

WARMUP_DIM_CAP = 4096
"""The largest size the warm-up search gives a dynamic dimension (1, 2, 4, ... up to this)."""
WARMUP_MAX_ELEMENTS = 1 << 22
"""A searched warm-up input never holds more elements than this (16 MB of float32)."""

try:  # glibc only (musl and other libcs have no malloc_trim: there the heap keeps its pages)
    _malloc_trim: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
except AttributeError:
    _malloc_trim = None


def return_freed_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``).

    Loading a model frees as much as it keeps (the runtime parses the file, copies the weights
    out and drops the parse); glibc keeps those freed pages mapped wherever they are not at the
    top of the heap. Trimmed after each load, a 4 MB model costs the daemon 4.1 MB of RSS
    instead of 8-9.3 MB. It takes well under a millisecond (0.3 ms beside four 32 MB models).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name, shape (``None`` for a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    scale: float | None = None
    zero_point: int | None = None
    dim_names: tuple[str | None, ...] = ()
    """The runtime's symbolic name of each dynamic dimension (``"batch"``), where it has one:
    dimensions that share a name must have the same size, which the warm-up search respects."""

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


@dataclass(frozen=True, slots=True)
class _InputCheck:
    """What a request's array must match, prepared once at load so a check is a few compares."""

    spec: TensorSpec
    dtype: np.dtype[np.generic]
    rank: int
    fixed: tuple[tuple[int, int], ...]
    """(axis, size) of every fixed dimension."""


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
        self.warmup_source: str | None = None
        """What the model warmed up on: golden inputs, warmup_inputs, warmup_shapes, search
        (None when it did not warm up); :meth:`warmup_feeds` gives those inputs again."""
        self._warmup_zeros: dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]] = {}
        self.warmup_error: str | None = None
        """Why warm-up failed (one line); the model is loaded and serves regardless."""
        self._checks: dict[str, _InputCheck] = {}
        self._output_names: frozenset[str] = frozenset()
        # thread id -> perf_counter_ns when its run began; the watchdog's wedged-backend check
        self._running: dict[int, int] = {}

    @classmethod
    def open(
        cls, path: str | Path, options: RuntimeOptions, cache_dir: Path | None = None
    ) -> Backend:
        """Load ``path`` with ``options`` and warm it up; raises ModelLoadError with one line.

        A warm-up that fails is logged as a warning and kept in :attr:`warmup_error`; the
        model is loaded and serves (its first requests pay for lazy initialisation).
        """
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"{p}: model file not found")
        backend = cls(p, options, cache_dir)
        backend._load()
        backend._prepare_checks()
        backend.warm_up(options.warmup_runs)
        return_freed_heap()
        return backend

    @abstractmethod
    def _load(self) -> None:
        """Load the model and fill ``inputs``, ``outputs`` and ``providers``."""

    @abstractmethod
    def _run(self, feeds: Feeds, output_names: Sequence[str] | None) -> dict[str, np.ndarray]:
        """Run the runtime once on checked feeds; foreign exceptions may escape (wrapped here)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's resources."""

    def _prepare_checks(self) -> None:
        self._checks = {
            s.name: _InputCheck(
                s,
                np.dtype(s.dtype),
                len(s.shape),
                tuple((axis, d) for axis, d in enumerate(s.shape) if d is not None),
            )
            for s in self.inputs
        }
        self._output_names = frozenset(s.name for s in self.outputs)

    # -- the request path -------------------------------------------------------------------

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Check ``feeds``, run once, timed and counted; see :meth:`run_timed`."""
        return self.run_timed(feeds, output_names)[0]

    def run_timed(
        self, feeds: Feeds, output_names: Sequence[str] | None = None
    ) -> tuple[dict[str, np.ndarray], int]:
        """(outputs, latency in ns) of one run: the one check and the one timer of a request.

        Feeds or output names that do not fit the model raise InputError before the run (not
        counted as a run). Any runtime failure becomes BackendError, counted as an error, with
        its ``latency_ns`` set.
        """
        self.check_feeds(feeds)
        if output_names:
            self.check_output_names(output_names)
        running = self._running
        me = threading.get_ident()
        start = time.perf_counter_ns()
        running[me] = start
        try:
            out = self._run(feeds, output_names)
        except Exception as err:
            elapsed = time.perf_counter_ns() - start
            del running[me]
            self._count(elapsed, False)
            if isinstance(err, BackendError):
                err.latency_ns = elapsed
                raise
            if isinstance(err, InferdError):
                raise
            wrapped = BackendError(f"{self.runtime} run failed: {one_line(err)}")
            wrapped.latency_ns = elapsed
            raise wrapped from err
        except BaseException:
            del running[me]
            raise
        elapsed = time.perf_counter_ns() - start
        del running[me]
        self._count(elapsed, True)
        return out, elapsed

    def _count(self, elapsed: int, ok: bool) -> None:
        stats = self.stats
        with stats.lock:
            stats.runs += 1
            stats.total_ns += elapsed
            if not ok:
                stats.errors += 1
        if self.observer is not None:
            self.observer(elapsed, ok)

    def check_feeds(self, feeds: Feeds) -> None:
        """Raise InputError unless ``feeds`` names every input with a fitting shape and dtype."""
        checks = self._checks
        if len(feeds) != len(checks):
            self._explain_names(feeds)
        for name, check in checks.items():
            arr = feeds.get(name)
            if arr is None:
                self._explain_names(feeds)
                raise InputError(f"missing input {name!r}")
            dtype = arr.dtype
            if dtype is not check.dtype and dtype.name != check.spec.dtype:
                got = V2_DATATYPES.get(dtype.name, dtype.name)
                want = V2_DATATYPES[check.spec.dtype]
                raise InputError(f"input {name!r} has datatype {got}, the model expects {want}")
            shape = arr.shape
            if len(shape) != check.rank or any(shape[axis] != d for axis, d in check.fixed):
                dims = [-1 if d is None else d for d in check.spec.shape]
                raise InputError(
                    f"input {name!r} has shape {list(shape)}, the model expects {dims}"
                )

    def _explain_names(self, feeds: Feeds) -> None:
        """InputError naming the first unknown, else the first missing input."""
        for name in feeds:
            if name not in self._checks:
                raise InputError(
                    f"unknown input {name!r}; the model takes {', '.join(sorted(self._checks))}"
                )
        for name in self._checks:
            if name not in feeds:
                raise InputError(f"missing input {name!r}")

    def check_output_names(self, names: Sequence[str]) -> None:
        """Raise InputError unless every name is one of the model's outputs."""
        known = self._output_names
        for name in names:
            if name not in known:
                raise InputError(
                    f"unknown output {name!r}; the model gives {', '.join(sorted(known))}"
                )

    def oldest_run_start_ns(self) -> int | None:
        """``perf_counter_ns`` at the start of the longest run still going; None when idle."""
        return min(self._running.copy().values(), default=None)  # copy: atomic under the GIL

    def signature(self) -> dict[str, list[dict[str, object]]]:
        """Inputs and outputs in the OIP v2 metadata form."""
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    # -- warm-up ----------------------------------------------------------------------------

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
        """Run inputs that fit the model ``runs`` times, so first requests do not pay for lazy
        initialisation (memory arenas, kernels, TensorRT engines).

        The inputs, first found first: the golden inputs of the model's bundle; the
        ``warmup_inputs`` npz or the ``warmup_shapes`` of its options; else a search over the
        dynamic dimensions (see :func:`search_shapes`), since zeros with every dynamic
        dimension at 1 are no valid input for many real models (an audio frame padded by
        reflection, an image with a minimum size). Failure is a warning, never an unloaded model.
        With TensorRT every shape tried builds an engine: there, ship golden inputs or set
        ``warmup_shapes`` (not yet measured on a GPU here).

        A process that dies in a warm-up run (a native crash in the runtime) leaves that run's
        inputs in the slot's cache dir: the next start serves the model without warming it up
        and says why, where it would otherwise crash again at every restart.
        """
        if runs <= 0:
            return
        marker = self._warmup_marker()
        if marker is not None:
            try:
                # one line, bounded: it goes into a log line and an event
                died_on = marker.read_text(encoding="utf-8", errors="replace")[:300]
                died_on = died_on.strip().splitlines()[0] if died_on.strip() else ""
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("%s: cannot read %s: %s", self.options.name, marker, err.strerror)
            else:
                self._warmup_failed(
                    f"not tried: a process ended during this model's last warm-up, on"
                    f" {died_on or 'unknown inputs'} (a crash in the runtime?); delete {marker}"
                    " to try again",
                    hint=False,
                )
                return
        try:
            self._warm_up(runs, marker)
        finally:
            if marker is not None:
                with contextlib.suppress(OSError):
                    marker.unlink(missing_ok=True)

    def _warmup_marker(self) -> Path | None:
        """Where the inputs of the warm-up run under way are written, so that a start after the
        process died in one (a runtime's native crash: SIGFPE, SIGSEGV) skips the warm-up
        instead of crashing again and again under systemd's restarts; None without a cache
        dir. Named after the model file's path, size and modification time."""
        if self.cache_dir is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        key = f"{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
        return self.cache_dir / f"warmup-{hashlib.sha256(key).hexdigest()[:16]}.running"

    def _warm_runs(self, feeds: Feeds, runs: int, marker: Path | None, source: str) -> None:
        """``runs`` warm-up runs of ``feeds``, their shapes written to ``marker`` first."""
        if marker is not None:
            shapes = ", ".join(f"{n}{list(a.shape)}" for n, a in feeds.items())
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{source} {shapes}\n", encoding="utf-8")
            except OSError as err:  # a full or read-only disk: warm up without the guard
                log.debug("%s: cannot write %s: %s", self.options.name, marker, err.strerror)
        for _ in range(runs):
            self._warm_run(feeds)

    def _warm_up(self, runs: int, marker: Path | None) -> None:
        try:
            given = self._given_warmup_feeds()
        except InferdError as err:
            self._warmup_failed(str(err))
            return
        if given is not None:
            source, feeds = given
            try:
                self.check_feeds(feeds)
                self._warm_runs(feeds, runs, marker, source)
            except Exception as err:  # noqa: BLE001 - any failure only means "not warmed up"
                self._warmup_failed(f"{source}: {one_line(err)}")
            else:
                self._warmed_up(source, feeds)
            return
        first_error = None
        for feeds in search_shapes(self.inputs):
            try:
                self._warm_runs(feeds, runs, marker, "search")
            except Exception as err:  # noqa: BLE001 - try the next shape
                first_error = first_error or one_line(err)
                continue
            self._warmed_up("search", feeds)
            return
        self._warmup_failed(
            f"zero inputs: {first_error} (and with every dynamic size up to {WARMUP_DIM_CAP})"
        )

    def _warmed_up(self, source: str, feeds: Feeds) -> None:
        # zeros are kept as shapes and files are read again when asked: warm-up inputs held
        # for the life of the model would add an image model's golden batch to its memory
        self.warmup_source = source
        if source in ("search", "warmup_shapes"):
            self._warmup_zeros = {n: (a.shape, a.dtype) for n, a in feeds.items()}

    def warmup_feeds(self) -> dict[str, np.ndarray] | None:
        """The inputs the model warmed up on, None when it did not: feeds that fit the model
        and ran, for whoever needs some and has no golden inputs (the validation gate)."""
        if self.warmup_source is None:
            return None
        if self._warmup_zeros:
            return {n: np.zeros(shape, dtype) for n, (shape, dtype) in self._warmup_zeros.items()}
        try:
            given = self._given_warmup_feeds()
        except InferdError:
            return None  # the file changed since load
        return given[1] if given is not None else None

    def _warm_run(self, feeds: Feeds) -> None:
        """One warm-up run; a runtime that logs each failed run says nothing here (the search
        expects failures and reports them once)."""
        self._run(feeds, None)

    def _warmup_failed(self, why: str, hint: bool = True) -> None:
        self.warmup_error = f"warm-up failed: {why}"
        log.warning(
            "%s: %s; the model serves, its first requests pay for initialisation%s",
            self.options.name,
            self.warmup_error,
            " (set warmup_inputs or warmup_shapes, or warmup_runs: 0)" if hint else "",
        )

    def _given_warmup_feeds(self) -> tuple[str, dict[str, np.ndarray]] | None:
        """(source, feeds) from the bundle's golden inputs or the options, None when neither."""
        names = [s.name for s in self.inputs]
        golden = bundle.golden_path(self.path)
        if golden is not None:
            try:
                return "golden inputs", self._cast(bundle.read_golden(golden, names).inputs)
            except BundleError as err:
                log.warning("%s: golden inputs not used for warm-up: %s", self.options.name, err)
        opts = self.options
        if opts.warmup_inputs is not None:
            try:
                return "warmup_inputs", self._cast(
                    bundle.read_inputs(Path(opts.warmup_inputs), names)
                )
            except BundleError as err:
                raise InputError(f"warmup_inputs: {err}") from err
        if opts.warmup_shapes:
            unknown = sorted(set(opts.warmup_shapes) - set(names))
            if unknown:
                raise InputError(
                    f"warmup_shapes names {', '.join(unknown)}; the model's inputs are"
                    f" {', '.join(names)}"
                )
            feeds = next(iter(search_shapes(self.inputs)), None) or {}
            for spec in self.inputs:
                shape = opts.warmup_shapes.get(spec.name)
                if shape is not None:
                    feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
            return "warmup_shapes", feeds
        return None

    def _cast(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays in the model's dtypes (an operator's npz often holds float64)."""
        dtypes = {s.name: np.dtype(s.dtype) for s in self.inputs}
        return {n: a.astype(dtypes[n], copy=False) if n in dtypes else a for n, a in feeds.items()}


def search_shapes(
    specs: Sequence[TensorSpec], cap: int = WARMUP_DIM_CAP
) -> Iterator[dict[str, np.ndarray]]:
    """Zero feeds with every dynamic dimension at 1, then 2, 4, ... up to ``cap``.

    Each size is tried twice: with batch-like dimensions (the first axis of an input, and any
    dimension sharing its symbolic name) kept at 1, then with every dynamic dimension at that
    size (a state tensor whose batch axis is not first). Feeds over
    :data:`WARMUP_MAX_ELEMENTS` elements are skipped. The first candidate is exactly what the
    old zero warm-up used, so models that ran on it still warm up on the first try.
    """
    batch_names = {
        s.dim_names[0] for s in specs if s.shape and s.shape[0] is None and s.dim_names
    } - {None}
    seen: set[tuple[tuple[int, ...], ...]] = set()
    size = 1
    while size <= cap:
        for keep_batch in (True, False):
            shapes = []
            for s in specs:
                names = s.dim_names or (None,) * len(s.shape)
                shape = []
                for axis, (d, sym) in enumerate(zip(s.shape, names, strict=True)):
                    if d is not None:
                        shape.append(d)
                    elif keep_batch and (axis == 0 or (sym is not None and sym in batch_names)):
                        shape.append(1)
                    else:
                        shape.append(size)
                shapes.append(tuple(shape))
            key = tuple(shapes)
            if key in seen or any(int(np.prod(sh)) > WARMUP_MAX_ELEMENTS for sh in shapes):
                continue
            seen.add(key)
            yield {
                s.name: np.zeros(sh, dtype=np.dtype(s.dtype))
                for s, sh in zip(specs, shapes, strict=True)
            }
        size *= 2


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (runtimes print multi-line dumps)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
