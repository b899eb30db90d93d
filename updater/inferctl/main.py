"""``inferctl``: the operator's command line.

Each command group lives in its own module and adds itself through ``register(subparsers)``;
this module only assembles them and turns inferd errors into one line and an exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from runtime.errors import run_command
from updater.inferctl import console, lifecycle, repo, rollout, watch

# Modules that provide inferctl commands, each with ``register(subparsers) -> None``.
# A command's parser sets ``func`` to a callable taking the parsed args and returning an exit code.
COMMAND_MODULES = (console, lifecycle, repo, rollout, watch)


def build_parser() -> argparse.ArgumentParser:
    """The full inferctl argument parser."""
    parser = argparse.ArgumentParser(prog="inferctl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inferctl`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run_command("inferctl", lambda: int(args.func(args)), {})


if __name__ == "__main__":
    sys.exit(main())
