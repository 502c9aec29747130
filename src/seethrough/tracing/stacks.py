"""Where the greenlets of a trace run: one hub per thread starts them all.

A trace runs its forward pass in a *forward* greenlet and each body in a
*worker* greenlet; they switch back and forth at every value a body reads.
This module decides where on the C stack those greenlets live, because a
wrong answer crashes the interpreter.

Why.  greenlet keeps a greenlet's own slice of the C stack, but the words
just above that slice are whatever the thread's stack holds at the moment the
greenlet runs.  Code that walks the whole C stack walks into them: torch does
it in every C++ error it raises (``c10::Error`` records a backtrace, e.g. for
an ``IndexError`` from ``tensor[999]``).  If those words are not the frames the
greenlet was started from, the walk follows garbage and the process dies with
SIGSEGV.  That happened when a worker started in one trace was reused by a
later trace entered at another stack depth (two ordinary pytest tests), and
could happen whenever a greenlet is switched into from a deeper or shallower
place than where it was started.

The rule kept here.  Every forward and worker greenlet is started by the
thread's :class:`Hub`, from one line of code (:meth:`Hub._serve`), and only
runs while the hub waits at that same line, with the same frames under it.
So the frames above each greenlet's slice are always the hub's own, valid
ones, in every trace, also for greenlets reused from the pools below (which
saves ~10 us per greenlet: CPython maps a fresh frame stack for each new
greenlet that runs Python code).  The hub itself is started once per thread,
wherever the first trace happens to be; under its loop lie more C frames than
any backtrace walks (torch stops at 64), so a walk ends inside the hub before
it reaches the stack of whoever started it.

What it costs.  A trace takes three switches more than running its forward
on the caller's own stack: to the hub, to a pooled forward greenlet, and from
that straight back to the caller.  The hub is started (once per thread) some
200 C calls below its first caller, so later callers at a similar depth never
share its stack region and switching to it copies none of the padding.

Callers use :func:`run_on_hub` (run one trace's interleaving in a forward
greenlet) and :func:`take_worker` / :func:`give_back_worker` (the invoke
bodies' greenlets, started on the hub when new).
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable

import greenlet

from .runtime import FINISHED, TaskGreenlet

_local = threading.local()
_POOL_LIMIT = 64  # idle workers and idle forward greenlets kept per thread
# C-level calls under the hub's loop: each is at least one C frame (an
# interpreter frame of its own), so a C stack walk started in any trace
# greenlet passes more frames than backtrace limits allow (torch's is 64)
# before it could reach the frames under the hub.
_PADDING_CALLS = 80
# C-level calls between the caller that starts a thread's hub and the hub.
_CLEARANCE_CALLS = 200


class _Start:
    """Start ``worker`` (new), from the hub's line."""

    __slots__ = ("worker",)

    def __init__(self, worker: greenlet.greenlet) -> None:
        self.worker = worker


class _Forward(greenlet.greenlet):
    """A forward greenlet: runs one job at a time (``function``, for
    ``requester``); between jobs it holds nothing of them."""

    __slots__ = ("function", "requester", "value", "error")


def _forward_loop(*_: Any) -> None:
    """The life of a forward greenlet: run its job, go back to the pool, hand
    the outcome straight to the requester (not through the hub: one switch
    fewer), and wait there until the hub starts the next job here."""
    # Everything travels on the greenlet, nothing in this frame's variables:
    # a parked forward greenlet must keep no finished trace alive.
    me = greenlet.getcurrent()
    idle = _hub().idle_forwards
    while True:
        try:
            me.value = me.function()
        except BaseException as error:  # noqa: BLE001 - handed to the requester, who raises it
            me.error = error
        me.function = None
        if len(idle) < _POOL_LIMIT:
            idle.append(me)
        me.requester.switch(me)


def _pad(calls: int, then: Callable[[], Any]) -> Any:
    if calls:
        # Through functools.partial, a C call: each level is C frames too,
        # not only a Python frame (which 3.11+ runs without C recursion).
        return functools.partial(_pad, calls - 1, then)()
    return then()


