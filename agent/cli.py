"""``inferd``: the device command line (run the daemon, check a config, one-shot predict, info)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent import __version__, logsetup, tune
from agent.config import EX_CONFIG, ModelConfig, load_config
from runtime.errors import ConfigError, InputError, run_command

log = logging.getLogger(__name__)

EX_USAGE = 64
EX_SOFTWARE = 70


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.app import build_daemon

    config = load_config(args.config)
    logsetup.configure(config.log_level)
    build_daemon(config, config_path=args.config).run()
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.models)} model(s), device {config.device_id})")
    return 0


def _load_inputs(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        arr = np.load(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read input: {err}") from err
    if len(names) != 1:
        raise InputError(f"{path}: the model has {len(names)} inputs; give an .npz with each")
    return {names[0]: arr}


def _cmd_predict(args: argparse.Namespace) -> int:
    from agent.slots import ModelSlot

    config = load_config(args.config)
    slot = ModelSlot(config.model(args.model))
    slot.swap(slot.load(slot.config.path, slot.config.version))
    try:
        feeds = _load_inputs(Path(args.input), [s.name for s in slot.current.backend.inputs])
        outputs, model, _rid = slot.predict(feeds)
    finally:
        slot.close()
    if args.output:
        np.savez(args.output, **outputs)  # type: ignore[arg-type]
        print(f"wrote {', '.join(outputs)} to {args.output}")
    else:
        np.set_printoptions(threshold=50, precision=6)
        print(f"{slot.name} version {model.version}")
        for name, arr in outputs.items():
            print(f"{name} {arr.dtype} {list(arr.shape)}\n{arr}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from runtime.backends import open_backend

    path = Path(args.model_file)
    runtime = args.runtime or ("tflite" if path.suffix == ".tflite" else "onnxruntime")
    options = ModelConfig(name="info", path=str(path), runtime=runtime, warmup_runs=0)  # type: ignore[arg-type]
    backend = open_backend(path, options)
    try:
        print(f"{path}  runtime={runtime}  providers={','.join(backend.providers)}")
        for kind, specs in (("input", backend.inputs), ("output", backend.outputs)):
            for s in specs:
                shape = ["?" if d is None else d for d in s.shape]
                quant = (
                    f"  scale={s.scale} zero_point={s.zero_point}" if s.scale is not None else ""
                )
                print(f"  {kind:6} {s.name:20} {s.dtype:8} {shape}{quant}")
    finally:
        backend.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``inferd`` argument parser."""
    parser = argparse.ArgumentParser(prog="inferd", description="Edge inference daemon.")
    parser.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (exit 0 or 78)")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("predict", help="run one input through a configured model, no daemon")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--model", "-m", required=True, help="model slot name")
    p.add_argument("--input", "-i", required=True, help=".npy (one input) or .npz (by name)")
    p.add_argument("--output", "-o", help="write outputs to this .npz instead of printing")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("info", help="print a model file's inputs and outputs")
    p.add_argument("model_file")
    p.add_argument("--runtime", choices=["onnxruntime", "tflite"])
    p.set_defaults(func=_cmd_info)

    tune.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inferd`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return run_command("inferd", lambda: int(args.func(args)), {ConfigError: EX_CONFIG})


if __name__ == "__main__":
    sys.exit(main())
