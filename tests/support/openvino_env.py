"""A throwaway virtual environment with ONNX Runtime's OpenVINO build, for the OpenVINO tests.

``onnxruntime-openvino`` ships the same ``onnxruntime`` import package as ``onnxruntime``, so it
cannot live in the development venv. :func:`python` builds a venv from the committed hashed
export ``requirements/device-openvino.txt`` (what a device installs) under
``~/.cache/inferd/openvino-<digest>`` once, keyed by that file and the Python version, and
returns its interpreter; later runs reuse it. inferd itself is not installed there: the tests
run it from this checkout (``cwd`` and ``PYTHONPATH`` at the repository root). A build that
fails for want of a network raises :class:`RegistryUnreachableError` (the tests skip); any other
failure raises :class:`OpenVinoEnvError` (the tests fail). Imports no pytest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.daemon import DaemonProc, write_config
from tests.support.zoo import _NETWORK_WORDS, RegistryUnreachableError

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements" / "device-openvino.txt"
PIP_TIMEOUT_S = 900
"""The whole install: onnxruntime-openvino is an 85 MB wheel."""


class OpenVinoEnvError(Exception):
    """The OpenVINO venv could not be built for a reason other than the network."""


def cache_base() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferd"


def venv_dir() -> Path:
    """Where the venv for the current export and Python version lives."""
    h = hashlib.sha256(REQUIREMENTS.read_bytes())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return cache_base() / f"openvino-{h.hexdigest()[:16]}"


def _ready(venv: Path) -> bool:
    return (venv / ".complete").exists() and (venv / "bin" / "python").exists()


def python() -> Path:
    """The interpreter of the OpenVINO venv, built on first use (under a lock: pytest-xdist or
    two people's runs must not build it twice at once)."""
    venv = venv_dir()
    if _ready(venv):
        return venv / "bin" / "python"
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise RegistryUnreachableError("onnxruntime-openvino has wheels for Linux x86_64 only")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".openvino.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _ready(venv):
            _build(venv)
    return venv / "bin" / "python"


def _build(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=venv.parent, prefix=".openvino-build-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        cmd = [
            str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
            "--no-input", "--retries", "1", "--timeout", "30", "--require-hashes",
            "-r", str(REQUIREMENTS),
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise RegistryUnreachableError(
                f"registry unreachable: installing {REQUIREMENTS.name} took over {PIP_TIMEOUT_S}s"
            ) from None
        out = done.stdout + done.stderr
        if done.returncode != 0:
            last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
            what = f"pip install -r {REQUIREMENTS.name}: {last.strip()}"
            if any(word in out for word in _NETWORK_WORDS):
                raise RegistryUnreachableError(f"registry unreachable: {what}")
            raise OpenVinoEnvError(what)
        (tmp / ".complete").write_text(REQUIREMENTS.name + "\n")
        # the venv's python is a symlink and is always run as `python -m`: it can move
        os.replace(tmp, venv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def env() -> dict[str, str]:
    """The environment to run this checkout's code in the OpenVINO venv."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python args...`` in the OpenVINO venv, from the repository root; output captured."""
    return subprocess.run(
        [str(python()), *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def start_daemon(tmp: Path, config: dict[str, Any]) -> DaemonProc:
    """``inferd run`` in the OpenVINO venv (as tests.support.daemon.start_daemon does in .venv),
    ready; its output goes to ``tmp/daemon.log``."""
    path, cfg = write_config(tmp, config)
    log = open(tmp / "daemon.log", "ab")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen(
        [str(python()), "-m", "agent.cli", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env(),
    )
    log.close()
    daemon = DaemonProc(proc, path, cfg, tmp / "daemon.log")
    try:
        daemon.wait_ready(timeout=60)
    except AssertionError:
        with contextlib.suppress(AssertionError):
            daemon.stop()
        raise
    return daemon
