"""``inferctl console``: the operator's web console and rollout autopilot.

::

    inferctl console [--broker HOST:PORT] [--repo DIR] [--listen 127.0.0.1:8090]
                     [--token-file FILE | --insecure] [--soak S] [--halt-ratio R]
                     [--min-attempted N] [--steps 1,10,25,50,100] [--no-drive]

Serves a live page of the fleet (devices, latency and throughput over the last hour, versions
per group, rollouts with halt and resume, quality and drift) and drives the staged rollout of
the newest version of each slot in ``--repo``: the share of all groups goes up one step after
``--soak`` seconds when nothing failed over ``--halt-ratio``, and the rollout halts when too
many fail. See :mod:`updater.operator.console`. Runs until interrupted (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from runtime.addresses import is_loopback
from runtime.errors import OperatorError
from telemetry.shares import basis_points
from updater.inferctl.broker import add_broker_args, broker_from_args
from updater.inferctl.rollout import add_halt_args
from updater.operator.console.app import ConsoleSettings, run
from updater.operator.console.rollouts import DEFAULT_STEPS, Policy
from updater.operator.console.server import parse_listen, read_token
from updater.operator.console.state import Limits

log = logging.getLogger(__name__)


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(basis_points(float(p)) for p in text.split(","))
    except ValueError as err:
        raise OperatorError(f"--steps {text}: {err}") from None


def _cmd_console(args: argparse.Namespace) -> int:
    try:
        policy = Policy(
            soak_s=args.soak,
            halt_ratio=args.halt_ratio,
            min_attempted=args.min_attempted,
            steps=_steps(args.steps),
            drive=not args.no_drive,
        )
    except ValueError as err:
        raise OperatorError(f"console: {err}") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.id):
        raise OperatorError(f"--id {args.id!r}: letters, digits, '.', '_' and '-' only")
    if not 0.1 <= args.plot_bucket <= 600:
        raise OperatorError("--plot-bucket must be between 0.1 and 600 s")
    settings = ConsoleSettings(
        broker=broker_from_args(args, "inferctl-console"),
        repo=str(args.repo),
        listen=args.listen,
        token=read_token(args.token_file, args.listen, args.insecure),
        prefix=args.prefix,
        console_id=args.id,
        policy=policy,
        limits=Limits(bucket_s=args.plot_bucket),
    )
    if settings.token is None and not is_loopback(parse_listen(args.listen)[0]):
        log.warning("--insecure: the console on %s takes requests without a token", args.listen)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def ready(url: str) -> None:
        sys.stdout.write(f"inferd console: {url}\n")
        sys.stdout.flush()

    run(settings, stop, ready)
    return 0


def register(sub: Any) -> None:
    """Add ``inferctl console``."""
    p = sub.add_parser(
        "console",
        help="web console of the fleet; drives staged rollouts (advance, halt) by itself",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--repo", type=Path, default=Path("."), help="repository folder (default .)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8090",
        metavar="HOST:PORT",
        help="where the page is served (default %(default)s; off loopback needs --token-file)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the token the page and API need (Authorization: Bearer <token>)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="serve off loopback without a token (warned)"
    )
    p.add_argument(
        "--soak",
        type=float,
        default=300.0,
        help="seconds a share runs healthy before the next step (default %(default)s)",
    )
    add_halt_args(p)
    p.add_argument(
        "--steps",
        default=",".join(f"{s / 100:g}" for s in DEFAULT_STEPS),
        help="the shares (percent) a rollout advances through (default %(default)s)",
    )
    p.add_argument(
        "--plot-bucket",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds per plotted point; the plots cover the last hour (default %(default)s)",
    )
    p.add_argument(
        "--no-drive", action="store_true", help="show rollouts only; never advance or halt"
    )
    p.add_argument(
        "--id",
        default="inferd-console",
        help="name of the console's own events (default %(default)s)",
    )
    add_broker_args(p)
    p.set_defaults(func=_cmd_console)
