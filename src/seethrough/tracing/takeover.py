"""Take a ``with`` block over from Python, and hand its results back.

When a tracer is entered, Python would go on to run the block's body itself.
We stop it before the first instruction of the body (a one-shot opcode trace
on the caller's frame raises :class:`_TakenOver`, which the tracer's
``__exit__`` swallows), run the captured body our own way, and then write the
names it assigned back into the caller's frame, as if the body had run there.

Only the caller's frame is traced, only until its next instruction, and any
trace function already installed (a debugger, coverage) is put back at once.

Python calls ``__exit__`` while the skip (:class:`_TakenOver`) is the
exception being handled.  Code run from there would have every exception it
raises, even those it catches itself, chained to it (created eagerly, with a
context): a model's forward raises and catches many internally (``hasattr``,
``StopIteration``), so a trace would cost more the bigger the model.  The
body is run with no exception being handled (:func:`unhandle`).
"""

from __future__ import annotations

import ctypes
import inspect
import sys
from types import FrameType
from typing import Any, Callable

from .capture import capture_with_block


_CO_OPTIMIZED = inspect.CO_OPTIMIZED  # set on function code: locals live in fast slots


class _TakenOver(BaseException):
    """Raised into the caller's frame to skip the native run of a with-body.

    A BaseException so that no ``except Exception`` in between can catch it."""


TAKEN_OVER = _TakenOver


def _noop_trace(frame: FrameType, event: str, arg: Any) -> None:
    return None


# PyErr_SetExcInfo(type, value, traceback) sets the exception being handled,
# taking over a reference to each argument (NULL for none).
_set_exc_info = ctypes.pythonapi.PyErr_SetExcInfo
_set_exc_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_set_exc_info.restype = None


def unhandle() -> None:
    """In ``__exit__`` of a taken-over block: from here on no exception is
    being handled (as outside any ``except``), so that the body's run raises
    exceptions as a plain run does (see the module docs).

    Nothing needs putting back: when ``__exit__`` returns or raises, Python
    itself restores what was handled before the ``with`` statement (its
    reference to the skip is the one dropped here)."""
    if sys.exception() is not None:
        _set_exc_info(None, None, None)


class Takeover:
    """One armed skip of one ``with`` body in one frame."""

    __slots__ = ("frame", "captured", "_old_global", "_old_local", "_old_opcodes", "_armed")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self._armed = False

    @classmethod
    def of_block(cls, frame: FrameType, what: str) -> "Takeover":
        """Capture the body of the ``with`` statement ``frame`` is entering
        (``.captured``) and stop Python from running it."""
        takeover = cls(frame)
        takeover.captured = capture_with_block(frame, what)
        takeover.arm()
        return takeover

    def end(self, exc_type: Any) -> bool:
        """Undo :meth:`arm`; True when the body was taken over, i.e. is ours
        to run (from ``__exit__``, with no exception being handled any more:
        see :func:`unhandle`)."""
        if self._armed:
            self.disarm()
        if exc_type is TAKEN_OVER:
            unhandle()
            return True
        return False

    def arm(self) -> None:
        frame = self.frame
        self._old_global = old_global = sys.gettrace()
        self._old_local = frame.f_trace
        self._old_opcodes = frame.f_trace_opcodes
        frame.f_trace = _raise_taken_over
        frame.f_trace_opcodes = True
        if old_global is None:
            # Frame-level trace functions only fire while some trace function is set.
            sys.settrace(_noop_trace)
        self._armed = True

    def disarm(self) -> None:
        if not self._armed:
            return
        frame = self.frame
        frame.f_trace_opcodes = self._old_opcodes
        frame.f_trace = self._old_local
        old_global = self._old_global
        if old_global is None:
            sys.settrace(None)
        elif sys.gettrace() is not old_global:
            sys.settrace(old_global)
        self._armed = False
        self._old_global = self._old_local = None


def _raise_taken_over(frame: FrameType, event: str, arg: Any) -> Callable | None:
    if event == "opcode" or event == "line":
        raise _TakenOver()
    return _raise_taken_over


def frame_namespace(frame: FrameType) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(locals snapshot, globals, is_module_level) of the caller's frame."""
    namespace = frame.f_locals
    if namespace is frame.f_globals:
        return {}, frame.f_globals, True
    snapshot = dict(namespace)
    _forget_cached_locals(frame, namespace)
    return snapshot, frame.f_globals, False


def _forget_cached_locals(frame: FrameType, namespace: dict) -> None:
    # Before 3.13 `frame.f_locals` is a dict cached on the frame; its entries
    # would keep values alive after the user deletes the variables.  Only the
    # cache is emptied: the frame's real variables are untouched.
    # Class bodies and exec'd code keep their real namespace there: leave those.
    if sys.version_info < (3, 13) and frame.f_code.co_flags & _CO_OPTIMIZED:
        namespace.clear()


if sys.version_info >= (3, 13):

    def write_back(frame: FrameType, values: dict[str, Any]) -> None:
        """Bind ``values`` as names in ``frame`` (PEP 667 write-through proxy)."""
        if not values:
            return
        proxy = frame.f_locals
        for name, value in values.items():
            proxy[name] = value

else:
    _locals_to_fast = ctypes.pythonapi.PyFrame_LocalsToFast
    _locals_to_fast.argtypes = [ctypes.py_object, ctypes.c_int]
    _locals_to_fast.restype = None

    def write_back(frame: FrameType, values: dict[str, Any]) -> None:
        """Bind ``values`` as names in ``frame``: module/class namespaces directly,
        function locals (and cells) through ``PyFrame_LocalsToFast``."""
        if not values:
            return
        namespace = frame.f_locals
        namespace.update(values)
        if frame.f_code.co_flags & _CO_OPTIMIZED:
            _locals_to_fast(frame, 0)
            _forget_cached_locals(frame, namespace)
