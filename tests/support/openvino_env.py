"""A throwaway virtual environment with ONNX Runtime's OpenVINO build, for the OpenVINO tests.

``onnxruntime-openvino`` ships the same ``onnxruntime`` import package as ``onnxruntime``, so it
cannot live in the development venv. :data:`OPENVINO` is a :class:`LockedVenv` built from the
committed hashed export ``requirements/device-openvino.txt`` (what a device installs) under
``~/.cache/inferd/openvino-<digest>``. A build that fails for want of a network raises
:class:`RegistryUnreachableError` (the tests skip); any other failure raises
:class:`OpenVinoEnvError` (the tests fail). Imports no pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.daemon import DaemonProc
from tests.support.locked_venv import ROOT, LockedVenv, VenvBuildError
from tests.support.zoo import RegistryUnreachableError

REQUIREMENTS = ROOT / "requirements" / "device-openvino.txt"
OPENVINO = LockedVenv("openvino", REQUIREMENTS)
OpenVinoEnvError = VenvBuildError


def python() -> Path:
    """The interpreter of the OpenVINO venv, built on first use."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise RegistryUnreachableError("onnxruntime-openvino has wheels for Linux x86_64 only")
    return OPENVINO.python()


def run(args: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python args...`` in the OpenVINO venv, from the repository root; output captured."""
    python()
    return OPENVINO.run(args, timeout=timeout, **kw)


def start_daemon(tmp: Path, config: dict[str, Any]) -> DaemonProc:
    """``inferd run`` in the OpenVINO venv, ready; its output goes to ``tmp/daemon.log``."""
    python()
    return OPENVINO.start_daemon(tmp, config)
