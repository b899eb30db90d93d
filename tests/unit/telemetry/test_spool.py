"""The store-and-forward spool: order, persistence, the byte bound and what it may drop."""

from __future__ import annotations

from pathlib import Path

from telemetry.spool import Spool

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
