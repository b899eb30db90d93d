"""The one error hierarchy of inferd: every error raised on purpose derives from InferdError.

It lives in the bottom layer (``runtime``) so that every package, device side and operator side,
raises and catches the same classes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping


class InferdError(Exception):
    """Base of every error inferd raises on purpose; its message is one line a user can act on."""


# --- configuration and serving -------------------------------------------------------------


class ConfigError(InferdError):
    """The configuration is invalid; the message names the field path and the reason."""


class BackendError(InferdError):
    """A runtime backend failed to run a model."""

    latency_ns: int | None = None
    """How long the failed run took, when a run failed (set by ``Backend.run_timed``)."""


class BackendUnavailableError(BackendError):
    """The runtime a model asks for is not installed; the message names the pip extra."""


class ModelLoadError(BackendError):
    """A model file could not be loaded (missing, corrupt, unsupported operator)."""


class BundleError(InferdError):
    """A model bundle's golden or reference file is unreadable or does not fit the model."""


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


def run_command(prog: str, command: Callable[[], int], exit_codes: Mapping[type, int]) -> int:
    """Run a console command: an inferd error becomes one line on stderr and an exit code.

    ``exit_codes`` maps error classes to codes (the first match in order wins); any other
    InferdError exits 1, Ctrl-C 130. Tracebacks are for bugs, not for a user's mistakes.
    """
    try:
        return command()
    except InferdError as err:
        code = next((c for cls, c in exit_codes.items() if isinstance(err, cls)), 1)
        what = "config error: " if isinstance(err, ConfigError) else ""
        sys.stderr.write(f"{prog}: {what}{err}\n")
        return code
    except KeyboardInterrupt:
        return 130
