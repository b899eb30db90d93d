"""``inferd tune``: find the fastest runtime options for one model on this very device.

Searches execution providers (those this onnxruntime build offers: CPU, CUDA, TensorRT,
OpenVINO), intra- and inter-op threads and graph optimisation level -- a full grid, or a random
sample of it -- timing the model on its golden inputs (or generated inputs matching its
signature when it has none). The configured options are measured first, as the baseline. When
the batch axis is dynamic, the best options are then timed at growing batch sizes. Everything
stops at ``--budget-s``.

The result is a table on stdout and a drop-in YAML (``<config>.d/tune-<model>.yaml`` unless
``--out`` says otherwise) that ``load_config`` merges over the main file, so the operator
keeps the main config as written and can delete the drop-in to undo.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import yaml

from agent.config import Config, ModelConfig, load_config
from runtime import bundle
from runtime.backends import Backend, open_backend
from runtime.errors import InferdError

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
MIN_TIME_S = 0.2
"""Time spent timing each setting at the least (within its share of the budget)."""
Search = Literal["grid", "random"]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Candidate:
    """One combination of runtime options."""

    providers: tuple[str, ...]
    threads: int
    inter_op_threads: int
    graph_optimization: str

    @classmethod
    def of(cls, cfg: ModelConfig) -> Candidate:
        return cls(cfg.providers, cfg.threads, cfg.inter_op_threads, cfg.graph_optimization)

    def apply(self, cfg: ModelConfig) -> ModelConfig:
        return msgspec.structs.replace(
            cfg,
            providers=self.providers,
            threads=self.threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            warmup_runs=2,
        )

    def label(self) -> str:
        return (
            f"{'+'.join(self.providers):<18} {self.threads:>7} {self.inter_op_threads:>8}"
            f" {self.graph_optimization:>8}"
        )


@dataclass(frozen=True)
class Trial:
    candidate: Candidate
    runs: int
    p50_ms: float
    p90_ms: float
    load_s: float
    error: str | None = None


@dataclass(frozen=True)
class BatchTrial:
    batch: int
    p50_ms: float

    @property
    def per_sample_ms(self) -> float:
        return self.p50_ms / self.batch


@dataclass(frozen=True)
class TuneResult:
    model: str
    baseline: Trial
    trials: list[Trial]
    batches: list[BatchTrial]
    planned: int
    elapsed_s: float

    @property
    def best(self) -> Trial:
        """The fastest setting; among those within 5 % of it (noise), the configured one if it is
        there, else the one using the fewest threads."""
        ok = [t for t in self.trials if t.error is None]
        if not ok:
            return self.baseline
        fastest = min(t.p50_ms for t in ok)
        close = [t for t in ok if t.p50_ms <= 1.05 * fastest]
        if self.baseline in close:
            return self.baseline
        return min(
            close, key=lambda t: (t.candidate.threads + t.candidate.inter_op_threads, t.p50_ms)
        )

    @property
    def best_batch(self) -> BatchTrial | None:
        """The smallest batch within 10 % of the best time per sample."""
        if len(self.batches) < 2:
            return None
        floor = min(b.per_sample_ms for b in self.batches)
        return next(b for b in self.batches if b.per_sample_ms <= 1.1 * floor)


def space(
    cfg: ModelConfig, providers: Sequence[str], cpus: int, threads: Sequence[int] | None = None
) -> list[Candidate]:
    """Every combination worth trying for ``cfg`` on a device with these providers and CPUs."""
    if threads is None:
        threads = sorted({*(2**i for i in range(8) if 2**i <= cpus), cpus})
    if cfg.runtime != "onnxruntime":  # LiteRT: only the thread count is a runtime option here
        return [
            Candidate(cfg.providers, t, cfg.inter_op_threads, cfg.graph_optimization)
            for t in threads
        ]
    chains: list[tuple[str, ...]] = [("cpu",)]
    if "cuda" in providers:
        chains.append(("cuda", "cpu"))
    if "tensorrt" in providers:
        chains.append(("tensorrt", "cuda", "cpu") if "cuda" in providers else ("tensorrt", "cpu"))
    if "openvino" in providers:
        # its threads become OpenVINO's num_of_threads (see runtime.backends.onnx)
        chains.append(("openvino", "cpu"))
    inter = sorted({1, min(2, cpus)})
    return [
        Candidate(p, t, i, g)
        for p, t, i, g in itertools.product(chains, threads, inter, OPT_LEVELS)
    ]


def plan(candidates: list[Candidate], search: Search, trials: int, seed: int) -> list[Candidate]:
    """The order to try: the whole grid, or ``trials`` picked at random."""
    if search == "grid":
        return list(candidates)
    rng = random.Random(seed)
    return rng.sample(candidates, min(trials, len(candidates)))


def generated_inputs(backend: Backend, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that fit the model, for timing it when no golden inputs are given.

    The shapes the backend's warm-up found to run (given ``warmup_inputs`` as they are, or the
    shapes of its search), so a model with a minimum input size is timed on inputs it takes;
    their floats are random normal (all-zero data can take fast paths real inputs do not),
    integers are kept (they are often sizes, rates or ids). Random floats that the model
    refuses fall back to the warm-up inputs themselves. Without a warm-up: the signature with
    dynamic dimensions set to 1, random floats and small non-negative integers.
    """
    rng = np.random.default_rng(seed)
    warm = backend.warmup_feeds()
    if warm is not None and backend.warmup_source not in ("search", "warmup_shapes"):
        return warm  # inputs from a file: real data, used as they are
    if warm is not None:
        feeds = {
            name: rng.normal(size=a.shape).astype(a.dtype) if a.dtype.kind == "f" else a
            for name, a in warm.items()
        }
        try:
            backend.run(feeds)
        except InferdError:
            return warm
        return feeds
    feeds = {}
    for name, zeros in backend.example_feeds(batch).items():
        if zeros.dtype.kind == "f":
            feeds[name] = rng.normal(size=zeros.shape).astype(zeros.dtype)
        elif zeros.dtype.kind in "iu":
            feeds[name] = rng.integers(0, 2, size=zeros.shape).astype(zeros.dtype)
        else:
            feeds[name] = zeros
    return feeds


