"""``inferctl watch``: a live table of the fleet, read from the broker.

It subscribes to ``{prefix}/+/status`` (retained, so every known device shows at once) and
``{prefix}/+/metrics``, and shows per device: online, model versions, p50/p99, requests/s, CPU,
temperature and update state. ``--json`` prints the fleet as one JSON document after
``--wait`` seconds, for scripts. ``--rollout SLOT`` shows one staged rollout instead
(:mod:`telemetry.fleet.rollout`): devices per update state, failures, rate and ETA. The table
uses rich when it is installed, plain text otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt

from telemetry import broker
from telemetry.fleet.rollout import RolloutTally, render
from telemetry.fleet.watch import COLUMNS, Fleet, render_text, table_rows
from updater.inferctl.broker import add_broker_args, broker_from_args


def connect(args: argparse.Namespace, fleet: Fleet | RolloutTally) -> mqtt.Client:
    """Connect and subscribe; MqttError with one line when the broker cannot be reached."""
    return broker.connect(
        broker_from_args(args, "inferctl-watch"),
        subscriptions=fleet.topics(),
        on_message=lambda _c, _u, msg: fleet.feed(msg.topic, bytes(msg.payload)),
    )


def run(args: argparse.Namespace) -> int:
    """The ``watch`` command."""
    if args.rollout:
        return _watch_rollout(args)
    fleet = Fleet(args.prefix)
    client = connect(args, fleet)
    try:
        if args.json or args.once:
            time.sleep(args.wait)
            if args.json:
                json.dump(fleet.rows(), sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                sys.stdout.write(render_text(fleet.rows()) + "\n")
            return 0
        _live(fleet, args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


def _watch_rollout(args: argparse.Namespace) -> int:
    """``watch --rollout SLOT``: per-state counts, failures and ETA of the slot's rollout."""
    tally = RolloutTally(args.prefix, args.rollout, args.version)
    client = connect(args, tally)
    try:
        if args.json or args.once:
            time.sleep(args.wait)
            summary = tally.summary()
            out = json.dumps(summary.to_json(), indent=2) if args.json else render(summary)
            sys.stdout.write(out + "\n")
            return 0
        while True:
            sys.stdout.write("\x1b[2J\x1b[H" + render(tally.summary()) + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


def _live(fleet: Fleet, interval: float) -> None:
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table
    except ImportError:  # rich is the ``operator`` extra: plain text without it
        while True:
            sys.stdout.write("\x1b[2J\x1b[H" + render_text(fleet.rows()) + "\n")
            sys.stdout.flush()
            time.sleep(interval)

    def table() -> Table:
        t = Table(title="inferd fleet")
        for col in COLUMNS:
            t.add_column(col)
        for cells in table_rows(fleet.rows()):
            t.add_row(*cells, style=None if cells[1] == "yes" else "dim")
        return t

    with Live(table(), console=Console(), refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(table())


def register(subparsers: Any) -> None:
    """Add ``inferctl watch``."""
    p = subparsers.add_parser("watch", help="live table of the fleet from the MQTT broker")
    add_broker_args(p)
    p.add_argument("--json", action="store_true", help="print the fleet as JSON and exit")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to listen for --json/--once")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period of the live table")
    p.add_argument(
        "--rollout", metavar="SLOT", help="show the rollout of SLOT: states, failures, ETA"
    )
    p.add_argument("--version", help="with --rollout: this version (default: the newest poked)")
    p.set_defaults(func=run)
