"""The project's own exception types.

Every error a user can cause (bad file, wrong shape, mismatched checkpoint, ...) is raised as a
subclass of :class:`MedSegError` with a one-line message that names the file and says what was
expected, so CLIs can print it politely without a traceback.
"""
from __future__ import annotations


class MedSegError(Exception):
    """Base class of every user-facing error raised by this project."""


class InputError(MedSegError, ValueError):
    """An input file or array is unreadable, corrupt, of an unknown format or of the wrong shape."""


class CheckpointError(MedSegError, ValueError):
    """A checkpoint is missing, corrupt, unsafe, or does not match what the caller expected."""


class ConfigError(MedSegError, ValueError):
    """A configuration value or command-line option is invalid."""
