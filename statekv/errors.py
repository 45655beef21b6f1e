"""User-facing errors: each says what went wrong and what to do, and maps to an exit code."""

from __future__ import annotations


class StateKVError(Exception):
    """Base of every error a user can cause; `exit_code` follows docs/formats.md."""

    exit_code = 1


class UsageError(StateKVError):
    """A bad option value or combination of options."""

    exit_code = 2


class InputError(StateKVError):
    """The video, questions file or preset file cannot be used."""

    exit_code = 3


class ModelError(StateKVError):
    """The model is not available offline, of an unsupported family, or failed to load."""

    exit_code = 4


class ResourceError(StateKVError):
    """The memory preflight refused the run, or it ran out of memory."""

    exit_code = 5


class BusyError(InputError):
    """An output file another process is writing now (statekv.locks)."""
