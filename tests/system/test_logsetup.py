"""journald-friendly logging: `<N>` priorities, no timestamps of our own under the journal."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import logsetup
from tests.support.daemon import start_daemon

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def journal_env(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_stream_gets_priorities_and_no_timestamps(
    tmp_path: Path, restore_logging: None
) -> None:
    out = tmp_path / "stderr"
    out.touch()
    with open(out, "a") as stream:
        logsetup.configure("info", stream=stream, environ=journal_env(out))
        log = logging.getLogger("agent.example")
        log.debug("hidden at info")
        log.info("model %s loaded", "demo")
        log.warning("broker unreachable")
        try:
            raise ValueError("bad tensor")
        except ValueError:
            log.exception("request failed")
        logging.getLogger("x").critical("out of memory")
    lines = out.read_text().splitlines()
    assert lines[:3] == [
        "<6>agent.example: model demo loaded",
        "<4>agent.example: broker unreachable",
        "<3>agent.example: request failed",
    ]
    # journald makes each line an entry: the traceback keeps the error priority on every line
    traceback = lines[3 : lines.index("<2>x: out of memory")]
    assert traceback and all(line.startswith("<3>") for line in traceback)
    assert "<3>ValueError: bad tensor" in traceback
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_plain_stderr_gets_timestamps_and_level_names(
    tmp_path: Path, restore_logging: None
) -> None:
    out = tmp_path / "stderr"
    other = tmp_path / "other"
    out.touch()
    other.touch()
    with open(out, "a") as stream:
        # JOURNAL_STREAM inherited from a parent but naming another stream: not the journal
        logsetup.configure("warning", stream=stream, environ=journal_env(other))
        logging.getLogger("agent.example").info("hidden at warning")
        logging.getLogger("agent.example").warning("disk almost full")
        logsetup.set_level("debug")
        logging.getLogger("agent.example").debug("now visible")
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    assert TIMESTAMP.match(lines[0]) and lines[0].endswith(
        "WARNING agent.example: disk almost full"
    )
    assert lines[1].endswith("DEBUG agent.example: now visible")


def test_syslog_priorities() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [logsetup.syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2]


def test_inferd_run_logs_for_the_journal(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """The daemon's stderr is the journal stream systemd names in JOURNAL_STREAM."""
    log = tmp_path / "daemon.log"
    log.touch()  # the fixture appends to this file, so its inode is the daemon's stderr
    config = {"models": [{"name": "c", "path": str(model_factory("classifier"))}]}
    daemon = start_daemon(tmp_path, config, env=journal_env(log))
    try:
        text = daemon.stderr()
    finally:
        assert daemon.stop() == 0
    assert "<6>agent.api.server: API listening on http://" in text
    assert not TIMESTAMP.search(text), text
