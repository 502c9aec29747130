"""``tracer.barrier(n)``: a point where n invokes of one trace meet.

Invokes run side by side in one forward pass, each in its own greenlet (see
:mod:`.interleaver`).  An invoke that calls a barrier sleeps at the call until
n invokes have called it; the last one to arrive lets them all go on, and the
barrier is ready for its next round (so one barrier may be called in a loop,
once per step, by the same invokes).  At that moment every participant's reads
of names assigned by an earlier participant are pinned to their values there
(:meth:`.namespace.CrossFlow.synchronise`): a read after the barrier sees the
value as it was at the barrier, whatever the earlier invoke assigns later.

.. code-block:: python

    with model.trace() as tracer:
        b = tracer.barrier(2)
        with tracer.invoke(clean):
            h = model.layers[12].output
            b()                                   # h is ready
        with tracer.invoke(corrupt):
            b()                                   # wait for it
            model.layers[12].output[:, 3] = h[:, 3]

Misuse fails with an :class:`~seethrough.errors.InvokeError` naming the lines
and the fix, never a hang: a call outside an invoke of the barrier's own trace,
more distinct invokes calling it than ``n``, or a round that not all ``n``
invokes reach before the forward pass ends (reported at the end of the
forward: the barrier hands that error to ``Interleaver.block``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .._frames import describe_frame, user_frame
from ..errors import InvokeError
from .runtime import current_task

if TYPE_CHECKING:
    from .tasks import Task


class Barrier:
    """What ``tracer.barrier(n)`` returns: call it (``b()``) in each of the n invokes."""

    __slots__ = ("_tracer", "n", "made_at")

    def __init__(self, tracer: Any, n: int, made_at: str) -> None:
        self._tracer = tracer
        self.n = n
        self.made_at = made_at  # "file:line: `source`" of the tracer.barrier(...) call

    def __call__(self) -> None:
        task = current_task()
        run = task.run if task is not None else None
        if run is None or run.tracer is not self._tracer or not task.is_invoke:
            raise InvokeError(self._outside_message(task, run))
        meeting = run.meeting(self, lambda: Meeting(self))
        if task.index not in meeting.callers:
            if len(meeting.callers) >= self.n:
                raise InvokeError(self._too_many_message(meeting, task))
            meeting.callers[task.index] = task.label
        meeting.arrived.append(task)
        if len(meeting.arrived) < self.n:
            this_round = meeting.round
            called_at = _here()
            run.interleaver.block(
                task, lambda: meeting.round != this_round, lambda: InvokeError(meeting.never_met_message(task, called_at)))
            if meeting.released_by is not None and meeting.released_by != task.label:
                task.waited_for = (
                    f"Before that line this invoke waited at a barrier until {meeting.released_by} "
                    f"reached it, which it did only after the forward pass had moved on: in "
                    f"{meeting.released_by}, call the barrier right after the module whose value the "
                    "invokes share, or read the module before the barrier in this invoke."
                )
            return
        participants, meeting.arrived = meeting.arrived, []
        meeting.round += 1
        meeting.released_by = task.label
        if run.flow is not None:
            run.flow.synchronise(participants)

    def _outside_message(self, task: "Task | None", run: Any) -> str:
        where = _here() or "in your code"
        if run is not None and run.tracer is self._tracer:
            what = "in the trace body, outside any invoke"
        elif run is not None:
            what = "in another trace than the one that made it"
        else:
            what = "outside a running trace"
        return (
            f"a barrier was called {what} (at {where}). A barrier is a meeting point for invokes: "
            f"call it inside `with tracer.invoke(...)` blocks of the trace whose `tracer.barrier(...)` "
            f"made it (at {self.made_at})."
        )

    def _too_many_message(self, meeting: "Meeting", task: "Task") -> str:
        before = ", ".join(meeting.callers.values())
        return (
            f"a barrier made with `tracer.barrier({self.n})` (at {self.made_at}) was called by "
            f"{task.label} (at {_here() or 'your code'}) after {before} had called it: more invokes "
            f"than the {self.n} it is made for. Make it `tracer.barrier({self.n + 1})` if they should "
            "all meet there, or give each group of invokes its own barrier "
            "(e.g. `bs = [tracer.barrier(2) for _ in range(k)]`, one per pair)."
        )

    def __repr__(self) -> str:
        return f"<Barrier for {self.n} invokes>"


class Meeting:
    """The state of one barrier within one run (kept on the run, so that a
    barrier object never holds a trace's tasks)."""

    __slots__ = ("barrier", "callers", "arrived", "round", "released_by")

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.callers: dict[int, str] = {}  # task index -> label, every invoke that called it
        self.arrived: list[Task] = []  # who waits in the current round
        self.round = 0
        self.released_by: str | None = None

    def never_met_message(self, task: "Task", called_at: str) -> str:
        barrier = self.barrier
        arrived = ", ".join(t.label for t in self.arrived) or task.label
        missing = barrier.n - len(self.arrived)
        return (
            f"{task.label} waited at a barrier (at {called_at or 'your code'}) that only "
            f"{len(self.arrived)} of its {barrier.n} invokes reached before the forward pass ended "
            f"({arrived}; {missing} more never came). `tracer.barrier({barrier.n})` (at {barrier.made_at}) "
            f"must be called by {barrier.n} invokes, the same number of times each: call it in the "
            "invoke(s) this one should meet, or make the barrier for fewer invokes."
        )


def _here() -> str:
    """The user's current line, described (or an empty string)."""
    return describe_frame(user_frame(sys._getframe(1)))
