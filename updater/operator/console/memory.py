"""What the autopilot remembers of each rollout across a restart of the console.

The signed metadata says where a rollout stands, not since when, nor the share a halted rollout
had before the halt set every share to 0, nor the failures the operator set aside by resuming.
Without those a restarted console would soak every share again from the start, resume a halted
rollout at the first step, and halt a resumed one at once on the failures already judged. So the
autopilot keeps them in ``{repo}/.console-{console id}.json``, written durably (temp file, fsync,
rename: :func:`runtime.durable.write_atomic`) whenever they change, and read at start. A file
that is missing or unreadable is one log line, and the console starts fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from runtime.durable import write_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class Remembered(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One slot's followed version, as the autopilot last saw it."""

    version: str
    seq: int
    shares: dict[str, int] | None
    """The signed shares when ``changed_ts`` was taken (None: not staged)."""
    halted: str | None
    changed_ts: float
    """Wall-clock time the signed rollout last changed: the start of the current soak."""
    halted_at: int | None = None
    """The share of all groups before the console halted it: where a resume starts again."""
    forgiven: tuple[int, int] = (0, 0)
    """(failed, attempted) when the operator last resumed."""
    decisions: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """The latest decisions on this version, newest first."""


class Memory(msgspec.Struct, frozen=True):
    schema_version: int = SCHEMA_VERSION
    rollouts: dict[str, Remembered] = msgspec.field(default_factory=dict)


def memory_path(repo_dir: str | Path, console_id: str) -> Path:
    return Path(repo_dir) / f".console-{console_id}.json"


def load(path: Path) -> dict[str, Remembered]:
    """The rollouts remembered in ``path``; empty (one log line) when missing or unreadable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("no saved rollout state at %s: starting fresh", path)
        return {}
    except OSError as err:
        log.warning("%s unreadable (%s): starting fresh, soaks start again", path, err.strerror)
        return {}
    try:
        memory = msgspec.json.decode(data, type=Memory)
    except msgspec.DecodeError as err:
        log.warning("%s unreadable (%s): starting fresh, soaks start again", path, err)
        return {}
    if memory.schema_version != SCHEMA_VERSION:
        log.warning(
            "%s has schema version %s, not %s: starting fresh, soaks start again",
            path,
            memory.schema_version,
            SCHEMA_VERSION,
        )
        return {}
    return memory.rollouts


def save(path: Path, rollouts: dict[str, Remembered]) -> None:
    """Replace ``path`` with ``rollouts`` durably; OSError when it cannot (the old file kept)."""
    write_atomic(path, msgspec.json.encode(Memory(rollouts=rollouts)), mode=0o600)
