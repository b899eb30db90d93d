"""The validation gate and a hot swap on a chosen execution provider list, in one process.

``python -m tests.support.gate_probe --providers openvino,cpu --state DIR`` is what the OpenVINO
tests and ``bench.check_gpu`` run inside a venv with that provider (the main venv's onnxruntime
has none). It serves examples/models/demo.onnx as version 1 in a real ``ModelSlot``, then
loads demo-v2.onnx as a candidate on the same providers and runs the device's validation gate
(:func:`updater.device.validation.validate`) twice: against demo.golden.npz, which must be
refused, and against demo-v2.golden.npz, which must pass. The passing candidate is swapped in
while a thread keeps predicting; every prediction must succeed. It prints one JSON object:
the providers each model really used, the gate's answers, the swap's counts and the outputs of
version 2 after the swap. Imports no pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import ModelConfig
from agent.slots import ModelSlot
from agent.updates import LoadedCandidate
from runtime import bundle
from runtime.errors import InferdError, ValidationError
from runtime.tensors import Signature
from updater.device.validation import validate
from updater.meta import ModelMeta

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"


def _golden(name: str) -> bundle.Golden:
    return bundle.read_golden(MODELS / name, ["x"], ["probs"])


def probe(providers: tuple[str, ...], state: Path, fp16: bool = False) -> dict[str, Any]:
    cfg = ModelConfig(
        name="classifier",
        path=str(MODELS / "demo.onnx"),
        providers=providers,  # type: ignore[arg-type]
        tensorrt_fp16=fp16,
        max_concurrency=4,
    )
    slot = ModelSlot(cfg, cache_dir=state / "cache" / "classifier")
    slot.swap(slot.load(cfg.path, "1"))
    out: dict[str, Any] = {"serving": list(slot.current.backend.providers)}
    serving_sig = Signature.from_json(slot.current.backend.signature())

    def gate(golden: str) -> tuple[LoadedCandidate | None, Any]:
        cand = LoadedCandidate(slot.load(MODELS / "demo-v2.onnx", "2"))
        meta = ModelMeta(
            name="classifier",
            version="2",
            seq=2,
            runtime="onnxruntime",
            signature=Signature.from_json(cand.signature()),
            # fp16 engines round to ~3 significant digits; the operator signs the tolerance
            rtol="1e-2" if fp16 else "1e-3",
            atol="1e-2" if fp16 else "1e-4",
        )
        try:
            report = validate(cand, meta, serving_sig, bundle.golden_bytes(_golden(golden)))
        except ValidationError as err:
            cand.close()
            return None, str(err)
        return cand, report.to_json()

    _, out["wrong_golden"] = gate("demo.golden.npz")
    cand, out["report"] = gate("demo-v2.golden.npz")
    if cand is None:
        return out
    out["candidate"] = list(cand.model.backend.providers)
    x = _golden("demo-v2.golden.npz").inputs["x"]
    counts = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                slot.predict({"x": x})
                counts["ok"] += 1
            except InferdError:
                counts["failed"] += 1

    worker = threading.Thread(target=load, name="gate-probe-load")
    worker.start()
    try:
        time.sleep(0.2)  # requests in flight on version 1 when the swap comes
        slot.swap(cand.model)
        time.sleep(0.2)
    finally:
        stop.set()
        worker.join()
    out["swap"] = counts
    outputs, served_by, _ = slot.predict({"x": x})
    out["after_swap"] = {"version": served_by.version, "probs": outputs["probs"].tolist()}
    slot.close()
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--providers", required=True, help="e.g. tensorrt,cuda,cpu")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--fp16", action="store_true", help="TensorRT fp16 kernels")
    args = parser.parse_args(argv)
    result = probe(tuple(args.providers.split(",")), args.state, args.fp16)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
