"""A small tmpfs mounted for a test: a disk that really fills up (ENOSPC from the kernel, not a
mock). Needs root and ``mount``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs (a disk that fills up for real) needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """``path`` as a tmpfs of ``size`` (mount's syntax: ``256k``); unmounted on exit.

    RuntimeError with mount's message when mounting is refused (a container without
    CAP_SYS_ADMIN): callers skip with it.
    """
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(path: Path) -> Path:
    """Write a file in ``path`` until the filesystem is full; returns it (delete to free)."""
    filler = path / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    return filler
