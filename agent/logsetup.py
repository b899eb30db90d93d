"""Logging for the daemon: journald-friendly under systemd, a normal timestamped format otherwise.

Under systemd, stderr is a stream to journald and ``JOURNAL_STREAM`` names its device and inode.
journald stamps every line itself and reads a ``<N>`` syslog priority prefix (``SyslogLevelPrefix=``
is on by default), so lines carry the priority instead of a time and a level name.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 emerg .. 7 debug) for a logging level number."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a multi-line record (tracebacks) gets the prefix,
    because journald makes each line its own entry."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM`` matches)."""
    env = os.environ if environ is None else environ
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(
    level: str = "info", stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> logging.Handler:
    """Route all logging to ``stream`` (stderr) in the right format, replacing earlier handlers."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if to_journal(out, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(handlers=[handler], level=LEVELS[level], force=True)
    return handler


def set_level(level: str) -> None:
    """Change the level of the whole process (config reload)."""
    logging.getLogger().setLevel(LEVELS[level])
