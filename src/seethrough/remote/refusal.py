"""The error of the sandbox, and where in the user's code it happened.

Shared by the static checks (:mod:`.sandbox`) and the run-time allowlist
(:mod:`.reach`): both refuse with a :class:`SandboxViolation` whose message
starts with the user's line.
"""

from __future__ import annotations

import sys

from .._frames import is_library_file
from ..errors import SeethroughError

DEFAULT_FILENAME = "<remote body>"


class SandboxViolation(SeethroughError):
    """Code in a remote trace body that the server refuses to run."""

    def __init__(self, message: str, *, lineno: int | None = None, filename: str | None = None,
                 construct: str | None = None) -> None:
        super().__init__(message)
        self.lineno, self.filename, self.construct = lineno, filename, construct


def where(lineno: int | None, filename: str) -> str:
    """``line N`` (of FILE, unless it is the body itself)."""
    text = f"line {lineno}" if lineno else "the body"
    return text if filename == DEFAULT_FILENAME else f"{text} of {filename}"


def user_line() -> str:
    """'line N: ' of the innermost frame outside seethrough (the user's code), or ''."""
    frame = sys._getframe(1)
    while frame is not None and is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return ""
    filename = frame.f_code.co_filename
    if filename.startswith("remote:"):
        filename = filename[len("remote:"):]
    return f"{where(frame.f_lineno, filename)}: "
