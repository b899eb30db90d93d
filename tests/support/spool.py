"""A damaged telemetry spool, for the tests of what the spool and the MQTT link do with one."""

from __future__ import annotations

import os
from pathlib import Path

from telemetry.spool import Spool


def corrupt_pages(path: Path, first: int, last: int, page: int = 16384) -> None:
    """Write garbage over pages ``first..last`` (0-based) of an SQLite file."""
    data = bytearray(path.read_bytes())
    assert len(data) >= (last + 1) * page, len(data)
    for n in range(first, last + 1):
        data[n * page : (n + 1) * page] = b"\xde\xad\xbe\xef" * (page // 4)
    path.write_bytes(bytes(data))


def spool_with_a_big_row(path: Path) -> None:
    """A spool at ``path`` with 7 rows on ``t/events``: ``first``, a 200 kB one (an overflow
    chain of about 13 pages) and ``after0`` to ``after4``."""
    spool = Spool(path, 1 << 20)
    spool.put("t/events", b"first")
    spool.put("t/events", os.urandom(200_000))  # ~13 overflow pages of 16 KB
    for i in range(5):
        spool.put("t/events", b"after%d" % i)
    spool.close()
