"""Errors raised by the agent; all derive from :class:`InferdError`."""

from __future__ import annotations

from telemetry.errors import InferdError

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ConfigError",
    "InferdError",
    "InputError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotReadyError",
]


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
