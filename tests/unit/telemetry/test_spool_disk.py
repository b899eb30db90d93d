"""The spool on a disk that fills up for real (a small tmpfs): the write error is one clear
SpoolFullError, nothing already stored is lost, and the spool takes messages again once the disk
has room (acknowledged rows freed, other files deleted)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from telemetry.spool import Kind, Spool, SpoolFullError
from tests.support.tmpfs import fill

BIG = 1 << 30
"""A spool bound no test reaches: the disk is what fills up."""


@pytest.fixture
def disk(tmpfs_factory: Callable[[str, str], Path]) -> Path:
    return tmpfs_factory("disk", "1m")


def _payloads(spool: Spool) -> list[bytes]:
    return [m.payload for m in spool.read(0, 100_000)]


def test_a_full_disk_refuses_the_next_message_and_keeps_every_stored_one(disk: Path) -> None:
    """The spool itself fills the disk. Even an acknowledgement needs a page of the WAL, so
    until something frees space the acked rows stay and are sent again (QoS 1 allows the
    duplicates); nothing is lost either way."""
    path = disk / "spool.sqlite"
    reserve = disk / "reserve"  # space the operator frees later (logs, old files)
    reserve.write_bytes(b"\0" * 128 * 1024)
    spool = Spool(path, BIG)
    stored: list[bytes] = []
    with pytest.raises(SpoolFullError) as caught:
        for i in range(10_000):
            payload = b"event %05d " % i + b"e" * 8000
            spool.put("inferd/d/events", payload)
            stored.append(payload)
    assert str(caught.value) == f"spool {path}: cannot store a message: the disk is full"
    assert "\n" not in str(caught.value)
    assert len(stored) > 5, "the disk held some messages before it was full"
    assert _payloads(spool) == stored, "every message stored before is there, in order"
    assert spool.pending == len(stored) and spool.resets == 0
    # predictions are refused the same way: the disk, not the spool's bound, is full
    with pytest.raises(SpoolFullError):
        spool.put("inferd/d/predictions", b"p" * 8000, records=10, kind=Kind.PREDICTIONS)
    with pytest.raises(SpoolFullError, match="cannot delete messages: the disk is full"):
        spool.ack([m.key for m in spool.read(0, 10)])
    assert _payloads(spool) == stored, "a failed acknowledgement deletes nothing"
    spool.close()
    again = Spool(path, BIG)
    assert _payloads(again) == stored, "and after a restart"
    reserve.unlink()
    again.ack([m.key for m in again.read(0, 10)])
    again.put("inferd/d/events", b"after the outage")
    assert _payloads(again) == [*stored[10:], b"after the outage"]
    again.close()


def test_a_disk_full_of_other_files_refuses_and_recovers_when_space_is_freed(disk: Path) -> None:
    path = disk / "spool.sqlite"
    spool = Spool(path, BIG)
    spool.put("inferd/d/events", b"before")
    filler = fill(disk)
    with pytest.raises(SpoolFullError, match="the disk is full"):
        for _ in range(100):
            spool.put("inferd/d/events", b"x" * 20_000)
    assert _payloads(spool)[0] == b"before"
    filler.unlink()
    spool.put("inferd/d/events", b"space again")
    assert _payloads(spool)[-1] == b"space again"
    spool.close()
    assert _payloads(Spool(path, BIG))[0] == b"before"
