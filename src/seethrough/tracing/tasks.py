"""The parts of an interleaved trace that the scheduler moves around.

A :class:`Task` is one body taking part in a trace (an invoke, the trace body
itself, or a persistent edit), run in its own greenlet; an :class:`Event` is
a value the forward pass has reached (a module's inputs or output) while the
tasks that asked for it are served.  The control-flow exceptions below end a
trace, a forward pass or a generation loop early.  The scheduler itself is
:class:`~.interleaver.Interleaver`.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn

import torch

from ..errors import MissedProviderError, OutOfOrderError
from .values import Handed

NEW, RUNNING, WAITING, BLOCKED, DONE = "new", "running", "waiting", "blocked", "done"


class _StopTrace(BaseException):
    """Raised by ``tracer.stop()`` inside a body; ends the trace early, keeping saves."""


def stop_trace() -> NoReturn:
    """End the running trace here, from inside its body (``tracer.stop()``,
    a harvest's ``run.stop()``): the rest of the forward is not run."""
    raise _StopTrace()


class _StopForward(BaseException):
    """Raised out of a hook to abandon the rest of the forward pass."""


class _EndOfSteps(BaseException):
    """Thrown into a task waiting for a generation step that never comes."""


class _LoopCutShort(BaseException):
    """Thrown into a task whose ``tracer.iter`` loop, in a single forward, asked
    for a call of a module that the forward did not make: the task ends there."""


class Task:
    """One body (an invoke, the trace body, or a persistent edit) in a trace."""

    # Defaults on the class: several tasks are built for every trace.
    greenlet: Any = None  # its worker greenlet while it runs
    state = NEW
    pending: tuple | None = None  # the event key it waits for
    # What it last asked for, for messages should the value never come:
    # (envoy or None, kind, the asking frame, its module had run before,
    # asked before the forward began).
    asked: tuple | None = None
    blocked_until: Callable[[], bool] | None = None
    never_unblocked: Callable[[], BaseException] | None = None  # its error, should it stay blocked
    waited_for: str | None = None  # what it last waited for, as a sentence for messages
    hooked_calls: set[int] | None = None  # ids of modules it ran itself with `hook=True`
    result_waited: tuple[str, str] | None = None  # (accessor, where) of a wait for the run's result
    iteration: int | None = None  # in a single forward's `tracer.iter` loop: the call number it reads
    iteration_open = False  # ... and that loop has no end (`iter[:]`, `all()`): it ends quietly
    batch: Any = None  # values it waits for in a row, served without switching into it (see .prefetch)

    # nnsight code catches these as `Mediator.OutOfOrderError` / `Mediator.
    # MissedProviderError`; `seethrough.intervention.interleaver.Mediator` is this class.
    OutOfOrderError = OutOfOrderError
    MissedProviderError = MissedProviderError

    def __init__(
        self,
        run: Any,  # the TraceRun it belongs to (a layer above: see tracing/__init__.py)
        index: int,
        label: str,
        code: Any,
        ns: dict,
        rows: slice | None,
        stored: frozenset[str],
        is_invoke: bool,
    ) -> None:
        self.run = run
        self.index = index
        self.label = label
        self.code = code
        self.ns = ns
        self.rows = rows
        self.grad_enabled = torch.is_grad_enabled()
        self.stored = stored
        self.is_invoke = is_invoke

    def exec_body(self, *_: Any) -> None:
        """Run the body's code in its namespace (in its worker greenlet, see :mod:`.stacks`)."""
        exec(self.code, self.ns)

    @property
    def done(self) -> bool:
        return self.state == DONE

    def __repr__(self) -> str:
        return f"<Task {self.label} {self.state}>"


class _HookedCall:
    """What a task switches to the main greenlet with to run a module there,
    watched by the trace (``envoy(..., hook=True)``, see :meth:`Interleaver.call_hooked`)."""

    __slots__ = ("module", "args", "kwargs")

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.module = module
        self.args = args
        self.kwargs = kwargs


# The batch size of events from a hooked call: its values are that call's
# own, not rows of the traced batch, so no invoke's view narrows them.
_UNBATCHED = -1


class Event:
    """A value the forward pass has reached: a module's inputs or its output."""

    __slots__ = ("key", "value", "served", "batch_size", "kind", "views", "handed")

    def __init__(self, key: tuple, kind: str, value: Any, batch_size: int) -> None:
        self.key = key
        self.kind = kind
        self.value = value
        self.served: set[int] = set()
        self.batch_size = batch_size
        # task index -> (the value it was narrowed from, the task's view): a
        # task reading the same value twice gets the same tensors.
        self.views: dict[int, tuple[Any, Any]] | None = None
        # The views handed out, while autograd is on (see `values.rejoin`).
        self.handed: Handed | None = None


def _by_index(task: Task) -> int:
    return task.index