def _time_runs(
    backend: Backend, feeds: Mapping[str, np.ndarray], runs: int, until: float, clock: Clock
) -> list[float]:
    """At least ``runs`` timed runs and at least :data:`MIN_TIME_S` of them (a fast model gets
    many more runs, so its median is not noise), stopping at ``until`` after three."""
    times: list[float] = []
    enough = clock() + MIN_TIME_S
    while (len(times) < runs or clock() < enough) and (len(times) < 3 or clock() < until):
        start = time.perf_counter_ns()
        backend.run(feeds)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def measure(
    cfg: ModelConfig,
    path: Path,
    feeds: Mapping[str, np.ndarray] | None,
    runs: int,
    until: float,
    clock: Clock = time.monotonic,
) -> tuple[Trial, dict[str, np.ndarray]]:
    """Load with ``cfg`` and time ``runs`` runs (at least 3, fewer past ``until``)."""
    candidate = Candidate.of(cfg)
    start = clock()
    try:
        backend = open_backend(path, cfg)
    except InferdError as err:
        return Trial(candidate, 0, float("inf"), float("inf"), clock() - start, str(err)), {}
    try:
        load_s = clock() - start
        used = dict(feeds) if feeds is not None else generated_inputs(backend)
        times = np.array(_time_runs(backend, used, runs, until, clock))
        trial = Trial(
            candidate,
            len(times),
            float(np.percentile(times, 50)),
            float(np.percentile(times, 90)),
            load_s,
        )
        return trial, used
    except InferdError as err:
        return Trial(candidate, 0, float("inf"), float("inf"), clock() - start, str(err)), {}
    finally:
        backend.close()


