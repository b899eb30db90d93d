"""Model versions on disk under ``state_dir/models``: which one is active per slot, the ones
before it (for rollback), and pruning down to ``keep`` versions.

::

    models/<slot>/slot.json                  {"active": {...}, "history": [{...}, ...]}
    models/<slot>/<seq>-<version>/<file>     a staged version: model, golden.npz, reference.json

The daemon loads ``active`` at start when there is one (else the config's model). The config's
own model file can be an entry too (seq 0): it is rolled back to but never deleted.

Folder and file names come from signed metadata. The device checks them with the rules
``inferctl`` publishes by (:func:`updater.meta.meta_error`), and the store checks again that
every folder it creates, fills or deletes is a direct child of ``models/<slot>/`` once resolved
(``..`` and symlinks included): a version string must never name a path outside the store.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import msgspec

from runtime.durable import fsync_dir, write_atomic
from runtime.errors import StorageError

log = logging.getLogger(__name__)


class Entry(msgspec.Struct, kw_only=True, frozen=True):
    """One model version of a slot on disk."""

    version: str
    seq: int
    path: str
    sha256: str = ""

    def same(self, other: Entry | None) -> bool:
        return other is not None and (self.seq, self.path) == (other.seq, other.path)


class SlotRecord(msgspec.Struct, kw_only=True):
    active: Entry | None = None
    history: list[Entry] = []
    """Earlier active versions, most recent first."""


class ModelStore:
    """The per-slot version records and the staged files they point to."""

    def __init__(self, state_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(state_dir) / "models"
        self.keep = max(1, keep)

    def _slot_dir(self, slot: str) -> Path:
        slot_dir = self.root / slot
        if slot_dir.resolve().parent != self.root.resolve():
            raise StorageError(f"slot name {slot!r} does not name a folder in {self.root}")
        return slot_dir

    def _version_dir(self, slot: str, name: str) -> Path:
        """``models/<slot>/<name>``, refused unless it resolves to a direct child of the slot's
        folder (a hostile version string such as ``x/../../../escaped`` would not)."""
        slot_dir = self._slot_dir(slot)
        d = slot_dir / name
        if "/" in name or name in ("", ".", "..") or d.resolve().parent != slot_dir.resolve():
            raise StorageError(f"{slot}: {name!r} is not a folder inside {slot_dir}")
        return d

    def owns(self, slot: str, version_dir: Path) -> bool:
        """Whether ``version_dir`` is one of the store's version folders of ``slot``."""
        try:
            slot_dir = self._slot_dir(slot).resolve()
        except StorageError:
            return False
        resolved = version_dir.resolve()
        return resolved.parent == slot_dir and not version_dir.is_symlink()

    def _file(self, slot: str) -> Path:
        return self.root / slot / "slot.json"

    def record(self, slot: str) -> SlotRecord:
        path = self._file(slot)
        try:
            return msgspec.json.decode(path.read_bytes(), type=SlotRecord)
        except FileNotFoundError:
            return SlotRecord()
        except (OSError, msgspec.DecodeError) as err:
            raise StorageError(f"{path}: unreadable model record: {err}") from err

    def _save(self, slot: str, rec: SlotRecord) -> None:
        try:
            write_atomic(self._file(slot), msgspec.json.encode(rec))
        except OSError as err:
            raise StorageError(f"{self._file(slot)}: cannot save: {err.strerror}") from err

    def active(self, slot: str) -> Entry | None:
        """The version the slot should serve, when an update installed one and its file exists."""
        entry = self.record(slot).active
        if entry is not None and not Path(entry.path).is_file():
            log.error("%s: active version %s is missing at %s", slot, entry.version, entry.path)
            return None
        return entry

    def previous(self, slot: str) -> Entry | None:
        """The most recent earlier version whose file still exists."""
        for entry in self.record(slot).history:
            if Path(entry.path).is_file():
                return entry
        return None

    def stage(self, slot: str, seq: int, version: str, files: Mapping[str, Path]) -> Path:
        """Copy ``files`` (name in the version dir -> source) into the store, durably.

        The copy is built in a hidden folder and renamed into place, so a crash leaves either
        no version dir or a complete one. Returns the version dir.
        """
        final = self._version_dir(slot, f"{seq:06d}-{version}")
        partial = self._version_dir(slot, f".{final.name}.partial")
        for name in files:
            if "/" in name or name in ("", ".", ".."):
                raise StorageError(f"cannot stage {slot} {version}: {name!r} is not a file name")
        try:
            for d in (partial, final):
                if d.exists():
                    shutil.rmtree(d)
            partial.mkdir(parents=True)
            for name, src in files.items():
                dest = partial / name
                shutil.copyfile(src, dest)
                with open(dest, "rb+") as f:
                    os.fsync(f.fileno())
            fsync_dir(partial)
            os.replace(partial, final)
            fsync_dir(final.parent)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise StorageError(f"cannot stage {slot} {version}: {err.strerror or err}") from err
        return final

    def activate(self, slot: str, entry: Entry, serving: Entry | None) -> None:
        """Make ``entry`` active; what was active (or ``serving``, the config's model) is kept."""
        rec = self.record(slot)
        if entry.same(rec.active):
            return
        before = rec.active or serving
        history = [e for e in rec.history if not e.same(entry)]
        if before is not None:
            history = [before, *[e for e in history if not e.same(before)]]
        rec.active, rec.history = entry, history
        self._save(slot, rec)

    def rollback(self, slot: str, failed: Entry | None = None) -> Entry | None:
        """Make the previous version active again; returns it (None when there is none).

        With ``failed`` given, only acts while that entry is active (idempotent on resume).
        """
        rec = self.record(slot)
        if failed is not None and not failed.same(rec.active):
            return rec.active
        while rec.history:
            prev = rec.history.pop(0)
            if Path(prev.path).is_file():
                bad, rec.active = rec.active, prev
                self._save(slot, rec)
                if bad is not None:
                    self._remove(slot, bad)
                return prev
        return None

    def prune(self, slot: str) -> None:
        """Keep the active version and ``keep - 1`` earlier ones; delete the rest from disk."""
        rec = self.record(slot)
        kept, dropped = rec.history[: self.keep - 1], rec.history[self.keep - 1 :]
        if dropped:
            rec.history = kept
            self._save(slot, rec)
        referenced = {Path(e.path).parent for e in [*kept, *([rec.active] if rec.active else [])]}
        slot_dir = self.root / slot
        if not slot_dir.is_dir():
            return
        for d in slot_dir.iterdir():
            if d.is_dir() and d not in referenced and self.owns(slot, d):
                shutil.rmtree(d, ignore_errors=True)
                log.info("%s: removed old version dir %s", slot, d.name)

    def discard(self, slot: str, version_dir: Path) -> None:
        """Delete a staged version that never became active (its job failed)."""
        rec = self.record(slot)
        live = [rec.active, *rec.history]
        if any(e is not None and Path(e.path).parent == version_dir for e in live):
            return
        if not self.owns(slot, version_dir):
            log.error("%s: not deleting %s: outside the store", slot, version_dir)
            return
        shutil.rmtree(version_dir, ignore_errors=True)

    def _remove(self, slot: str, entry: Entry) -> None:
        path = Path(entry.path)
        if self.owns(slot, path.parent):  # never the config's own model file
            shutil.rmtree(path.parent, ignore_errors=True)
