"""Where is the user's code?  Frame helpers for error messages and tracebacks.

seethrough runs the user's trace body through its own machinery, so the frames
of the library sit between the user's ``with`` statement and the user's
lines.  These helpers find the innermost frame that belongs to the user (to
name it in messages) and cut library frames out of tracebacks, so a failing
trace points at the user's line, not at ours.
"""

from __future__ import annotations

import linecache
import os
import sys
from types import FrameType, TracebackType

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Frames of these packages are plumbing between the user's code and ours.
_PLUMBING = ("greenlet",)


def is_library_file(filename: str) -> bool:
    """True for files of seethrough itself."""
    return filename.startswith(_PACKAGE_DIR)


def user_frame(start: FrameType | None = None) -> FrameType | None:
    """The innermost frame, from ``start`` outwards, that is not seethrough's."""
    frame = start if start is not None else sys._getframe(1)
    while frame is not None and is_library_file(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def describe_frame(frame: FrameType | None) -> str:
    """``file:line: `source``` for a frame, or an empty string."""
    if frame is None:
        return ""
    return describe_location(frame.f_code.co_filename, frame.f_lineno)


def describe_location(filename: str, lineno: int | None) -> str:
    if lineno is None:
        return filename
    line = linecache.getline(filename, lineno).strip()
    where = f"{_short(filename)}:{lineno}"
    return f"{where}: `{line}`" if line else where


def where_user_is(start: FrameType | None = None) -> str:
    """A phrase like ``at script.py:12: `x = ...``` naming the user's current line."""
    frame = user_frame(start if start is not None else sys._getframe(1))
    text = describe_frame(frame)
    return f"at {text}" if text else "in your code"


def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return rel if not rel.startswith("..") else filename


def strip_library_frames(tb: TracebackType | None) -> TracebackType | None:
    """Drop leading seethrough frames from a traceback, keeping everything from
    the first user frame on (deeper library frames called by user code stay:
    they explain what the user's call did)."""
    while tb is not None and (
        is_library_file(tb.tb_frame.f_code.co_filename)
        or tb.tb_frame.f_code.co_filename.endswith(_PLUMBING)
    ):
        tb = tb.tb_next
    return tb
