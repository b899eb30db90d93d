"""Faults that no test can provoke on a healthy disk, for monkeypatching an ``os`` call, and the
check that a failed write left nothing behind."""

from __future__ import annotations

import os
from pathlib import Path


class Failing:
    """A stand-in for an ``os`` call that raises ``OSError(err)`` every time and records the
    arguments of each call in :attr:`calls`."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.calls: list[tuple[object, ...]] = []

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.calls.append(args)
        raise OSError(self.err, os.strerror(self.err))


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """The names in ``folder`` other than ``keep`` (temp files a failed write left), sorted."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)
