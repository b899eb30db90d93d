"""The one error hierarchy of inferd: every error raised on purpose derives from InferdError.

It lives in the bottom layer (``runtime``) so that every package, device side and operator side,
raises and catches the same classes.
"""

from __future__ import annotations


class InferdError(Exception):
    """Base of every error inferd raises on purpose; its message is one line a user can act on."""


# --- configuration and serving -------------------------------------------------------------


class ConfigError(InferdError):
    """The configuration is invalid; the message names the field path and the reason."""


class BackendError(InferdError):
    """A runtime backend failed to run a model."""


class BackendUnavailableError(BackendError):
    """The runtime a model asks for is not installed; the message names the pip extra."""


class ModelLoadError(BackendError):
    """A model file could not be loaded (missing, corrupt, unsupported operator)."""


class InputError(InferdError):
    """A request's tensors do not match the model (name, shape, datatype, length)."""


class ModelNotFoundError(InferdError):
    """No model slot has the requested name (or version)."""


class NotReadyError(InferdError):
    """The model slot exists but cannot serve yet."""


# --- telemetry ------------------------------------------------------------------------------


class TelemetryError(InferdError):
    """Telemetry could not be produced or delivered."""


class SpoolError(TelemetryError):
    """The store-and-forward spool could not store or read a message."""


class MqttError(TelemetryError):
    """The MQTT link failed in a way the caller must hear about (bad TLS files, auth refused)."""


# --- updates --------------------------------------------------------------------------------


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
