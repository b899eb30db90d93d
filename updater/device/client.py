"""The device's TUF client: python-tuf's ngclient ``Updater`` with inferd's limits around it.

Trust starts from ``updates.trusted_root``, copied into the metadata cache under the state dir
on first use; later roots arrive through TUF root rotation and are cached there. Metadata and
artifacts are downloaded into the state dir (never /tmp, which is RAM on many devices), bounded
by the target's signed length, ``max_download_bytes``, a deadline and a cancel event. Every
foreign exception leaves this module as an :class:`UpdateError` subclass.

Each slot's job runs on its own thread and they share one client: the metadata cache is
refreshed under a lock (ngclient rewrites it in place), downloads run side by side with their
own fetcher (deadline and cancel are per call) into file names that differ per target. Model
metadata that breaks the rules ``inferctl`` publishes by (:func:`updater.meta.meta_error`) makes
the whole check fail: only a stolen online key or hand-made metadata produces it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlparse

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from runtime.errors import (
    CancelledError,
    DownloadError,
    StepTimeoutError,
    StorageError,
    UpdateError,
    VerificationError,
)
from updater.meta import ModelMeta, meta_error, meta_from_custom

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Offer:
    """A verified model target for one of this device's slots, with the targets it names."""

    path: str
    target: dict[str, Any]
    meta: ModelMeta
    extras: dict[str, dict[str, Any]]
    """golden / reference statistics: target path -> TargetFile dict."""

    @property
    def sha256(self) -> str:
        return str(self.target["hashes"]["sha256"])


