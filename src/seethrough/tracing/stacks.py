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

Callers use :func:`run_on_hub` (run one trace's interleaving in a forward
greenlet) and :func:`take_worker` / :func:`give_back_worker` (the invoke
bodies' greenlets, started on the hub when new).
"""

from __future__ import annotations

import functools
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


class _Job:
    """Run ``function`` in a forward greenlet; hand the outcome to ``requester``."""

    __slots__ = ("function", "requester")

    def __init__(self, function: Callable[[], Any], requester: greenlet.greenlet) -> None:
        self.function = function
        self.requester = requester


class _Start:
    """Start ``worker`` (new), from the hub's line."""

    __slots__ = ("worker",)

    def __init__(self, worker: greenlet.greenlet) -> None:
        self.worker = worker


class _Outcome:
    """What a job's function returned (``value``) or raised (``error``)."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class _Forward(greenlet.greenlet):
    """A forward greenlet: runs jobs; between them it holds nothing of them."""

    __slots__ = ("job", "outcome")


def _outcome(function: Callable[[], Any]) -> _Outcome:
    try:
        return _Outcome(function(), None)
    except BaseException as error:  # noqa: BLE001 - handed to the job's requester, who raises it
        return _Outcome(None, error)


def _forward_loop(*_: Any) -> None:
    """The life of a forward greenlet: run its job, report to the hub, park."""
    # Everything travels on the greenlet, nothing in this frame's variables:
    # a parked forward greenlet must keep no finished trace alive.
    me = greenlet.getcurrent()
    hub = _hub()
    while True:
        me.outcome = _outcome(me.job.function)
        hub.inbox = me
        hub.greenlet.switch()


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
        self.outbox: Any = None

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
        """Where the hub switches to next, given the message in its inbox."""
        message, self.inbox = self.inbox, None
        kind = type(message)
        if kind is _Start:
            return message.worker
        if kind is _Job:
            forwards = self.idle_forwards
            forward = forwards.pop() if forwards else _Forward(_forward_loop, parent=self.greenlet)
            forward.job = message
            return forward
        if kind is _Forward:  # it has run its job
            job, outcome = message.job, message.outcome
            message.job = message.outcome = None
            if len(self.idle_forwards) < _POOL_LIMIT:
                self.idle_forwards.append(message)
            self.outbox = outcome
            return job.requester
        # Nothing else is sent here: give control back to the thread's root.
        return self.greenlet.parent

    def send(self, message: Any) -> Any:
        """Hand ``message`` to the hub (from the current greenlet) and wait for
        the hub to switch back here; what it left in its outbox."""
        self.inbox = message
        self.greenlet.switch()
        answer, self.outbox = self.outbox, None
        return answer


def _hub() -> Hub:
    hub = getattr(_local, "hub", None)
    if hub is None or hub.greenlet.dead:
        hub = _local.hub = Hub()
    return hub


def run_on_hub(function: Callable[[], Any]) -> Any:
    """``function()``, run in a forward greenlet started by this thread's hub
    (see the module docstring); its return value, or its exception raised here."""
    outcome = _hub().send(_Job(function, greenlet.getcurrent()))
    if outcome.error is not None:
        error = outcome.error
        outcome = None  # no reference cycle through this frame
        raise error
    return outcome.value


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
        task._body()
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
