"""Which trace is running here, and the ``save`` functions.

Each thread has its own stack of running traces; inside a trace each invoke
body runs in its own greenlet, which knows its task.  Library entry points
(``Envoy.output``, ``save``, ``tracer.stop()``, ...) find their task through
these two lookups, so helper functions called from a trace body work too.

This module sits below the tasks and the runs it finds (:mod:`.tasks`,
:mod:`.run`): it hands them back as it was given them and imports neither.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import greenlet
import torch

T = TypeVar("T")

_local = threading.local()


class TaskGreenlet(greenlet.greenlet):
    """The greenlet an invoke body runs in; carries its task (a :class:`.tasks.Task`)."""

    __slots__ = ("task",)


class _Finished:
    """What a worker switches back with when its body has ended."""

    __slots__ = ()


FINISHED = _Finished()


def current_task() -> Any:
    """The :class:`.tasks.Task` whose body runs here, or None outside a trace body."""
    current = greenlet.getcurrent()
    return current.task if type(current) is TaskGreenlet else None


def running_traces() -> list[Any]:
    """The :class:`.run.TraceRun` s this thread runs, innermost last."""
    runs = getattr(_local, "runs", None)
    if runs is None:
        runs = _local.runs = []
    return runs


def current_run() -> Any:
    """The trace running here: the body's own inside a trace body (also in a
    helper it calls), else the innermost trace this thread runs, else None."""
    current = greenlet.getcurrent()
    if type(current) is TaskGreenlet:
        return current.task.run
    runs = getattr(_local, "runs", None)
    return runs[-1] if runs else None


def save(value: T, *, keep_graph: bool | None = None) -> T:
    """Keep ``value`` after the trace ends; returns ``value`` itself.

    Inside a trace body, ``h = seethrough.save(model.layer.output)`` is the
    same as ``h = model.layer.output.save()`` and works on any object
    (tensors, tuples, model outputs, numbers).  Outside a trace it does nothing
    and returns ``value``.  The saved value is the live object (the same
    tensor, not a copy): a saved tensor keeps its autograd graph, as a plain
    forward gives, and shows later in-place edits of it (save
    ``value.clone()`` for a snapshot).  ``keep_graph=False`` detaches it when
    the trace ends; ``keep_graph=True`` keeps the graph even in a trace run
    with ``keep_graph=False``; by default the trace's setting applies.
    """
    run = current_run()
    if run is None:
        return value
    return run.saves.add(value, keep_graph=keep_graph)


def tensor_save(self: Any) -> Any:
    """``Tensor.save()`` while a trace runs (installed by :mod:`.patches`)."""
    return save(self)


def ours(function: Any) -> Any:
    """Mark a ``save`` method as seethrough's (see :func:`save_method`)."""
    function.seethrough_save = True
    return function


ours(tensor_save)

# The name argument-less ``X.save()`` calls in captured bodies are rewritten to
# (see .capture); every body namespace binds it to ``save_method``.  Remote
# bodies cannot spell it: the sandbox refuses names with underscores.
SAVE_METHOD = "__seethrough_save__"


# Types known to have no `save` of their own (skips the lookups below).
_BUILTIN_DATA = frozenset({list, dict, tuple, set, int, float, bool, str, bytes, complex, type(None)})


def save_method(value: T) -> T:
    """What ``value.save()`` means in a trace body.

    * A value whose class defines ``save`` (or that carries a ``save``
      attribute of its own) keeps it: ``value.save()`` is called as written,
      as in nnsight, where an object's own method wins.  To mark such an
      object for keeping, use ``seethrough.save(value)``.
    * Everything else (tensors, lists, dicts, tuples, numbers, strings, model
      outputs, ...) is marked with :func:`save` and returned as it is.
    """
    kind = type(value)
    if kind is torch.Tensor or kind in _BUILTIN_DATA:
        return save(value)  # the common case (`.output.save()`): no `save` of their own to look for
    if kind is super:  # `super().save()` in a class defined in the body
        return value.save()
    own = getattr(kind, "save", None)
    if own is tensor_save:  # a tensor while traces run (the common case)
        return save(value)
    if own is None:
        try:
            own = object.__getattribute__(value, "__dict__").get("save")
        except AttributeError:  # no instance attributes (lists, ints, slotted classes)
            own = None
    if own is None or getattr(own, "seethrough_save", False):
        return save(value)
    return value.save()
