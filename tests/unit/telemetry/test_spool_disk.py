"""The spool on a disk that fills up for real (a small tmpfs): the write error is one clear
SpoolFullError, nothing already stored is lost, acknowledgements still delete, and the spool
takes messages again once it has room (acknowledged rows freed, other files deleted)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from telemetry.spool import RESERVE_BYTES, Kind, Spool, SpoolFullError
from tests.support.tmpfs import fill

BIG = 1 << 30
"""A spool bound no test reaches: the disk is what fills up."""


@pytest.fixture
def disk(tmpfs_factory: Callable[[str, str], Path]) -> Path:
    return tmpfs_factory("disk", "4m")


def _payloads(spool: Spool) -> list[bytes]:
    return [m.payload for m in spool.read(0, 100_000)]


def test_a_full_disk_refuses_the_next_message_and_keeps_every_stored_one(disk: Path) -> None:
    """The spool itself fills the disk: it stops taking messages at DISK_FLOOR_BYTES free and
    none stored is lost. Acknowledgements still delete (a delete is written to SQLite's log
    first: it failed on a disk filled to the last byte, and telemetry stayed stuck), and the
    rows they free take new messages without anyone freeing space."""
    path = disk / "spool.sqlite"
    spool = Spool(path, BIG)
    reserve = disk / "spool.sqlite.reserve"
    assert reserve.stat().st_size == RESERVE_BYTES
    stored: list[bytes] = []
    with pytest.raises(SpoolFullError) as caught:
        for i in range(10_000):
            payload = b"event %05d " % i + b"e" * 8000
            spool.put("inferd/d/events", payload)
            stored.append(payload)
    assert str(caught.value) == (
        f"spool {path}: cannot store a message: the disk is full (under 1024 KB free)"
    )
    assert len(stored) > 5, "the disk held messages before it was full"
    assert _payloads(spool) == stored, "every message stored before is there, in order"
    assert spool.pending == len(stored) and spool.resets == 0
    # predictions and the status are refused the same way: the disk, not a bound, is full
    with pytest.raises(SpoolFullError):
        spool.put("inferd/d/predictions", b"p" * 8000, records=10, kind=Kind.PREDICTIONS)
    with pytest.raises(SpoolFullError):
        spool.put_latest("inferd/d/status", b"s" * 8000)
    spool.ack([m.key for m in spool.read(0, 10)])
    assert reserve.exists(), "the floor left room for the delete: the reserve is not needed"
    assert _payloads(spool) == stored[10:]
    spool.put("inferd/d/events", b"after the outage")  # into pages the acknowledgements freed
    assert _payloads(spool) == [*stored[10:], b"after the outage"]
    spool.close()
    again = Spool(path, BIG)
    assert _payloads(again) == [*stored[10:], b"after the outage"], "and after a restart"
    again.ack([m.key for m in again.read(0, 100_000)])
    assert _payloads(again) == [] and again.pending == 0
    again.close()


def test_a_disk_full_of_other_files_refuses_and_recovers_when_space_is_freed(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another file takes the last byte: the spool refuses new messages, gives up its reserve
    so that acknowledgements still delete, and takes messages again once space is freed."""
    path = disk / "spool.sqlite"
    reserve = disk / "spool.sqlite.reserve"
    spool = Spool(path, BIG)
    for i in range(20):
        spool.put("inferd/d/events", b"before %d " % i + b"b" * 8000)
    spool.close()  # a restart: the write-ahead log is checkpointed and emptied
    spool = Spool(path, BIG)
    filler = fill(disk)
    with pytest.raises(SpoolFullError, match="the disk is full"):
        for _ in range(100):
            spool.put("inferd/d/events", b"x" * 20_000)
    assert len(_payloads(spool)) == 20
    with caplog.at_level(logging.WARNING, logger="telemetry.spool"):
        spool.ack([m.key for m in spool.read(0, 5)])
    assert "the disk is full; its 256 KB reserve is freed" in caplog.text
    assert not reserve.exists()
    left = _payloads(spool)
    assert len(left) == 15 and left[0].startswith(b"before 5 "), "only the acknowledged go"
    filler.unlink()
    spool.put("inferd/d/events", b"space again")
    assert _payloads(spool)[-1] == b"space again"
    spool.close()
    again = Spool(path, BIG)
    assert len(_payloads(again)) == 16 and reserve.exists(), "the reserve is made again"
    again.close()
