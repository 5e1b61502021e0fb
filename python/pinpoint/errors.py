"""The one error type the command line reports in one line.

``UserError`` is a mistake in how pinpoint was called (a flag, a path, a file's contents),
worded in the CLI's terms: the CLI prints ``pinpoint: error: <message>`` and exits with status
2, without a traceback. Every other exception is a bug in pinpoint or its environment: the CLI
prints the traceback and asks for a report (exit 1). The library raises its own ValueError /
TypeError for bad API input; the CLI checks its flags up front or converts the few known
library errors into ``UserError`` at its boundary, one by one.
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A user mistake, reported as one line naming the CLI flag to fix (exit status 2)."""

    def __init__(self, message: str):
        # one line: the CLI's contract; a multi-line library message keeps its first line
        first = str(message).strip().splitlines()[0] if str(message).strip() else "invalid input"
        super().__init__(first)
