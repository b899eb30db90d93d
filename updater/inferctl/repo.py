"""``inferctl`` update commands: the repository, publishing models, pushing, fleet status.

::

    inferctl repo init DIR [--keys ROLE=N] [--threshold ROLE=N] [--expiry ROLE=DAYS]
                       [--root-key-dir P]
    inferctl model add DIR MODEL --name SLOT --version V [--group G ...] [--golden in.npz]
                       [--latency-budget-ms X] [--reference-stats stats.json] [--rollout PCT]
    inferctl model list DIR
    inferctl repo refresh [DIR]          re-sign the timestamp (run it from cron)
    inferctl repo serve DIR [--port 8000]
    inferctl rotate-key ROLE [--repo DIR] [--root-key-dir P]
    inferctl push --group G | --device D [--broker HOST:PORT] [broker options]
    inferctl status [--broker HOST:PORT] [broker options]

Broker options are the same for every operator command: see ``telemetry.broker``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from runtime.errors import OperatorError
from telemetry.broker import connect
from telemetry.shares import ALL, basis_points, shares_text
from updater.inferctl.broker import add_broker_args, broker_from_args
from updater.meta import Rollout
from updater.operator.push import collect_status, poke, poke_topic
from updater.operator.repository import ROLES, OperatorRepository
from updater.operator.serve import RepositoryServer

log = logging.getLogger(__name__)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _role_values(items: list[str] | None, what: str, cast: type[Any]) -> dict[str, Any]:
    out = {}
    for item in items or []:
        role, sep, value = item.partition("=")
        if not sep or role not in ROLES:
            raise OperatorError(f"{what} {item!r}: expected ROLE=VALUE with ROLE one of {ROLES}")
        try:
            out[role] = cast(value)
        except ValueError:
            raise OperatorError(f"{what} {item!r}: {value!r} is not a number") from None
    return out


def _quiet_tuf() -> None:
    # python-tuf logs every unsigned role it re-signs at INFO; that is noise for an operator
    logging.getLogger("tuf").setLevel(logging.WARNING)


# -- repository and models ----------------------------------------------------------------------


def _cmd_repo_init(args: argparse.Namespace) -> int:
    _quiet_tuf()
    repo = OperatorRepository.init(
        args.dir,
        keys=_role_values(args.keys, "--keys", int),
        thresholds=_role_values(args.threshold, "--threshold", int),
        expiry_days=_role_values(args.expiry, "--expiry", float),
        root_key_dir=args.root_key_dir,
    )
    _out(f"repository: {repo.path}")
    _out(f"serve this folder: {repo.public_dir}")
    _out(f"install on devices as updates.trusted_root: {repo.metadata_dir / '1.root.json'}")
    _out(f"root keys (keep offline): {repo.root_key_dir}")
    return 0


def percent_bp(pct: float) -> int:
    """``--percent``/``--rollout`` as basis points; OperatorError (one line) when out of range."""
    try:
        return basis_points(pct)
    except ValueError as err:
        raise OperatorError(str(err)) from None


def _cmd_model_add(args: argparse.Namespace) -> int:
    _quiet_tuf()
    repo = OperatorRepository(args.dir)
    rollout = None if args.rollout is None else Rollout(shares={ALL: percent_bp(args.rollout)})
    meta = repo.add_model(
        args.model,
        name=args.name,
        version=args.version,
        groups=args.group or (),
        golden=args.golden,
        latency_budget_ms=args.latency_budget_ms,
        runtime=args.runtime,
        rtol=args.rtol,
        atol=args.atol,
        reference_stats=args.reference_stats,
        rollout=rollout,
        force=args.force,
    )
    groups = ", ".join(meta.groups) or "all devices"
    staged = "" if meta.rollout is None else f", staged at {shares_text(meta.rollout.shares)}"
    _out(f"published {meta.name} {meta.version} (seq {meta.seq}) for {groups}{staged}")
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    repo = OperatorRepository(args.dir)
    for path, target, meta in repo.models():
        groups = ",".join(meta.groups) or "*"
        row = f"{meta.seq:>5}  {meta.name:<16} {meta.version:<12} {groups:<16}"
        staged = "" if meta.rollout is None else f"  rollout {shares_text(meta.rollout.shares)}"
        _out(f"{row} {target.length:>10}  {path}{staged}")
    return 0


def _cmd_repo_refresh(args: argparse.Namespace) -> int:
    _quiet_tuf()
    repo = OperatorRepository(args.dir, args.root_key_dir)
    roles = repo.refresh()
    expires = repo.timestamp().expires
    _out(f"re-signed {', '.join(roles)}; timestamp expires {expires:%Y-%m-%d %H:%M}Z")
    return 0


def _cmd_repo_serve(args: argparse.Namespace) -> int:
    repo = OperatorRepository(args.dir)
    try:
        server = RepositoryServer(repo.public_dir, args.bind, args.port)
    except OSError as err:
        raise OperatorError(f"cannot listen on {args.bind}:{args.port}: {err.strerror}") from err
    _out(f"serving {repo.public_dir} at {server.url} (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
    return 0


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    _quiet_tuf()
    repo = OperatorRepository(args.repo, args.root_key_dir)
    keyids = repo.rotate_key(args.role)
    _out(
        f"{args.role}: new key(s) {', '.join(k[:16] for k in keyids)}; root v{repo.root().version}"
    )
    return 0


# -- broker -------------------------------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    topic = poke_topic(args.prefix, args.group, args.device)
    payload = msgspec.json.encode({"ts": time.time(), "by": "inferctl push"})
    client = connect(broker_from_args(args))
    try:
        poke(client, [topic], payload)
    finally:
        client.disconnect()
        client.loop_stop()
    _out(f"poked {topic}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    found = collect_status(broker_from_args(args), args.prefix, args.wait)
    if args.json:
        _out(msgspec.json.encode(found).decode())
        return 0
    _out(f"{'DEVICE':<24} {'STATE':<8} {'MODEL':<16} {'VERSION':<12} UPDATE")
    for device in sorted(found):
        data = found[device]
        models = data.get("models") or [{}]
        for m in models:
            _out(
                f"{device:<24} {data.get('state', '?'):<8} {m.get('name', '-'):<16} "
                f"{m.get('version') or '-':<12} {m.get('update_state', '-')}"
            )
    if not found:
        _out("no device has published a status")
    return 0


# -- assembly -----------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add ``repo``, ``model``, ``rotate-key``, ``push`` and ``status`` to inferctl."""
    repo = sub.add_parser("repo", help="the signed TUF model repository").add_subparsers(
        dest="repo_command", metavar="ACTION", required=True
    )
    p = repo.add_parser("init", help="create keys and signed metadata")
    p.add_argument("dir", type=Path)
    p.add_argument("--keys", action="append", metavar="ROLE=N", help="keys per role (default 1)")
    p.add_argument("--threshold", action="append", metavar="ROLE=N", help="signatures needed")
    p.add_argument("--expiry", action="append", metavar="ROLE=DAYS", help="expiry period")
    p.add_argument("--root-key-dir", type=Path, help="keep root keys here (e.g. removable media)")
    p.set_defaults(func=_cmd_repo_init)
    p = repo.add_parser("refresh", help="re-sign the timestamp (and roles close to expiry)")
    p.add_argument("dir", type=Path, nargs="?", default=Path("."))
    p.add_argument("--root-key-dir", type=Path)
    p.set_defaults(func=_cmd_repo_refresh)
    p = repo.add_parser("serve", help="serve the repository over HTTP (demos)")
    p.add_argument("dir", type=Path)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_repo_serve)

    model = sub.add_parser("model", help="publish model versions").add_subparsers(
        dest="model_command", metavar="ACTION", required=True
    )
    p = model.add_parser("add", help="sign a model file into the repository")
    p.add_argument("dir", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("--name", required=True, help="the model slot name on devices")
    p.add_argument("--version", required=True)
    p.add_argument("--group", action="append", help="device group (repeat; default: all)")
    p.add_argument("--golden", type=Path, help=".npz of inputs (and optional expected outputs)")
    p.add_argument("--latency-budget-ms", type=float)
    p.add_argument("--runtime", choices=["onnxruntime", "tflite"])
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--reference-stats", type=Path, help="input statistics JSON for drift")
    p.add_argument("--force", action="store_true", help="replace an already published version")
    p.add_argument(
        "--rollout",
        type=float,
        metavar="PERCENT",
        help="staged: only this %% of devices install it (raise with inferctl rollout)",
    )
    p.set_defaults(func=_cmd_model_add)
    p = model.add_parser("list", help="published model versions")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_cmd_model_list)

    p = sub.add_parser("rotate-key", help="replace a role's keys (root: rotation signed twice)")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--repo", type=Path, default=Path("."))
    p.add_argument("--root-key-dir", type=Path)
    p.set_defaults(func=_cmd_rotate_key)

    p = sub.add_parser("push", help="poke devices to check the repository now")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--group")
    target.add_argument("--device")
    add_broker_args(p)
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("status", help="each device's model versions and update state")
    add_broker_args(p)
    p.add_argument("--wait", type=float, default=1.0, help="seconds to collect retained status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
