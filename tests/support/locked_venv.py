"""A throwaway virtual environment installed from one of the committed hashed lock exports.

Some runtimes cannot share the development venv: ``onnxruntime-openvino`` and
``onnxruntime-gpu`` ship the same ``onnxruntime`` import package as ``onnxruntime``. A
:class:`LockedVenv` builds a venv from ``requirements/<name>.txt`` (what a device installs) once,
under ``~/.cache/inferd/<name>-<digest>`` keyed by that file, the Python version and ``extra``
(more pip arguments: packages outside the lock), and runs this checkout's code in it (``cwd``
and ``PYTHONPATH`` at the repository root; inferd itself is not installed there). A build that
fails for want of a network raises :class:`RegistryUnreachableError`; any other failure raises
:class:`VenvBuildError`. Imports no pytest.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.daemon import DaemonProc, start_daemon
from tests.support.zoo import cache_base, run_pip

ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 1800
"""One pip install: the GPU set is about 2 GB of CUDA libraries."""


class VenvBuildError(Exception):
    """The venv could not be built for a reason other than the network."""


@dataclass(frozen=True)
class LockedVenv:
    """A venv from ``requirements`` (a hashed export; None: none), then ``extra`` pip installs."""

    name: str
    requirements: Path | None
    extra: tuple[tuple[str, ...], ...] = ()
    """Further ``pip install`` argument lists run after the locked set (not hash-checked)."""
    base: Path = field(default_factory=cache_base)

    @property
    def path(self) -> Path:
        h = hashlib.sha256(self.requirements.read_bytes() if self.requirements else b"")
        h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
        h.update(repr(self.extra).encode())
        return self.base / f"{self.name}-{h.hexdigest()[:16]}"

    def ready(self) -> bool:
        return (self.path / ".complete").exists() and (self.path / "bin" / "python").exists()

    def python(self) -> Path:
        """The venv's interpreter, built on first use (under a lock: two runs at once must not
        build it twice)."""
        venv = self.path
        if self.ready():
            return venv / "bin" / "python"
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(venv.parent / f".{self.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.ready():
                self._build(venv)
        return venv / "bin" / "python"

    def _build(self, venv: Path) -> None:
        shutil.rmtree(venv, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=venv.parent, prefix=f".{self.name}-build-"))
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True
            )
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install",
                   "--disable-pip-version-check", "--no-input", "--retries", "1",
                   "--timeout", "30"]  # fmt: skip
            if self.requirements is not None:
                req = str(self.requirements)
                _pip([*pip, "--require-hashes", "-r", req], self.requirements.name)
            for args in self.extra:
                _pip([*pip, *args], " ".join(args))
            (tmp / ".complete").write_text(repr(self.extra) + "\n")
            # the venv's python is a symlink and is always run as `python -m`: it can move
            os.replace(tmp, venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to run this checkout's code in the venv."""
        return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(extra or {})}

    def run(
        self,
        args: Sequence[str],
        timeout: float = 300,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """``python args...`` in the venv, from the repository root; output captured."""
        return subprocess.run(
            [str(self.python()), *args],
            cwd=ROOT,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )

    def start_daemon(
        self,
        tmp: Path,
        config: dict[str, Any],
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> DaemonProc:
        """``inferd run`` in the venv (as tests.support.daemon.start_daemon does in .venv),
        ready; its output goes to ``tmp/daemon.log``."""
        extra = {"PYTHONPATH": str(ROOT), **(env or {})}
        return start_daemon(tmp, config, extra, python=self.python(), timeout=timeout)


def _pip(cmd: list[str], what: str) -> None:
    run_pip(cmd, f"pip install {what}", PIP_TIMEOUT_S, VenvBuildError)