def _tile(feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    out = {}
    for name, a in feeds.items():
        reps = -(-batch // a.shape[0])
        out[name] = np.concatenate([a] * reps)[:batch]
    return out


def batch_sweep(
    cfg: ModelConfig,
    path: Path,
    feeds: Mapping[str, np.ndarray],
    runs: int,
    deadline: float,
    clock: Clock = time.monotonic,
) -> list[BatchTrial]:
    """p50 latency at growing batch sizes, for a model whose batch axis is dynamic."""
    backend = open_backend(path, cfg)
    try:
        if not all(s.shape and s.shape[0] is None for s in backend.inputs):
            return []
        out = []
        for batch in BATCHES:
            if clock() >= deadline:
                break
            tiled = _tile(feeds, batch)
            times = _time_runs(backend, tiled, runs, deadline, clock)
            out.append(BatchTrial(batch, float(np.percentile(times, 50))))
        return out
    except InferdError as err:
        log.warning("batch sweep stopped: %s", err)
        return []
    finally:
        backend.close()


def tune(
    cfg: ModelConfig,
    path: Path,
    *,
    budget_s: float,
    search: Search = "grid",
    trials: int = 12,
    seed: int = 0,
    runs: int = 30,
    feeds: Mapping[str, np.ndarray] | None = None,
    providers: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    clock: Clock = time.monotonic,
) -> TuneResult:
    """Measure the configured options, then the search plan, within ``budget_s`` seconds."""
    if providers is None:
        from runtime.backends.onnx import available_providers

        providers = available_providers() if cfg.runtime == "onnxruntime" else []
    start = clock()
    deadline = start + budget_s
    candidates = plan(space(cfg, providers, _cpus(), threads), search, trials, seed)
    baseline_candidate = Candidate.of(cfg)
    todo = [c for c in candidates if c != baseline_candidate]
    # a slice per trial so one slow setting cannot eat the whole budget; 20 % kept for batches
    per_trial = 0.8 * budget_s / (len(todo) + 1)
    baseline, used = measure(
        baseline_candidate.apply(cfg), path, feeds, runs, min(deadline, start + per_trial), clock
    )
    if baseline.error is not None:
        raise InferdError(f"{cfg.name}: the configured options do not run: {baseline.error}")
    done = [baseline]
    for candidate in todo:
        now = clock()
        spent = (now - start) / len(done)
        if now + min(spent, per_trial) > deadline - 0.2 * budget_s:
            log.info("time budget reached after %d of %d settings", len(done), len(todo) + 1)
            break
        trial, _ = measure(candidate.apply(cfg), path, used, runs, now + per_trial, clock)
        if trial.error is not None:
            log.info("%s: %s", candidate.label().strip(), trial.error)
        done.append(trial)
    result = TuneResult(cfg.name, baseline, done, [], len(todo) + 1, clock() - start)
    batches = batch_sweep(result.best.candidate.apply(cfg), path, used, runs, deadline, clock)
    return TuneResult(cfg.name, baseline, done, batches, len(todo) + 1, clock() - start)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def render_table(result: TuneResult) -> str:
    """The trials, fastest first, with the baseline and the best marked."""
    best = result.best
    lines = [
        f"{result.model}: {len(result.trials)} of {result.planned} settings measured"
        f" in {result.elapsed_s:.2f} s",
        f"  {'providers':<18} {'threads':>7} {'inter_op':>8} {'graph':>8}"
        f" {'p50 ms':>9} {'p90 ms':>9} {'runs':>5} {'load s':>7}",
    ]
    for t in sorted(result.trials, key=lambda t: t.p50_ms):
        mark = "*" if t is best else ("=" if t is result.baseline else " ")
        if t.error is not None:
            lines.append(f"{mark} {t.candidate.label()}  failed: {t.error}")
            continue
        lines.append(
            f"{mark} {t.candidate.label()} {t.p50_ms:>9.4f} {t.p90_ms:>9.4f} {t.runs:>5}"
            f" {t.load_s:>7.3f}"
        )
    lines.append("  * best   = configured now")
    if result.batches:
        lines.append(f"  {'batch':>5} {'p50 ms':>9} {'ms/sample':>10}")
        lines += [
            f"  {b.batch:>5} {b.p50_ms:>9.4f} {b.per_sample_ms:>10.4f}" for b in result.batches
        ]
    return "\n".join(lines) + "\n"


def dropin(result: TuneResult) -> str:
    """The drop-in YAML with the best options for the model."""
    best, base = result.best, result.baseline
    c = best.candidate
    speedup = base.p50_ms / best.p50_ms if best.p50_ms > 0 else 1.0
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = [
        f"# written by `inferd tune` on {socket.gethostname()} at {when}",
        f"# p50 {best.p50_ms:.4f} ms, was {base.p50_ms:.4f} ms with the options"
        f" configured then ({speedup:.2f}x)",
    ]
    bb = result.best_batch
    if bb is not None:
        header.append(
            f"# dynamic batch: {bb.per_sample_ms:.4f} ms/sample at batch {bb.batch}"
            f" vs {result.batches[0].per_sample_ms:.4f} at batch 1; send batches of"
            f" up to {bb.batch} where latency allows"
        )
    body = {
        "models": [
            {
                "name": result.model,
                "providers": list(c.providers),
                "threads": c.threads,
                "inter_op_threads": c.inter_op_threads,
                "graph_optimization": c.graph_optimization,
            }
        ]
    }
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)


def model_file(config: Config, cfg: ModelConfig) -> Path:
    """The file the daemon would serve for this slot: an installed update, else the config's."""
    from updater.device.store import ModelStore

    try:
        active = ModelStore(config.state_dir).active(cfg.name)
    except InferdError as err:
        log.warning("%s: update store unreadable (%s); tuning the configured model", cfg.name, err)
        active = None
    return Path(active.path) if active is not None else Path(cfg.path)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of ints"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("thread counts must be >= 1")
    return values


def add_parser(sub: Any) -> None:
    """Add ``inferd tune`` to the ``inferd`` subparsers."""
    p = sub.add_parser(
        "tune",
        help="search runtime options for a model on this device, write a drop-in config",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--config", "-c", required=True, type=Path, help="YAML config file")
    p.add_argument("--model", "-m", required=True, help="model slot name")
    p.add_argument("--budget-s", type=float, default=60.0, help="time budget (default 60 s)")
    p.add_argument("--search", choices=("grid", "random"), default="grid")
    p.add_argument("--trials", type=int, default=12, help="settings tried by random search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=30, help="timed runs per setting")
    p.add_argument("--threads", type=_int_list, help="thread counts to try, e.g. 1,2,4")
    p.add_argument("--inputs", type=Path, help="npz of inputs (default: the golden inputs)")
    p.add_argument("--out", type=Path, help="drop-in file (default: <config>.d/tune-<model>.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``inferd tune``."""
    if args.budget_s <= 0:
        raise InferdError("--budget-s must be > 0")
    config = load_config(args.config)
    cfg = config.model(args.model)
    path = model_file(config, cfg)
    inputs = args.inputs or bundle.golden_path(path)
    feeds = None
    if inputs is not None:
        probe = open_backend(path, msgspec.structs.replace(cfg, warmup_runs=0))
        try:
            names = [s.name for s in probe.inputs]
        finally:
            probe.close()
        feeds = bundle.read_inputs(inputs, names)
        sys.stdout.write(f"timing {path} on {inputs}\n")
    else:
        sys.stdout.write(f"timing {path} on generated inputs (no golden inputs found)\n")
    result = tune(
        cfg,
        path,
        budget_s=args.budget_s,
        search=args.search,
        trials=args.trials,
        seed=args.seed,
        runs=args.runs,
        feeds=feeds,
        threads=args.threads,
    )
    sys.stdout.write(render_table(result))
    if args.dry_run:
        return 0
    out = args.out or args.config.with_name(f"{args.config.name}.d") / f"tune-{cfg.name}.yaml"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(dropin(result), encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        raise InferdError(f"{out}: cannot write the drop-in: {err.strerror}") from err
    sys.stdout.write(f"wrote {out}\n")
    return 0
