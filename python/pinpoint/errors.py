"""The error types the command line reports in one line.

``UserError`` is a mistake in how pinpoint was called (a flag, a path, a file's contents),
worded in the CLI's terms: the CLI prints ``pinpoint: error: <message>`` and exits with status
2, without a traceback. The CLI raises it itself: it checks its flags up front or converts the
few known library errors into ``UserError`` at its boundary, one by one.

``InputError`` is for the library: a ``ValueError`` about the data or model a caller passed
that only shows once the work has started (a prompt longer than the model's context, a
sliding window that cannot be honoured). The CLI reports it in one line too. Being a
``ValueError``, it changes nothing for API callers.

Every other exception is a bug in pinpoint or its environment: the CLI prints the traceback
and asks for a report (exit 1).
"""
from __future__ import annotations

__all__ = ["UserError", "InputError"]


class UserError(Exception):
    """A user mistake, reported as one line naming the CLI flag to fix (exit status 2)."""

    def __init__(self, message: str):
        # one line: the CLI's contract; a multi-line library message keeps its first line
        first = str(message).strip().splitlines()[0] if str(message).strip() else "invalid input"
        super().__init__(first)


class InputError(ValueError):
    """The caller's data or model does not fit what was asked (found during the work); the
    message names the offending item and the fix. The CLI prints it as one line (exit 2)."""
