"""Where is the user's code?  Frame helpers for error messages and tracebacks.

seethrough runs the user's trace body through its own machinery, so the frames
of the library sit between the user's ``with`` statement and the user's
lines.  These helpers find the innermost frame that belongs to the user (to
name it in messages) and cut library frames out of tracebacks, so a failing
trace points at the user's line, not at ours.  With ``CONFIG.APP.DEBUG`` on
(``SEETHROUGH_DEBUG=1`` / ``NNSIGHT_DEBUG=1``), tracebacks are left whole,
library frames included (see :func:`show_library_frames`).
"""

from __future__ import annotations

import linecache
import os
import sys
from types import FrameType, TracebackType

from .config import CONFIG

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


def show_library_frames() -> bool:
    """Whether tracebacks keep seethrough's own frames (``CONFIG.APP.DEBUG``)."""
    return CONFIG.APP.DEBUG


def hide_library_frames(error: BaseException) -> None:
    """Unless ``CONFIG.APP.DEBUG`` is on, take seethrough's frames out of
    ``error``'s traceback (in place), wherever they are in it."""
    if not CONFIG.APP.DEBUG:
        error.__traceback__ = only_user_frames(error.__traceback__)


def _is_plumbing(tb: TracebackType) -> bool:
    filename = tb.tb_frame.f_code.co_filename
    return is_library_file(filename) or filename.endswith(_PLUMBING)


def only_user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback without any frame of seethrough (or of greenlet), wherever
    in the chain: what the user's code called and what it was called by, with
    the library's plumbing in between left out.  None if nothing is left."""
    kept = []
    while tb is not None:
        if not _is_plumbing(tb):
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):  # tracebacks link forward: rebuild from the innermost
        result = TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result