class Hub:
    """The greenlet that starts, and waits beneath, every trace greenlet of one thread."""

    def __init__(self) -> None:
        root = greenlet.getcurrent()
        while root.parent is not None:
            root = root.parent
        self.greenlet = greenlet.greenlet(self._run, parent=root)
        self.idle_forwards: list[_Forward] = []
        # Messages travel here, not as switch arguments: the hub's frame keeps
        # nothing alive while it waits.
        self.inbox: Any = None

    def _run(self) -> None:
        _pad(_PADDING_CALLS, self._serve)

    def _serve(self) -> None:
        """The hub's loop.  Each turn switches to one greenlet, always from the
        same line, and is woken by the next message."""
        while True:
            target = self._next()
            try:
                target.switch()  # the one line every trace greenlet is started from
            except BaseException:  # noqa: BLE001 - a forward greenlet killed while parked
                self.inbox = None
            target = None

    def _next(self) -> greenlet.greenlet:
        """Where the hub switches to next, given the message in its inbox: a
        worker to start, or a job (a forward greenlet given its function)."""
        message, self.inbox = self.inbox, None
        if type(message) is _Start:
            return message.worker
        if message is not None:
            return message
        # Nothing else is sent here: give control back to the thread's root.
        return self.greenlet.parent

    def send(self, message: Any) -> None:
        """Hand ``message`` to the hub (from the current greenlet); back here
        when the greenlet it starts switches here."""
        self.inbox = message
        self.greenlet.switch()


def _hub() -> Hub:
    hub = getattr(_local, "hub", None)
    if hub is None or hub.greenlet.dead:
        hub = _local.hub = Hub()
        # Started (by a first, empty job) below the caller's stack rather than
        # at it: callers no deeper than that never share the hub's stack
        # region, so switching to the hub copies none of it (its padding
        # alone is tens of kilobytes, ~2 us a round trip when copied).
        _pad(_clearance(), functools.partial(_first_job, hub))
    return hub


def _first_job(hub: Hub) -> None:
    """Start ``hub`` (here, wherever the stack is) with one empty job."""
    forward = _Forward(_forward_loop, parent=hub.greenlet)
    forward.function, forward.requester, forward.value, forward.error = _nothing, greenlet.getcurrent(), None, None
    hub.inbox = forward
    hub.greenlet.switch()
    forward.requester = None


def _nothing() -> None:
    return None


def _clearance() -> int:
    """C-level calls to leave between the first caller and the hub: up to
    ``_CLEARANCE_CALLS``, within what the recursion limit leaves room for."""
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth += 1
        frame = frame.f_back
    room = sys.getrecursionlimit() - depth - 2 * _PADDING_CALLS - 100
    return max(0, min(_CLEARANCE_CALLS, room))


def run_on_hub(function: Callable[[], Any]) -> Any:
    """``function()``, run in a forward greenlet started by this thread's hub
    (see the module docstring); its return value, or its exception raised here."""
    hub = getattr(_local, "hub", None)
    if hub is None or hub.greenlet.dead:
        hub = _hub()
    forwards = hub.idle_forwards
    forward = forwards.pop() if forwards else _Forward(_forward_loop, parent=hub.greenlet)
    forward.function = function
    forward.requester = greenlet.getcurrent()
    forward.value = forward.error = None
    hub.inbox = forward
    hub.greenlet.switch()  # the forward greenlet switches back here when done
    forward.requester = None
    error, forward.error = forward.error, None
    if error is not None:
        raise error
    value, forward.value = forward.value, None
    return value


def _worker_loop(*_: Any) -> None:
    # Started by the hub, a worker first parks (switching to its parent, the
    # forward greenlet that asked for it); after that it runs one task per
    # switch into it.  The task travels on the greenlet (`me.task`), not as an
    # argument, which the first call would otherwise keep alive for good.  A
    # body that raises ends its worker, and the error reaches the forward
    # greenlet with its traceback (nothing of it stays in the pool).
    me = greenlet.getcurrent()
    me.parent.switch(FINISHED)
    while True:
        task = me.task
        task.exec_body()
        task = None
        me.task = None
        me.parent.switch(FINISHED)


def take_worker(task: Any, parent: greenlet.greenlet) -> TaskGreenlet:
    """A worker greenlet for ``task``, parked and ready to run it when switched
    into; its parent is ``parent``, the forward greenlet of the running trace
    (the current greenlet, itself started by the hub)."""
    idle = getattr(_local, "idle", None)
    if idle:
        worker = idle.pop()
        worker.parent = parent
    else:
        worker = TaskGreenlet(_worker_loop, parent=parent)
        _hub().send(_Start(worker))  # back here once it has parked
    worker.task = task
    return worker


def give_back_worker(worker: TaskGreenlet) -> None:
    """Return a worker whose body has ended to this thread's pool."""
    worker.task = None
    if worker.dead:
        return
    idle = getattr(_local, "idle", None)
    if idle is None:
        idle = _local.idle = []
    if len(idle) < _POOL_LIMIT:
        idle.append(worker)