class _Fetcher(Urllib3Fetcher):
    """ngclient's urllib3 fetcher, writing into the state dir and honouring deadline and cancel."""

    def __init__(self, tmp_dir: Path, socket_timeout: int) -> None:
        super().__init__(socket_timeout=socket_timeout, chunk_size=_CHUNK, app_user_agent="inferd")
        self.tmp_dir = tmp_dir
        self.deadline: float | None = None
        self.cancel: threading.Event | None = None

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("download cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise StepTimeoutError("download ran past its deadline")

    def _fetch(self, url: str) -> Iterator[bytes]:
        self._check()
        if url.startswith("file://"):
            return self._file_chunks(Path(unquote(urlparse(url).path)))
        return super()._fetch(url)

    def _chunks(self, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        # Replaces Urllib3Fetcher's stream(chunk_size), which blocks until a whole chunk has
        # arrived: a server dripping one byte at a time would never reach the deadline check.
        try:
            while True:
                self._check()
                data = response.read1(_CHUNK)
                if not data:
                    return
                yield data
        except urllib3.exceptions.TimeoutError as err:
            raise tuf_errors.SlowRetrievalError from err
        finally:
            response.release_conn()

    @staticmethod
    def _file_chunks(path: Path) -> Iterator[bytes]:
        if not path.is_file():
            raise tuf_errors.DownloadHTTPError(f"{path} not found", 404)
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        received = 0
        with tempfile.TemporaryFile(dir=self.tmp_dir) as temp:
            for chunk in self.fetch(url):
                self._check()
                received += len(chunk)
                if received > max_length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{url}: more than the {max_length} bytes expected"
                    )
                temp.write(chunk)
            temp.seek(0)
            yield temp


@contextmanager
def _wrapped(what: str) -> Iterator[None]:
    """Turn python-tuf, urllib3 and OS errors into inferd's, with one clear line."""
    try:
        yield
    except UpdateError:
        raise
    except tuf_errors.RepositoryError as err:
        raise VerificationError(f"{what}: {type(err).__name__}: {err}") from err
    except tuf_errors.DownloadError as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise DownloadError(f"{what}: {type(err).__name__}: {err}{cause}") from err
    except OSError as err:
        raise StorageError(f"{what}: {err.strerror or err}") from err
    except Exception as err:
        raise DownloadError(f"{what}: {type(err).__name__}: {err}") from err


class RepositoryClient:
    """Checks the repository for model targets and downloads them verified."""

    def __init__(
        self,
        repository_url: str,
        trusted_root: str | Path,
        state_dir: str | Path,
        *,
        max_download_bytes: int,
        socket_timeout: int = 10,
    ) -> None:
        base = repository_url if repository_url.endswith("/") else repository_url + "/"
        self.metadata_url = base + "metadata/"
        self.targets_url = base + "targets/"
        self.trusted_root = Path(trusted_root)
        work = Path(state_dir) / "update"
        self.metadata_dir = work / "metadata"
        self.download_dir = work / "downloads"
        self.tmp_dir = work / "tmp"
        self.max_download_bytes = max_download_bytes
        self.socket_timeout = socket_timeout
        self._metadata_lock = threading.Lock()

    def _updater(self, fetcher: _Fetcher) -> Updater:
        """A fresh ngclient Updater over the cache (call with the metadata lock held)."""
        try:
            for d in (self.metadata_dir, self.download_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            trusted = self.trusted_root.read_bytes()
        except OSError as err:
            raise StorageError(
                f"updates.trusted_root {self.trusted_root}: {err.strerror or err}"
            ) from err
        with _wrapped(f"trusted root {self.trusted_root}"):
            try:
                bootstrap: bytes | None = trusted
                cached = self.metadata_dir / "root.json"
                if cached.exists():
                    have = Metadata.from_file(str(cached)).signed.version
                    # a root installed later by the operator (re-provisioning) wins over the cache
                    if Metadata.from_bytes(trusted).signed.version <= have:
                        bootstrap = None
                return Updater(
                    str(self.metadata_dir),
                    self.metadata_url,
                    str(self.download_dir),
                    self.targets_url,
                    fetcher=fetcher,
                    config=UpdaterConfig(app_user_agent="inferd"),
                    bootstrap=bootstrap,
                )
            except OSError as err:  # the trusted root was read above: this is the cache
                raise StorageError(
                    f"update metadata in {self.metadata_dir}: {err.strerror or err}"
                ) from err

    def _fetcher(self, deadline: float | None, cancel: threading.Event | None) -> _Fetcher:
        fetcher = _Fetcher(self.tmp_dir, self.socket_timeout)
        fetcher.deadline, fetcher.cancel = deadline, cancel
        return fetcher

    def check(
        self,
        slots: Sequence[str],
        groups: Sequence[str],
        *,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Offer]:
        """Refresh the metadata and list the model targets for ``slots`` and ``groups``.

        VerificationError when any model target's metadata breaks the publishing rules.
        """
        fetcher = self._fetcher(deadline, cancel)
        with self._metadata_lock, _wrapped("update check"):
            updater = self._updater(fetcher)
            updater.refresh()
            # after a successful refresh the cached targets.json is the verified one; it only
            # tells which paths exist, each is then looked up through the Updater itself
            listing = Metadata[Targets].from_file(str(self.metadata_dir / "targets.json"))
            offers = []
            for path, listed in listing.signed.targets.items():
                meta = meta_from_custom(listed.custom)
                if meta is not None and (err := meta_error(meta, path, listing.signed.version)):
                    raise VerificationError(
                        f"{path}: {err}; signed metadata inferctl never writes, nothing from "
                        "this repository is installed until it is fixed"
                    )
                if meta is None or meta.name not in slots or not meta.for_device(tuple(groups)):
                    continue
                target = updater.get_targetinfo(path)
                if target is None:
                    continue
                extras = {}
                for extra in (meta.golden, meta.reference_stats):
                    if extra is not None:
                        info = updater.get_targetinfo(extra)
                        if info is None:
                            raise VerificationError(f"{path} names {extra}, which is not a target")
                        extras[extra] = info.to_dict()
                offers.append(Offer(path, target.to_dict(), meta, extras))
            return offers

    def download(
        self,
        path: str,
        target: dict[str, Any],
        *,
        deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Download (or find cached) the verified target; its local path in the state dir."""
        info = TargetFile.from_dict(copy.deepcopy(target), path)
        if info.length > self.max_download_bytes:
            raise DownloadError(
                f"{path} is {info.length} bytes, over updates.max_download_bytes "
                f"({self.max_download_bytes})"
            )
        fetcher = self._fetcher(deadline, cancel)
        with _wrapped(f"download {path}"):
            with self._metadata_lock:
                updater = self._updater(fetcher)
            cached = updater.find_cached_target(info)
            if cached is not None:
                return Path(cached)
            return Path(updater.download_target(info))

    @staticmethod
    def verify(path: str, target: dict[str, Any], local: Path) -> None:
        """Check a local file against the target's signed length and hashes."""
        info = TargetFile.from_dict(copy.deepcopy(target), path)
        with _wrapped(f"verify {path}"), open(local, "rb") as f:
            info.verify_length_and_hashes(f)

    def cached(self, path: str) -> Path:
        """Where :meth:`download` puts ``path`` (the file may not exist)."""
        return self.download_dir / quote(path, "")

    def discard(self, paths: Collection[str]) -> None:
        """Delete the downloaded files of these targets (when the job that needed them ends)."""
        for path in paths:
            self.cached(path).unlink(missing_ok=True)

    def clear_downloads(self, keep: Collection[str] = ()) -> None:
        """Delete downloads not in ``keep`` and every temp file; only while no job runs."""
        kept = {self.cached(p).name for p in keep}
        for d in (self.download_dir, self.tmp_dir):
            if d.is_dir():
                for f in d.iterdir():
                    if d == self.tmp_dir or f.name not in kept:
                        f.unlink(missing_ok=True)
