"""``inferctl rollout``: stage a published model version across the fleet, watch it, halt it.

See :mod:`updater.operator.rollout` for what each option does. Every change is signed under
the repository's signing lock, the one a running ``inferctl console`` takes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from telemetry.fleet.rollout import RolloutSummary, render
from telemetry.shares import shares_text
from updater.inferctl.broker import add_broker_args, broker_from_args
from updater.inferctl.repo import percent_bp
from updater.meta import Rollout
from updater.operator.repository import OperatorRepository
from updater.operator.rollout import (
    EXIT_HALTED,
    HALT_RATIO,
    MIN_ATTEMPTED,
    RolloutDriver,
    halt_reason,
    halted,
    listen,
    raised,
    tally_for,
)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress(s: RolloutSummary) -> str:
    eta = "-" if s.eta_s is None else f"{s.eta_s:.0f} s"
    return (
        f"{time.strftime('%H:%M:%S')} {s.slot} {s.version}: {shares_text(s.shares)} | "
        f"in rollout {s.joined}, attempted {s.attempted}, succeeded {s.succeeded}, "
        f"failed {s.failed} ({s.failure_ratio:.1%}) | ETA {eta}"
    )


def _cmd_rollout(args: argparse.Namespace) -> int:
    ro = RolloutDriver(
        OperatorRepository(args.repo),
        args.slot,
        args.version,
        broker=lambda: broker_from_args(args, "inferctl-rollout"),
        prefix=args.prefix,
        poke=not args.no_poke,
        poke_groups=args.poke_group,
    )
    try:
        if args.percent is not None:
            bp = percent_bp(args.percent)
            ro.change(lambda now: raised(now, bp, args.group))
        if not args.json:
            for note in ro.notes:
                _out(note)
        if args.window <= 0 and not args.follow:
            return EXIT_HALTED if ro.meta.rollout and ro.meta.rollout.halted else 0
        summary, halted_now = _watch(ro, args)
    finally:
        ro.close()
    if args.json:
        _out(
            msgspec.json.encode(
                {"rollout": summary.to_json(), "halted_now": halted_now, "notes": ro.notes}
            ).decode()
        )
    else:
        _out(render(summary))
        if halted_now:
            _out(f"HALTED {ro.meta.name} {ro.meta.version}: {summary.halted}")
            for note in ro.notes[-1:]:
                _out(note)
    return EXIT_HALTED if summary.halted else 0


def _halting(reason: str) -> Callable[[Rollout | None], Rollout | None]:
    """The halt, unless a console or another operator halted the rollout meanwhile."""

    def halt(now: Rollout | None) -> Rollout | None:
        return None if now is not None and now.halted else halted(now, reason)

    return halt


def _watch(ro: RolloutDriver, args: argparse.Namespace) -> tuple[RolloutSummary, bool]:
    """Tally for the window (or until settled with --follow); halt when the ratio is breached."""
    tally = tally_for(ro.meta, args.prefix)
    listen(ro.broker(), tally)
    deadline = time.monotonic() + args.window
    halted_now = False
    while True:
        left = deadline - time.monotonic()
        time.sleep(args.interval if args.follow else max(0.05, min(args.interval, left)))
        summary = tally.summary()
        if args.follow and not args.json:
            _out(_progress(summary))
        reason = (
            None if summary.halted else halt_reason(summary, args.halt_ratio, args.min_attempted)
        )
        if reason is not None:
            halted_now = ro.change(_halting(reason))
            r = ro.meta.rollout
            tally.set_rollout(r.shares if r else None, r.halted if r else None)
            summary = tally.summary()
            break
        if args.follow:
            if summary.halted or (summary.settled and summary.devices > 0):
                break
        elif time.monotonic() >= deadline:
            break
    return summary, halted_now


def add_halt_args(p: Any) -> None:
    """``--halt-ratio`` and ``--min-attempted``: the halt rule of ``inferctl rollout`` and the
    console's autopilot."""
    p.add_argument(
        "--halt-ratio",
        type=float,
        default=HALT_RATIO,
        help="halt when failed/attempted exceeds this (default %(default)s)",
    )
    p.add_argument(
        "--min-attempted",
        type=int,
        default=MIN_ATTEMPTED,
        help="judge the ratio only after this many attempts (default %(default)s)",
    )


def register(sub: Any) -> None:
    """Add ``inferctl rollout``."""
    p = sub.add_parser(
        "rollout",
        help="staged rollout of a published version: raise its share, tally, halt on failures",
        description=(
            "Set the share of devices that install a published version, tally the rollout from "
            "the broker (retained status, update events) and halt it when too many fail. "
            f"Exit code {EXIT_HALTED} when the rollout is halted."
        ),
    )
    p.add_argument("slot", metavar="SLOT", help="the model slot name")
    p.add_argument("--repo", type=Path, default=Path("."), help="repository folder (default .)")
    p.add_argument("--version", help="default: the newest published version of SLOT")
    p.add_argument("--percent", type=float, help="set the share of devices (0-100)")
    p.add_argument("--group", help="set --percent for this group only (default: all groups)")
    add_halt_args(p)
    p.add_argument(
        "--window",
        type=float,
        default=3.0,
        help="seconds to collect status and events (0: no tally) (default %(default)s)",
    )
    p.add_argument(
        "--follow", action="store_true", help="keep tallying until every device has finished"
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between tallies")
    p.add_argument("--poke-group", action="append", help="also poke this group (repeat)")
    p.add_argument("--no-poke", action="store_true", help="only sign; devices see it at a poll")
    p.add_argument("--json", action="store_true", help="print the tally as JSON")
    add_broker_args(p)
    p.set_defaults(func=_cmd_rollout)
