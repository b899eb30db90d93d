"""``inferctl rollout``: stage a published model version across the fleet, watch it, halt it.

::

    inferctl rollout SLOT [--repo DIR] [--version V] [--percent P [--group G]]
                     [--halt-ratio R] [--min-attempted N] [--window S | --follow]
                     [--poke-group G ...] [--no-poke] [--json] [--broker HOST:PORT] ...

``--percent`` sets the share of devices that install the version (of every group, or of
``--group`` only), re-signs targets, snapshot and timestamp and pokes the version's groups.
Then the tally (:class:`telemetry.rollout.RolloutTally`): the retained status of every device
(which says how its last update job ended, so a wave that already finished is judged too)
and the update events seen for ``--window`` seconds, or with ``--follow`` until every device
in the rollout has finished. When failures / attempted exceeds ``--halt-ratio`` (after at least
``--min-attempted`` attempts) the rollout is halted: every share is set to 0 and signed, with
the reason, and the groups are poked so devices still downloading give up. A halted rollout
does not take back devices that installed the version; raising the percentage resumes it.
Exit code 3 when the rollout is halted.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from telemetry.broker import add_broker_args, broker_from_args, connect
from telemetry.errors import MqttError
from telemetry.rollout import (
    ALL,
    FULL,
    RolloutSummary,
    RolloutTally,
    basis_points,
    render,
    shares_text,
)
from updater.commands import poke, poke_topic
from updater.errors import OperatorError
from updater.model_meta import ModelMeta, Rollout
from updater.repository import OperatorRepository

EXIT_HALTED = 3


def raised(current: Rollout | None, bp: int, group: str | None) -> Rollout:
    """The rollout after setting ``group``'s share (all groups' default when None) to ``bp``.

    A version published without a rollout goes to every device: it starts from 100 %.
    """
    shares = dict(current.shares) if current is not None else {ALL: FULL}
    shares[group or ALL] = bp
    return Rollout(shares=shares)


def halted(current: Rollout | None, reason: str) -> Rollout:
    """The rollout with every share at 0, saying why."""
    shares = dict.fromkeys(current.shares if current is not None else (), 0) | {ALL: 0}
    return Rollout(shares=shares, halted=reason)


def halt_reason(s: RolloutSummary, ratio: float, min_attempted: int) -> str | None:
    """Why the rollout must stop now, or None while it may go on."""
    if s.attempted < max(1, min_attempted) or s.failure_ratio <= ratio:
        return None
    return (
        f"{s.failed} of {s.attempted} devices failed ({s.failure_ratio:.1%} > {ratio:.1%}) "
        f"at {shares_text(s.shares)}"
    )


def poke_groups(meta: ModelMeta, extra: list[str] | None = None) -> list[str]:
    """The groups to poke for a rollout change: the version's, the named shares', ``extra``."""
    named = [g for g in (meta.rollout.shares if meta.rollout else {}) if g != ALL]
    return sorted({*meta.groups, *named, *(extra or [])})


def poke_payload(meta: ModelMeta) -> bytes:
    """What a rollout poke says (for dashboards; devices only ever check the repository)."""
    return msgspec.json.encode(
        {
            "ts": time.time(),
            "by": "inferctl rollout",
            "model": meta.name,
            "version": meta.version,
            "seq": meta.seq,
            "groups": list(meta.groups),
            "rollout": None if meta.rollout is None else meta.rollout.shares,
            "halted": None if meta.rollout is None else meta.rollout.halted,
        }
    )


def tally_for(meta: ModelMeta, prefix: str) -> RolloutTally:
    """A tally of ``meta``'s rollout, knowing from the signed metadata who is meant to join."""
    return RolloutTally(
        prefix,
        meta.name,
        meta.version,
        seq=meta.seq,
        target_groups=meta.groups,
        shares=None if meta.rollout is None else meta.rollout.shares,
        shares_known=True,
        halted=None if meta.rollout is None else meta.rollout.halted,
    )


def listen(client: mqtt.Client, tally: RolloutTally) -> None:
    """Feed ``tally`` from ``client``, returning once the broker has the subscriptions."""
    topics = tally.topics()
    acked = threading.Semaphore(0)
    client.on_message = lambda _c, _u, msg: tally.feed(msg.topic, bytes(msg.payload))
    client.on_subscribe = lambda *_: acked.release()
    for topic, qos in topics:
        client.subscribe(topic, qos=qos)
    # the window starts once the broker has the subscriptions: no event before it is missed
    for _ in topics:
        if not acked.acquire(timeout=10):
            raise MqttError("the broker did not acknowledge the subscriptions")


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


class _Rollout:
    """One invocation: the repository, the version, and the broker once needed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repo = OperatorRepository(args.repo)
        _path, _target, self.meta = self.repo.model(args.slot, args.version)
        self.client: mqtt.Client | None = None
        self.notes: list[str] = []

    def broker(self) -> mqtt.Client:
        if self.client is None:
            self.client = connect(broker_from_args(self.args, "inferctl-rollout"))
        return self.client

    def sign(self, rollout: Rollout) -> None:
        before = self.meta.rollout
        self.meta = self.repo.set_rollout(self.meta.name, self.meta.version, rollout)
        was = "100 % (not staged)" if before is None else shares_text(before.shares)
        self.notes.append(
            f"{self.meta.name} {self.meta.version}: rollout {was} -> "
            f"{shares_text(rollout.shares)}; signed targets v{self.repo.targets().version}"
        )
        if self.args.no_poke:
            return
        groups = poke_groups(self.meta, self.args.poke_group)
        if not groups:
            self.notes.append(
                "no group to poke (the version is for every device): "
                "devices see the change at their next poll"
            )
            return
        topics = [poke_topic(self.args.prefix, group=g) for g in groups]
        try:
            poke(self.broker(), topics, poke_payload(self.meta))
        except MqttError as err:
            raise MqttError(f"{self.notes[-1]}, but the groups were not poked: {err}") from err
        self.notes.append(f"poked {', '.join(groups)}")

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def _cmd_rollout(args: argparse.Namespace) -> int:
    ro = _Rollout(args)
    try:
        if args.percent is not None:
            try:
                bp = basis_points(args.percent)
            except ValueError as err:
                raise OperatorError(str(err)) from None
            ro.sign(raised(ro.meta.rollout, bp, args.group))
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


def _watch(ro: _Rollout, args: argparse.Namespace) -> tuple[RolloutSummary, bool]:
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
            ro.sign(halted(ro.meta.rollout, reason))
            tally.set_rollout(ro.meta.rollout.shares if ro.meta.rollout else None, reason)
            summary = tally.summary()
            halted_now = True
            break
        if args.follow:
            if summary.halted or (summary.settled and summary.devices > 0):
                break
        elif time.monotonic() >= deadline:
            break
    return summary, halted_now


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
    p.add_argument(
        "--halt-ratio",
        type=float,
        default=0.05,
        help="halt when failed/attempted exceeds this (default %(default)s)",
    )
    p.add_argument(
        "--min-attempted",
        type=int,
        default=5,
        help="judge the ratio only after this many attempts (default %(default)s)",
    )
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
