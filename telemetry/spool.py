"""Store-and-forward spool: every outbound MQTT message waits here until the broker acknowledges it.

An SQLite database in WAL mode in the state dir, so a message is kept across a broker outage, a
network outage and an agent restart. Two tables:

- ``stream``: messages in the order they were put, replayed in that order. Each row has a
  :class:`Kind`. Over ``max_bytes`` the oldest droppable rows go first: prediction batches (the
  records they carry are counted), then feedback logs. Feedback also has its own share of the
  bound (``feedback_share``), so labels sent while the broker is away cannot crowd out
  predictions, nor outgrow the spool (each row dropped is counted and reported through
  ``on_drop``). Events and metrics are kept past ``max_bytes`` up to ``hard_max_bytes``; beyond
  that they are refused too, counted, and ``on_full`` is called once until the spool drains.
- ``latest``: one message per topic where only the newest matters (the retained ``status``);
  putting a newer one replaces the older, and the forwarder sends these before the stream.

A row is deleted only by :meth:`Spool.ack`, after the broker's QoS 1 acknowledgement.

Every SQLite error becomes a :class:`~runtime.errors.SpoolError`. Corruption (a damaged page, a
file that is no longer a database) repeated :data:`CORRUPT_LIMIT` times in a row moves the file
aside (kept for inspection) and starts an empty spool, reported through ``on_reset``: telemetry
then flows again instead of stopping at the damaged row after every restart.

A full disk refuses new messages (:class:`~runtime.errors.SpoolFullError`) and loses none. It
must not also refuse the deletes that make room (SQLite writes a delete to its write-ahead log
first), so the spool stops taking messages that need new disk space at :data:`DISK_FLOOR_BYTES`
free (the pages acknowledged messages freed are still used), and when something else fills the
disk it gives up :data:`RESERVE_BYTES` it keeps in a file beside it; the file comes back once
the disk has room again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import SpoolError

log = logging.getLogger(__name__)

_ROW_OVERHEAD = 64
"""Bytes counted per row on top of topic and payload (row header, index entry)."""
CORRUPT_LIMIT = 3
"""Corruption errors in a row after which the spool file is moved aside and started afresh."""
DISK_FLOOR_BYTES = 1024 * 1024
"""Below this much free disk space, a message that needs new space (more than the spool's free
pages hold) is refused as if the disk were full: the spool never fills its own disk to the last
byte, where even deleting acknowledged messages fails."""
RESERVE_BYTES = 256 * 1024
"""Disk space kept in ``<spool>.reserve`` for deleting acknowledged messages on a full disk
(an acknowledgement's delete writes a few 16 KB pages to the write-ahead log)."""
RESERVE_RETRY_S = 60.0
"""How often, at most, a put tries to make the reserve again after it was used."""
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


class Kind(enum.IntEnum):
    """What a stream row carries, which decides whether it may be dropped to stay in bounds."""

    KEEP = 0
    """Events and metrics: kept past ``max_bytes`` up to ``hard_max_bytes``."""
    PREDICTIONS = 1
    """Sampled prediction batches: dropped first, their records counted."""
    FEEDBACK = 2
    """Labels received over HTTP: bounded by their own share, dropped after predictions."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS stream (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    records INTEGER NOT NULL,
    kind INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT -1,
    -- last: SQLite reads a column by walking the record up to it, and a big payload's tail
    -- lives on overflow pages; counting and dropping rows never needs to touch them
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS latest (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    seq INTEGER NOT NULL
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS stream_kind ON stream(kind, id) WHERE kind > 0"


@dataclass(frozen=True, slots=True)
class Message:
    """One spooled message. ``key`` is the stream row id, or the ``latest`` sequence number."""

    key: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class SpoolFullError(SpoolError):
    """The disk (or filesystem quota) under the spool is full: nothing was stored."""


def _size(topic: str, payload: bytes) -> int:
    return len(topic) + len(payload) + _ROW_OVERHEAD


def _kind(value: int) -> Kind:
    """The kind of a stored row; an unknown number (a newer agent's spool) is kept."""
    try:
        return Kind(value)
    except ValueError:
        return Kind.KEEP


def _code(err: sqlite3.Error) -> int:
    code = getattr(err, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return int(code) & 0xFF
    text = str(err)
    if "malformed" in text:
        return _SQLITE_CORRUPT
    if "not a database" in text:
        return _SQLITE_NOTADB
    if "disk is full" in text:
        return _SQLITE_FULL
    return -1


OnDrop = Callable[[Kind, int, int], None]
"""``on_drop(kind, rows, records)``: rows of a droppable kind were dropped to stay in bounds."""


class Spool:
    """A bounded, persistent, ordered outbound queue; thread-safe."""

    def __init__(
        self,
        path: str | Path,
        max_bytes: int,
        on_put: Callable[[], None] | None = None,
        *,
        hard_max_bytes: int | None = None,
        feedback_share: float = 0.25,
        on_drop: OnDrop | None = None,
        on_full: Callable[[int], None] | None = None,
        on_reset: Callable[[Path, str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.hard_max_bytes = max(max_bytes, hard_max_bytes or 2 * max_bytes)
        self.feedback_max_bytes = int(max_bytes * feedback_share)
        self.on_put = on_put
        """Called after every put (outside the lock): the forwarder's wake-up."""
        self.on_drop = on_drop
        self.on_full = on_full
        """Called (outside the lock) when a kept row is first refused at ``hard_max_bytes``."""
        self.on_reset = on_reset
        """Called (outside the lock) with the aside path when a corrupt spool was replaced."""
        self._lock = threading.Lock()
        self.dropped_records = 0
        """Prediction records dropped because the spool was full, since this spool was opened."""
        self.dropped_feedback = 0
        """Feedback rows dropped (over their share or the bound), since this spool was opened."""
        self.refused_kept = 0
        """Events/metrics refused at ``hard_max_bytes``, since this spool was opened."""
        self.resets = 0
        """Times a corrupt spool was moved aside and replaced by an empty one."""
        self.generation = 0
        """Bumped on every reset: stream ids start again from 1 (the forwarder's cursor too)."""
        self._corrupt_in_a_row = 0
        self._over_warned = False
        self._full_reported = False
        self._reset_aside: tuple[Path, str] | None = None
        self._reserve = self.path.with_name(self.path.name + ".reserve")
        self._reserve_retry_at = 0.0
        self._db = self._open()
        self._keep_reserve()
        with self._lock:
            try:
                self._load_counts()
            except sqlite3.DatabaseError as err:
                self._db.close()
                self._db = self._move_aside(err)
                self._load_counts()
        if self._messages or self._latest_count:
            log.info(
                "spool %s: %d messages (%d bytes) waiting from before",
                self.path,
                self._messages + self._latest_count,
                self._bytes,
            )

    def _load_counts(self) -> None:
        self._messages = 0
        self._bytes = 0
        self._kind_bytes = dict.fromkeys(Kind, 0)
        for kind, count, size in self._db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM stream GROUP BY kind"
        ):
            nbytes = int(size) + int(count) * _ROW_OVERHEAD
            self._kind_bytes[_kind(kind)] += nbytes
            self._messages += int(count)
            self._bytes += nbytes
        self.last_id: int = int(
            self._db.execute("SELECT COALESCE(MAX(id), 0) FROM stream").fetchone()[0]
        )
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(topic) + LENGTH(payload)), 0),"
            " COALESCE(MAX(seq), 0) FROM latest"
        ).fetchone()
        self._latest_count: int = int(row[0])
        self._bytes += int(row[1]) + self._latest_count * _ROW_OVERHEAD
        self.latest_seq: int = int(row[2])

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as err:
            return self._move_aside(err)
        except OSError as err:
            raise SpoolError(f"spool {self.path}: cannot open: {err}") from err

    def _move_aside(self, err: BaseException) -> sqlite3.Connection:
        """Keep an unreadable spool for inspection and start an empty one in its place."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
        log.error("spool %s is unreadable (%s); moved to %s", self.path, err, aside)
        try:
            self.path.replace(aside)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.replace(aside.with_name(aside.name + suffix))
            db = self._connect()
        except (OSError, sqlite3.Error) as err2:
            raise SpoolError(f"spool {self.path}: cannot open: {err2}") from err2
        self.resets += 1
        self.generation += 1
        self._corrupt_in_a_row = 0
        self._reset_aside = (aside, str(err))
        return db

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
            columns = {r[1] for r in db.execute("PRAGMA table_info(stream)")}
            if "kind" not in columns:  # a spool written before rows had kinds
                db.execute("ALTER TABLE stream ADD COLUMN kind INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE stream SET kind = ? WHERE records > 0", (Kind.PREDICTIONS,))
            if "size" not in columns:
                # Sizes are stored with each row: summing LENGTH(payload) at every start would
                # read every overflow page of the backlog (and stop at the first damaged one).
                db.execute("ALTER TABLE stream ADD COLUMN size INTEGER NOT NULL DEFAULT -1")
                db.execute("UPDATE stream SET size = LENGTH(topic) + LENGTH(payload)")
            db.execute("DROP INDEX IF EXISTS stream_droppable")
            db.execute(_INDEX)
            db.execute("SELECT COUNT(*) FROM stream").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # --- the reserve ------------------------------------------------------------------------

    def _keep_reserve(self) -> None:
        """Make the reserve file when it is missing and the disk has room for it; never raises."""
        self._reserve_retry_at = time.monotonic() + RESERVE_RETRY_S
        if self._reserve.exists():
            return
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except FileExistsError:
            pass
        except OSError:  # no room yet: none rather than a part of one
            with contextlib.suppress(OSError):
                self._reserve.unlink()

    def _check_room(self, size: int) -> None:
        """SpoolFullError unless the disk keeps :data:`DISK_FLOOR_BYTES` free or the spool's
        free pages hold a row of ``size`` bytes; with the lock held."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return  # SQLite reports what goes wrong
        if st.f_bavail * st.f_frsize >= DISK_FLOOR_BYTES:
            return
        page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0]) * page
        if free < size + 2 * page:  # the row's pages and a split leaf
            raise SpoolFullError(
                f"spool {self.path}: cannot store a message: the disk is full"
                f" (under {DISK_FLOOR_BYTES // 1024} KB free)"
            )

    def _delete(self, sql: str, params: Iterable[object]) -> list[Any]:
        """Run a DELETE (its RETURNING rows); on a full disk, give up the reserve and try once
        more. With the lock held."""
        args = tuple(params)
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            if _code(err) != _SQLITE_FULL or not self._reserve.exists():
                raise self._failed(err, "delete messages") from err
            try:
                self._reserve.unlink()
            except OSError:
                raise self._failed(err, "delete messages") from err
            log.warning(
                "spool %s: the disk is full; its %d KB reserve is freed so that acknowledged"
                " messages can still be deleted (new messages wait for room)",
                self.path,
                RESERVE_BYTES // 1024,
            )
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            raise self._failed(err, "delete messages") from err

    # --- errors -------------------------------------------------------------------------------

    def _failed(self, err: sqlite3.Error, doing: str) -> SpoolError:
        """The SpoolError for ``err``; with the lock held. Repeated corruption replaces the file."""
        code = _code(err)
        if code == _SQLITE_FULL:
            return SpoolFullError(f"spool {self.path}: cannot {doing}: the disk is full")
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            self._corrupt_in_a_row += 1
            if self._corrupt_in_a_row >= CORRUPT_LIMIT:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = self._move_aside(err)
                self._load_counts()
        return SpoolError(f"spool {self.path}: cannot {doing}: {err}")

    def _after(self) -> None:
        """Callbacks owed after an operation; call without the lock."""
        reset = self._reset_aside
        if reset is not None:
            self._reset_aside = None
            if self.on_reset is not None:
                self.on_reset(*reset)

    # --- producers ----------------------------------------------------------------------------

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        records: int = 0,
        kind: Kind | None = None,
        force: bool = False,
    ) -> bool:
        """Queue a message at the end of the stream; False when it was dropped.

        ``records`` > 0 marks a batch of that many prediction records (kind ``PREDICTIONS``).
        ``force`` stores a kept row even past ``hard_max_bytes`` (the one event saying so).
        """
        if kind is None:
            kind = Kind.PREDICTIONS if records > 0 else Kind.KEEP
        size = _size(topic, payload)
        stored_size = size - _ROW_OVERHEAD
        drops: list[tuple[Kind, int, int]] = []
        full = False
        stored = False
        try:
            with self._lock:
                try:
                    stored, full = self._admit(size, kind, records, force, drops)
                    if stored:
                        self._check_room(size)
                        cur = self._db.execute(
                            "INSERT INTO stream"
                            " (topic, payload, qos, retain, records, kind, size)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (topic, payload, qos, int(retain), records, int(kind), stored_size),
                        )
                        self._corrupt_in_a_row = 0
                        self.last_id = cur.lastrowid or self.last_id
                        self._messages += 1
                        self._bytes += size
                        self._kind_bytes[kind] += size
                except sqlite3.Error as err:
                    raise self._failed(err, "store a message") from err
        finally:
            self._after()
        if self.on_drop is not None:
            for dropped in drops:
                self.on_drop(*dropped)
        if full and self.on_full is not None:
            self.on_full(self.refused_kept)
        if stored and self.on_put is not None:
            self.on_put()
        if time.monotonic() >= self._reserve_retry_at:
            self._keep_reserve()
        return stored

    def _admit(
        self, size: int, kind: Kind, records: int, force: bool, drops: list[tuple[Kind, int, int]]
    ) -> tuple[bool, bool]:
        """Make room for a row: (store it, first refusal at the hard cap); with the lock held."""
        if kind == Kind.FEEDBACK:
            need = self._kind_bytes[kind] + size - self.feedback_max_bytes
            if size > self.feedback_max_bytes:
                self.dropped_feedback += 1
                drops.append((kind, 1, 0))
                return False, False
            if need > 0:
                self._drop_oldest(Kind.FEEDBACK, need, drops)
        need = self._bytes + size - self.max_bytes
        if need > 0:
            need -= self._drop_oldest(Kind.PREDICTIONS, need, drops)
        if need > 0:
            need -= self._drop_oldest(Kind.FEEDBACK, need, drops)
        if need <= 0:
            return True, False
        if kind == Kind.PREDICTIONS:
            # Even dropping every older batch leaves no room: this batch is the one to drop.
            self.dropped_records += records
            return False, False
        if kind == Kind.FEEDBACK:
            self.dropped_feedback += 1
            drops.append((kind, 1, 0))
            return False, False
        if not self._over_warned:
            self._over_warned = True
            log.warning(
                "spool %s holds more than %d bytes of events/metrics; they are refused past %d",
                self.path,
                self.max_bytes,
                self.hard_max_bytes,
            )
        if self._bytes + size <= self.hard_max_bytes or force:
            return True, False
        self.refused_kept += 1
        first = not self._full_reported
        self._full_reported = True
        return False, first

    def _drop_oldest(self, kind: Kind, need: int, drops: list[tuple[Kind, int, int]]) -> int:
        """Delete the oldest rows of ``kind`` until ``need`` bytes are freed; the bytes freed."""
        last = victims = freed = records = 0
        for row_id, row_size, row_records in self._db.execute(
            "SELECT id, size, records FROM stream WHERE kind = ? ORDER BY id",
            (int(kind),),
        ):
            if freed >= need:
                break
            last = row_id
            victims += 1
            freed += row_size + _ROW_OVERHEAD
            records += row_records
        if not victims:
            return 0
        self._db.execute("DELETE FROM stream WHERE kind = ? AND id <= ?", (int(kind), last))
        self._messages -= victims
        self._bytes -= freed
        self._kind_bytes[kind] -= freed
        if kind == Kind.PREDICTIONS:
            self.dropped_records += records
        else:
            self.dropped_feedback += victims
            drops.append((kind, victims, records))
        return freed

    def put_latest(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        """Queue the newest message for ``topic``, replacing an unsent older one."""
        try:
            with self._lock:
                try:
                    self._check_room(_size(topic, payload))
                    self.latest_seq += 1
                    old = self._db.execute(
                        "SELECT LENGTH(topic) + LENGTH(payload) FROM latest WHERE topic = ?",
                        (topic,),
                    ).fetchone()
                    self._db.execute(
                        "INSERT OR REPLACE INTO latest (topic, payload, qos, retain, seq)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (topic, payload, qos, int(retain), self.latest_seq),
                    )
                except sqlite3.Error as err:
                    raise self._failed(err, "store a message") from err
                if old is not None:
                    self._bytes -= old[0] + _ROW_OVERHEAD
                else:
                    self._latest_count += 1
                self._bytes += _size(topic, payload)
        finally:
            self._after()
        if self.on_put is not None:
            self.on_put()

    # --- the forwarder ------------------------------------------------------------------------

    def read(self, after: int, limit: int) -> list[Message]:
        """Up to ``limit`` stream messages with id > ``after``, oldest first."""
        try:
            with self._lock:
                try:
                    rows = self._db.execute(
                        "SELECT id, topic, payload, qos, retain FROM stream"
                        " WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit),
                    ).fetchall()
                except sqlite3.Error as err:
                    raise self._failed(err, "read messages") from err
                self._corrupt_in_a_row = 0
        finally:
            self._after()
        return [Message(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def latest(self) -> list[Message]:
        """Every queued latest-value message (key = its sequence number)."""
        try:
            with self._lock:
                try:
                    rows = self._db.execute(
                        "SELECT seq, topic, payload, qos, retain FROM latest ORDER BY seq"
                    ).fetchall()
                except sqlite3.Error as err:
                    raise self._failed(err, "read messages") from err
        finally:
            self._after()
        return [Message(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete stream messages the broker has acknowledged."""
        ids = list(ids)
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        try:
            with self._lock:
                rows = self._delete(
                    f"DELETE FROM stream WHERE id IN ({marks})"  # noqa: S608 - only '?' marks
                    " RETURNING size, kind",
                    ids,
                )
                self._messages -= len(rows)
                for size, kind in rows:
                    nbytes = size + _ROW_OVERHEAD
                    self._bytes -= nbytes
                    self._kind_bytes[_kind(kind)] -= nbytes
                if self._bytes <= self.max_bytes:
                    self._full_reported = False
                    self._over_warned = False
        finally:
            self._after()

    def ack_latest(self, topic: str, seq: int) -> None:
        """Delete a latest-value message unless a newer one replaced it meanwhile."""
        try:
            with self._lock:
                try:
                    row = self._db.execute(
                        "SELECT LENGTH(topic) + LENGTH(payload) FROM latest"
                        " WHERE topic = ? AND seq = ?",
                        (topic, seq),
                    ).fetchone()
                except sqlite3.Error as err:
                    raise self._failed(err, "delete messages") from err
                if row is None:
                    return
                self._delete(
                    "DELETE FROM latest WHERE topic = ? AND seq = ?",
                    (topic, seq),
                )
                self._latest_count -= 1
                self._bytes -= row[0] + _ROW_OVERHEAD
        finally:
            self._after()

    # --- state --------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages waiting for an acknowledgement (stream and latest)."""
        return self._messages + self._latest_count

    @property
    def size_bytes(self) -> int:
        """Bytes the queued messages count against ``max_bytes``."""
        return self._bytes

    def kind_bytes(self, kind: Kind) -> int:
        """Bytes the queued stream rows of ``kind`` hold."""
        return self._kind_bytes[kind]

    def close(self) -> None:
        """Checkpoint and close the database."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as err:
                log.warning("spool %s: checkpoint failed: %s", self.path, err)
            self._db.close()
