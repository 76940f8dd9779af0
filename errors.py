"""The project's own exception types.

Every error a user can cause (bad file, wrong shape, mismatched checkpoint, ...) is raised as a
subclass of :class:`MedSegError` with a one-line message that names the file and says what was
expected, so CLIs can print it politely without a traceback; :func:`oneline` turns any exception into
such a line.
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


def oneline(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message as one line for a status box or a log (white space folded, the exception's type name
    when the message is empty), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
