"""Errors raised by the updater; all derive from :class:`UpdateError` (an ``InferdError``)."""

from __future__ import annotations

from telemetry.errors import InferdError

__all__ = [
    "CancelledError",
    "DownloadError",
    "OperatorError",
    "StateError",
    "StepTimeoutError",
    "StorageError",
    "UpdateError",
    "ValidationError",
    "VerificationError",
]


class UpdateError(InferdError):
    """A model update could not be published, fetched, checked or installed."""


class OperatorError(UpdateError):
    """An ``inferctl`` repository operation failed (missing key, bad argument, unreadable file)."""


class VerificationError(UpdateError):
    """Metadata or an artifact failed TUF verification (signature, version, expiry, hash)."""


class DownloadError(UpdateError):
    """The repository could not be reached or sent too much, too little or too slowly."""


class StorageError(UpdateError):
    """The state dir could not be written (disk full, read-only, permissions)."""


class ValidationError(UpdateError):
    """A candidate model failed the validation gate on this device."""


class StepTimeoutError(UpdateError):
    """An update step ran past its state's timeout."""


class StateError(UpdateError):
    """The persisted update state is unreadable or a transition is not in the table."""


class CancelledError(UpdateError):
    """A step was cancelled: the updater is stopping (the job resumes at the next start)."""
