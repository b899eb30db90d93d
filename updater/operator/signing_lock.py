"""One signer at a time per repository: an exclusive ``flock`` on ``{repo}/.signing.lock``.

Every change to a rollout reads the signed targets, changes one model's shares and signs a new
targets version; two processes doing that at once (a console's autopilot and an operator's
``inferctl rollout``) would each sign over the other's change. So each takes this lock, reads
the metadata again under it, and signs. The lock is the kernel's: it goes with the process that
held it, so a killed signer never leaves the repository locked.

Within one process the lock is reentrant for the thread holding it (the console holds it while
it checks the metadata, then signs through :class:`~updater.operator.rollout.RolloutDriver`,
which takes it too); other threads wait for it as other processes do.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import OperatorError

log = logging.getLogger(__name__)

LOCK_FILE = ".signing.lock"
_POLL_S = 0.05


class _Local:
    """This process's hold on one lock file."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0  # changed only by the thread holding rlock


_locals: dict[Path, _Local] = {}
_locals_guard = threading.Lock()


def lock_path(repo_dir: str | Path) -> Path:
    return Path(repo_dir).resolve() / LOCK_FILE


@contextlib.contextmanager
def signing_lock(repo_dir: str | Path, timeout: float = 60.0, who: str = "") -> Iterator[None]:
    """Hold the repository's signing lock; OperatorError when not had within ``timeout`` s.

    Waiting is one log line (naming ``who`` waits), so an operator whose ``inferctl rollout``
    seems stuck sees why.
    """
    path = lock_path(repo_dir)
    with _locals_guard:
        local = _locals.setdefault(path, _Local())
    deadline = time.monotonic() + timeout
    if not local.rlock.acquire(timeout=max(0.0, timeout)):
        raise _timed_out(path, timeout)
    try:
        if local.depth:
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OperatorError(f"{path}: cannot open the signing lock: {err.strerror}") from err
        try:
            _flock(fd, path, deadline, timeout, who)
            local.depth = 1
            try:
                yield
            finally:
                local.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        local.rlock.release()


def _flock(fd: int, path: Path, deadline: float, timeout: float, who: str) -> None:
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not waited:
            log.info(
                "%swaiting for %s: another console or inferctl is signing this repository",
                f"{who}: " if who else "",
                path,
            )
            waited = True
        if time.monotonic() >= deadline:
            raise _timed_out(path, timeout)
        time.sleep(_POLL_S)


def _timed_out(path: Path, timeout: float) -> OperatorError:
    return OperatorError(
        f"{path}: another console or inferctl held the signing lock for over {timeout:g} s"
    )
