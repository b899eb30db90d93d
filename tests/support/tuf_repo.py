"""A real signed TUF repository (``inferctl``'s OperatorRepository) on a real HTTP server.

``new_repo`` makes a fresh repository with root/targets/snapshot/timestamp keys, served on a
free port by the operator's ``RepositoryServer``. The server can misbehave on purpose for attack
tests: send endless data, drip bytes slowly, or answer a path with other bytes. ``new_device``
builds a device: a real ModelSlot serving an ONNX model, adapted and driven by a DeviceUpdater
that trusts the repository's first root.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ModelConfig
from agent.slots import ModelSlot
from agent.updates import SlotAdapter
from updater.device.client import RepositoryClient
from updater.device.config import UpdatesConfig
from updater.device.updater import DeviceUpdater
from updater.meta import ModelMeta
from updater.operator.repository import OperatorRepository
from updater.operator.serve import RepositoryServer


class FaultyServer(RepositoryServer):
    """The operator's repository server over a repository's public folder, with faults.

    ``faults[suffix] = "endless" | "slow" | bytes``: a request whose path ends with ``suffix``
    gets an endless stream, a byte every 50 ms, or those bytes instead of the file.
    """

    def __init__(self, directory: Path) -> None:
        self.faults: dict[str, Any] = {}
        self.requests: list[str] = []
        self.stopping = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                for suffix, fault in server.faults.items():
                    if self.path.endswith(suffix):
                        self._fault(fault)
                        return
                super().do_GET()

            def _fault(self, fault: Any) -> None:
                self.send_response(200)
                if isinstance(fault, bytes):
                    self.send_header("Content-Length", str(len(fault)))
                    self.end_headers()
                    self.wfile.write(fault)
                    return
                self.end_headers()
                chunk = b"\0" * (64 * 1024) if fault == "endless" else b"\0"
                try:
                    while not server.stopping.is_set():
                        self.wfile.write(chunk)
                        if fault == "slow":
                            time.sleep(0.05)
                except OSError:
                    pass

        super().__init__(directory, handler=Handler)
        self.start()

    def stop(self) -> None:
        self.stopping.set()
        super().stop()


@dataclass
class TufRepo:
    repo: OperatorRepository
    server: FaultyServer
    trusted_root: Path
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def publish(self, model: Path, version: str, name: str = "classifier", **kw: Any) -> ModelMeta:
        return self.repo.add_model(model, name=name, version=version, **kw)

    def metadata(self, name: str) -> Path:
        return self.repo.metadata_dir / name

    def target_file(self, meta: ModelMeta) -> Path:
        """The served artifact file of a published model."""
        (path,) = [p for p, _, m in self.repo.models() if m.seq == meta.seq]
        target = self.repo.targets().targets[path]
        d, _, base = path.rpartition("/")
        return self.repo.targets_dir / d / f"{target.hashes['sha256']}.{base}"


@dataclass
class Device:
    """A device under test: one slot, its updater, and every event it emitted."""

    slot: ModelSlot
    updater: DeviceUpdater
    state_dir: Path
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def emit(self, kind: str, message: str, **fields: Any) -> None:
        self.events.append((kind, message, fields))

    @property
    def version(self) -> str:
        return self.slot.current.version

    def check(self) -> None:
        """One synchronous update check, run to the end (idle)."""
        self.updater.request_check("test")
        self.updater.run_pending()

    def states(self) -> list[str]:
        return [f["state"] for k, _, f in self.events if k == "update"]

    def messages(self, kind: str) -> list[str]:
        return [m for k, m, _ in self.events if k == kind]

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outputs, _, _ = self.slot.predict({"x": x})
        return outputs


def new_repo(base: Path, **init_kwargs: Any) -> TufRepo:
    """A repository in ``base/repo`` (``init_kwargs``: keys, thresholds, expiry), served over HTTP.

    The trusted root a device starts from is a copy of root v1 in ``base``. Stop ``.server``.
    """
    repo = OperatorRepository.init(base / "repo", **init_kwargs)
    trusted = base / "trusted-root.json"
    shutil.copyfile(repo.metadata_dir / "1.root.json", trusted)
    return TufRepo(repo, FaultyServer(repo.public_dir), trusted, base)


def new_device(
    initial: Path,
    tuf: TufRepo,
    state: Path,
    *,
    groups: tuple[str, ...] = (),
    device_id: str = "test-device",
    url: str | None = None,
    max_download_bytes: int = 64 * 1024 * 1024,
    **settings: Any,
) -> Device:
    """A device serving ``initial`` as version 1 whose updater trusts ``tuf``'s first root.

    ``settings`` are :class:`UpdatesConfig` fields (default: no trial window, 5 validation
    runs). Stop ``.updater`` and close ``.slot`` at the end.
    """
    slot = ModelSlot(ModelConfig(name="classifier", path=str(initial)))
    slot.swap(slot.load(initial, "1"))
    client = RepositoryClient(
        url or tuf.url,
        tuf.trusted_root,
        state,
        max_download_bytes=max_download_bytes,
        socket_timeout=2,
    )
    opts: dict[str, Any] = {"trial_window_s": 0.0, "validation_runs": 5}
    device = Device(slot, None, state)  # type: ignore[arg-type]
    device.updater = DeviceUpdater(
        client=client,
        state_dir=state,
        slots={"classifier": SlotAdapter(slot)},
        groups=groups,
        device_id=device_id,
        settings=UpdatesConfig(**(opts | settings)),
        emit=device.emit,
    )
    device.updater.boot_plan()
    return device
