"""Durable writes when the disk fails: the old file stays, no temp file is left behind, and the
error reaches the caller. A full disk is a real small tmpfs; a failing ``os.replace`` or
``os.fsync`` (an I/O error no test can provoke on a healthy disk) is injected."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runtime import durable
from runtime.durable import write_atomic
from tests.support.faults import Failing, leftovers


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp_file(small_disk: Path) -> None:
    target = small_disk / "state.json"
    write_atomic(target, b"old")
    with pytest.raises(OSError) as caught:
        write_atomic(target, b"x" * (1024 * 1024))
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert leftovers(small_disk, {"state.json"}) == []
    write_atomic(target, b"new")  # the space the failed write took is free again
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("call", ["replace", "fsync"])
def test_a_failing_replace_or_fsync_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    boom = Failing(errno.EIO)
    monkeypatch.setattr(durable.os, call, boom)
    with pytest.raises(OSError) as caught:
        write_atomic(target, b"new")
    assert caught.value.errno == errno.EIO and boom.calls
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path, {"state.json"}) == []


def test_a_failing_folder_fsync_after_the_rename_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename happened, but it is not known to be durable: the caller must hear it."""
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert leftovers(tmp_path, {"state.json"}) == []
