"""The store-and-forward spool: order, persistence, the byte bounds, what it may drop, and what
it does about a full disk and damaged pages."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from runtime.errors import SpoolError
from telemetry.spool import CORRUPT_LIMIT, Kind, Spool, SpoolFullError
from tests.support.spool import corrupt_pages, spool_with_a_big_row

MAX = 64 * 1024


def test_messages_come_back_in_order_and_ack_deletes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", MAX)
    for i in range(10):
        spool.put("t/events", f"e{i}".encode())
    first = spool.read(0, 4)
    assert [m.payload for m in first] == [b"e0", b"e1", b"e2", b"e3"]
    assert spool.read(first[-1].key, 100)[0].payload == b"e4"
    spool.ack([m.key for m in first])
    assert spool.pending == 6
    assert [m.payload for m in spool.read(0, 100)] == [f"e{i}".encode() for i in range(4, 10)]
    spool.close()


def test_unsent_messages_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, MAX)
    for i in range(5):
        spool.put("t/events", f"e{i}".encode())
    spool.put_latest("t/status", b"online")
    spool.ack([spool.read(0, 1)[0].key])
    size = spool.size_bytes
    spool.close()
    again = Spool(path, MAX)
    assert again.pending == 5 and again.size_bytes == size
    assert [m.payload for m in again.read(0, 10)] == [b"e1", b"e2", b"e3", b"e4"]
    assert [m.payload for m in again.latest()] == [b"online"]
    # ids keep growing after a reopen: a new message never sorts before an old one
    again.put("t/events", b"e5")
    assert again.read(0, 10)[-1].payload == b"e5"
    again.close()


def test_full_spool_drops_only_prediction_batches_oldest_first_and_counts_records(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "s.sqlite", MAX)
    batch = b"p" * 4000
    for i in range(10):
        assert spool.put("t/predictions", batch + bytes([i]), records=100)
        assert spool.put("t/events", f"e{i}".encode() * 50)
    assert spool.dropped_records == 0
    for i in range(10, 30):
        spool.put("t/predictions", batch + bytes([i]), records=100)
        spool.put("t/events", f"e{i}".encode() * 50)
    assert spool.size_bytes <= MAX
    kept = spool.read(0, 1000)
    events = [m for m in kept if m.topic == "t/events"]
    batches = [m.payload[-1] for m in kept if m.topic == "t/predictions"]
    assert len(events) == 30  # never dropped
    assert batches == list(range(30 - len(batches), 30))  # the newest survive, in order
    assert spool.dropped_records == (30 - len(batches)) * 100


def test_events_are_kept_past_the_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", MAX)
    for i in range(40):
        spool.put("t/events", b"x" * 2000 + bytes([i]))
    assert spool.pending == 40 and spool.size_bytes > MAX
    # a prediction batch that cannot fit is the one dropped
    assert not spool.put("t/predictions", b"p" * 100, records=7)
    assert spool.dropped_records == 7 and spool.pending == 40


def test_latest_replaces_an_unsent_older_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", MAX)
    spool.put_latest("t/status", b"one")
    sent = spool.latest()[0]
    spool.put_latest("t/status", b"two")
    assert [m.payload for m in spool.latest()] == [b"two"] and spool.pending == 1
    spool.ack_latest("t/status", sent.key)  # the ack of "one" must not delete "two"
    assert [m.payload for m in spool.latest()] == [b"two"]
    spool.ack_latest("t/status", spool.latest()[0].key)
    assert spool.pending == 0 and spool.size_bytes == 0


def test_a_corrupt_spool_is_moved_aside_and_the_agent_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not an sqlite database" * 100)
    spool = Spool(path, MAX)
    assert spool.pending == 0
    spool.put("t/events", b"fresh")
    assert [m.payload for m in spool.read(0, 1)] == [b"fresh"]
    assert len(list(tmp_path.glob("s.sqlite.corrupt-*"))) == 1


def test_feedback_stays_within_its_share_and_every_drop_is_counted(tmp_path: Path) -> None:
    drops: list[tuple[Kind, int, int]] = []
    spool = Spool(
        tmp_path / "s.sqlite", MAX, feedback_share=0.25, on_drop=lambda *d: drops.append(d)
    )
    share = spool.feedback_max_bytes
    for i in range(20):
        assert spool.put("t/feedback", b"f" * 3000 + bytes([i]), kind=Kind.FEEDBACK)
        spool.put("t/events", b"e" * 100)
    assert spool.kind_bytes(Kind.FEEDBACK) <= share
    kept = [m.payload[-1] for m in spool.read(0, 1000) if m.topic == "t/feedback"]
    assert kept == list(range(20 - len(kept), 20))  # the newest, in order
    assert spool.dropped_feedback == 20 - len(kept) == sum(d[1] for d in drops)
    assert all(d[0] == Kind.FEEDBACK for d in drops)
    # one feedback log bigger than the whole share is dropped at once (the 34.5 MB case)
    assert not spool.put("t/feedback", b"x" * (share + 1), kind=Kind.FEEDBACK)
    assert spool.dropped_feedback == 21 - len(kept)
    assert len([m for m in spool.read(0, 1000) if m.topic == "t/events"]) == 20


def test_kept_rows_stop_at_the_hard_cap_with_one_report(tmp_path: Path) -> None:
    full: list[int] = []
    spool = Spool(tmp_path / "s.sqlite", MAX, hard_max_bytes=2 * MAX, on_full=full.append)
    spool.put("t/predictions", b"p" * 5000, records=10)
    stored = 0
    while spool.put("t/events", b"e" * 4000):
        stored += 1
    assert spool.size_bytes <= 2 * MAX and stored >= (2 * MAX - 5000) // 4100 - 1
    assert spool.dropped_records == 10  # the prediction batch went first
    assert not spool.put("t/events", b"e" * 4000)
    assert full == [1] and spool.refused_kept == 2  # reported once, counted every time
    assert spool.put("t/events", b"the spool-full event", force=True)
    spool.ack([m.key for m in spool.read(0, 1000)])  # the broker took the backlog
    assert spool.put("t/events", b"again") and spool.size_bytes < MAX


def test_a_full_disk_is_a_spool_full_error_and_nothing_is_stored(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", 64 * MAX)
    spool.put("t/events", b"before")
    # SQLite's own page limit gives the same SQLITE_FULL a full filesystem does
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(SpoolFullError, match="disk is full"):
        for _ in range(20):
            spool.put("t/feedback", b"f" * 50_000, kind=Kind.FEEDBACK)
    assert next(m.payload for m in spool.read(0, 10)) == b"before"
    assert spool.resets == 0  # a full disk is not corruption


def test_corrupt_pages_found_while_reading_replace_the_spool(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool_with_a_big_row(path)
    corrupt_pages(path, 8, 10)  # inside the big row's overflow chain
    resets: list[tuple[Path, str]] = []
    spool = Spool(path, 1 << 20, on_reset=lambda aside, why: resets.append((aside, why)))
    assert spool.pending == 7  # counting rows does not read payloads: the damage shows later
    for _ in range(CORRUPT_LIMIT):
        with pytest.raises(SpoolError, match="malformed"):
            spool.read(0, 10)
    assert spool.resets == 1 and spool.pending == 0 and spool.generation == 1
    assert len(resets) == 1 and resets[0][0].exists() and "malformed" in resets[0][1]
    spool.put("t/events", b"fresh")
    assert [m.payload for m in spool.read(0, 10)] == [b"fresh"]
    spool.close()
    again = Spool(path, 1 << 20)  # after a restart the bad row is gone for good
    assert [m.payload for m in again.read(0, 10)] == [b"fresh"]
    again.close()


def test_a_spool_from_before_kinds_and_sizes_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE stream (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
        " records INTEGER NOT NULL);"
        "CREATE TABLE latest (topic TEXT PRIMARY KEY, payload BLOB NOT NULL,"
        " qos INTEGER NOT NULL, retain INTEGER NOT NULL, seq INTEGER NOT NULL);"
        "INSERT INTO stream (topic, payload, qos, retain, records)"
        " VALUES ('t/predictions', x'00ff', 1, 0, 5), ('t/events', x'01', 1, 0, 0);"
    )
    db.commit()
    db.close()
    spool = Spool(path, MAX)
    assert (
        spool.pending == 2 and spool.kind_bytes(Kind.PREDICTIONS) == len("t/predictions") + 2 + 64
    )
    assert [m.payload for m in spool.read(0, 10)] == [b"\x00\xff", b"\x01"]
    spool.ack([1, 2])
    assert spool.size_bytes == 0
