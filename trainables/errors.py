"""Errors meant for the user: the CLI prints them as one paragraph, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad input, missing file); the message says how."""


class ConfigError(UserError, ValueError):
    """A configuration value is unknown or out of range; the message names the field."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset or data file is not on disk; the message names the file and how to get it."""


class CheckpointError(UserError):
    """A checkpoint cannot be read (missing, truncated or not ours)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch."""
