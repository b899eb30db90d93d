"""Store-and-forward spool: every outbound MQTT message waits here until the broker acknowledges it.

An SQLite database in WAL mode in the state dir, so a message is kept across a broker outage, a
network outage and an agent restart. Two tables:

- ``stream``: messages in the order they were put, replayed in that order. Each row says how many
  prediction records it carries; only such rows may be dropped, oldest first, when the spool is
  over ``max_bytes``, and the records dropped are counted. Events and metrics are never dropped
  (if they alone exceed the bound they are kept and a warning is logged once).
- ``latest``: one message per topic where only the newest matters (the retained ``status``);
  putting a newer one replaces the older, and the forwarder sends these before the stream.

A row is deleted only by :meth:`Spool.ack`, after the broker's QoS 1 acknowledgement.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import SpoolError

log = logging.getLogger(__name__)

_ROW_OVERHEAD = 64
"""Bytes counted per row on top of topic and payload (row header, index entry)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stream (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    records INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_droppable ON stream(id) WHERE records > 0;
CREATE TABLE IF NOT EXISTS latest (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One spooled message. ``key`` is the stream row id, or the ``latest`` sequence number."""

    key: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


def _size(topic: str, payload: bytes) -> int:
    return len(topic) + len(payload) + _ROW_OVERHEAD


class Spool:
    """A bounded, persistent, ordered outbound queue; thread-safe."""

    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        on_put: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.on_put = on_put
        """Called after every put (outside the lock): the forwarder's wake-up."""
        self._lock = threading.Lock()
        self._db = self._open()
        self.dropped_records = 0
        """Prediction records dropped because the spool was full, since this spool was opened."""
        self._over_warned = False
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0),"
                " COALESCE(MAX(id), 0) FROM stream"
            ).fetchone()
            self._messages: int = int(row[0])
            self._bytes: int = int(row[1]) + self._messages * _ROW_OVERHEAD
            self.last_id: int = int(row[2])
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0),"
                " COALESCE(MAX(seq), 0) FROM latest"
            ).fetchone()
            self._latest_count: int = int(row[0])
            self._bytes += int(row[1]) + self._latest_count * _ROW_OVERHEAD
            self.latest_seq: int = int(row[2])
        if self._messages or self._latest_count:
            log.info(
                "spool %s: %d messages (%d bytes) waiting from before",
                self.path,
                self._messages + self._latest_count,
                self._bytes,
            )

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as err:
            # A corrupt spool must not stop the agent: keep it aside for inspection, start empty.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("spool %s is unreadable (%s); moved to %s", self.path, err, aside)
            try:
                self.path.replace(aside)
                return self._connect()
            except (OSError, sqlite3.Error) as err2:
                raise SpoolError(f"spool {self.path}: cannot open: {err2}") from err2
        except OSError as err:
            raise SpoolError(f"spool {self.path}: cannot open: {err}") from err

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            # Prediction batches are blobs of 100+ KB: with 16 KB pages storing and deleting one
            # walks a quarter of the overflow pages it takes at the default 4 KB (measured: half
            # the time). Only a new file takes it; an existing spool keeps its page size.
            db.execute("PRAGMA page_size=16384")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Debian builds SQLite with SECURE_DELETE: every acknowledged batch would be written
            # again as zeros (a third of the spool's time, and flash wear). FAST still purges
            # b-tree pages; freed overflow pages keep old telemetry until reused, data of the
            # kind the spool holds in its live rows anyway.
            db.execute("PRAGMA secure_delete=FAST")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM stream").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # --- producers ----------------------------------------------------------------------------

    def put(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, records: int = 0
    ) -> bool:
        """Queue a message at the end of the stream; False when it was dropped (spool full).

        ``records`` > 0 marks a batch of that many prediction records: the only kind of message
        that may be dropped to stay within ``max_bytes``.
        """
        size = _size(topic, payload)
        with self._lock:
            try:
                if self._bytes + size > self.max_bytes and not self._make_room(size, records):
                    return False
                cur = self._db.execute(
                    "INSERT INTO stream (topic, payload, qos, retain, records)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), records),
                )
            except sqlite3.Error as err:
                raise SpoolError(f"spool {self.path}: cannot store a message: {err}") from err
            self.last_id = cur.lastrowid or self.last_id
            self._messages += 1
            self._bytes += size
        if self.on_put is not None:
            self.on_put()
        return True

    def _make_room(self, size: int, records: int) -> bool:
        """Drop the oldest prediction batches until ``size`` fits; called with the lock held."""
        need = self._bytes + size - self.max_bytes
        last = victims = freed = dropped = 0
        for row_id, row_size, row_records in self._db.execute(
            "SELECT id, LENGTH(topic) + LENGTH(payload), records FROM stream"
            " WHERE records > 0 ORDER BY id"
        ):
            if freed >= need:
                break
            last = row_id
            victims += 1
            freed += row_size + _ROW_OVERHEAD
            dropped += row_records
        if freed < need and records > 0:
            # Even dropping every older batch leaves no room: this batch is the one to drop.
            self.dropped_records += records
            return False
        if victims:
            self._db.execute("DELETE FROM stream WHERE records > 0 AND id <= ?", (last,))
            self._messages -= victims
            self._bytes -= freed
            self.dropped_records += dropped
        if freed < need and not self._over_warned:
            self._over_warned = True
            log.warning(
                "spool %s holds more than %d bytes of events/metrics that are never dropped",
                self.path,
                self.max_bytes,
            )
        return True

    def put_latest(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        """Queue the newest message for ``topic``, replacing an unsent older one."""
        with self._lock:
            self.latest_seq += 1
            try:
                old = self._db.execute(
                    "SELECT LENGTH(topic) + LENGTH(payload) FROM latest WHERE topic = ?", (topic,)
                ).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO latest (topic, payload, qos, retain, seq)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, qos, int(retain), self.latest_seq),
                )
            except sqlite3.Error as err:
                raise SpoolError(f"spool {self.path}: cannot store a message: {err}") from err
            if old is not None:
                self._bytes -= old[0] + _ROW_OVERHEAD
            else:
                self._latest_count += 1
            self._bytes += _size(topic, payload)
        if self.on_put is not None:
            self.on_put()

    # --- the forwarder ------------------------------------------------------------------------

    def read(self, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` stream messages with id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM stream"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Message(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def latest(self) -> list[Message]:
        """Every queued latest-value message (key = its sequence number)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM latest ORDER BY seq"
            ).fetchall()
        return [Message(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete stream messages the broker has acknowledged."""
        ids = list(ids)
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._lock:
            try:
                rows = self._db.execute(
                    f"DELETE FROM stream WHERE id IN ({marks})"  # noqa: S608 - only '?' marks
                    " RETURNING LENGTH(topic) + LENGTH(payload)",
                    ids,
                ).fetchall()
            except sqlite3.Error as err:
                raise SpoolError(f"spool {self.path}: cannot delete messages: {err}") from err
            self._messages -= len(rows)
            self._bytes -= sum(r[0] for r in rows) + len(rows) * _ROW_OVERHEAD

    def ack_latest(self, topic: str, seq: int) -> None:
        """Delete a latest-value message unless a newer one replaced it meanwhile."""
        with self._lock:
            row = self._db.execute(
                "SELECT LENGTH(topic) + LENGTH(payload) FROM latest WHERE topic = ? AND seq = ?",
                (topic, seq),
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM latest WHERE topic = ? AND seq = ?", (topic, seq))
            self._latest_count -= 1
            self._bytes -= row[0] + _ROW_OVERHEAD

    # --- state --------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages waiting for an acknowledgement (stream and latest)."""
        return self._messages + self._latest_count

    @property
    def size_bytes(self) -> int:
        """Bytes the queued messages count against ``max_bytes``."""
        return self._bytes

    def close(self) -> None:
        """Checkpoint and close the database."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as err:
                log.warning("spool %s: checkpoint failed: %s", self.path, err)
            self._db.close()
