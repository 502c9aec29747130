"""The objects a user holds: ``Tracer`` (``with model.trace(...) as tracer``)
and ``Invoker`` (``with tracer.invoke(...)``).

Entering a tracer captures the ``with`` body (see :mod:`.capture`) and stops
Python from running it; leaving it runs the body through a
:class:`~.run.TraceRun` and binds the names the body assigned in the caller's
scope.  The tracer's methods (``invoke``, ``stop``, ``cache``, ``iter``,
``result``) are called from inside the body.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .._frames import describe_frame, hide_library_frames, user_frame, where_user_is
from ..errors import InvokeError, SeethroughError, TraceSourceError
from .barrier import Barrier
from .cache import Cache
from .capture import CapturedBlock
from .tasks import _EndOfSteps, stop_trace
from .namespace import BodyNamespace
from .run import Backend, TraceRun
from .runtime import current_task
from .saving import LazyText, NotSaved
from .takeover import TAKEN_OVER, Takeover, frame_namespace, write_back
from .values import narrow

if TYPE_CHECKING:
    from .contract import TracedModel


_sessions = threading.local()


class SessionScope:
    """The values traces lent to one session's scope unsaved (``model.session()``
    locally, or a remote session's body on the server): usable by the
    session's later traces, dropped when it ends."""

    def __init__(self, frame: Any, where: Any) -> None:
        self.frame = frame  # only names bound in this frame are tracked (None: any)
        self.where = where
        self._lent: dict[str, Any] = {}

    def lent(self, frame: Any, values: dict[str, Any], saved: list[Any]) -> None:
        """A trace handed ``values`` back unsaved into ``frame``; ``saved`` are
        the values it saved (they leave the session, wherever first computed)."""
        if saved and self._lent:
            ids = {id(value) for value in saved}
            for name in [n for n, value in self._lent.items() if id(value) in ids]:
                del self._lent[name]
        if self.frame is None or frame is self.frame:  # a helper's locals go when it returns
            self._lent.update(values)

    def leaving(self, namespace: dict) -> dict[str, NotSaved]:
        """Placeholders for the lent values still bound in ``namespace``."""
        lent, self._lent = self._lent, {}
        at = self.where  # the placeholders hold where the session was, not the session
        where = LazyText(lambda: f"in the session at {at}; only saved values leave a session")
        return {name: NotSaved(name, where) for name, value in lent.items() if name in namespace and namespace[name] is value}


def open_session() -> Any:
    """The innermost local ``model.session()`` open in this thread, or None."""
    stack = getattr(_sessions, "stack", None)
    return stack[-1] if stack else None


def enter_session(session: Any) -> None:
    """Mark ``session`` open: traces inside it hand unsaved values back as they
    are (calling ``session.lent(frame, values, saved_values)``)."""
    stack = getattr(_sessions, "stack", None)
    if stack is None:
        stack = _sessions.stack = []
    stack.append(session)


def exit_session(session: Any) -> None:
    stack = getattr(_sessions, "stack", None)
    if stack and stack[-1] is session:
        stack.pop()
    elif stack and session in stack:
        stack.remove(session)


def _drop(values: dict[str, Any]) -> None:
    """What a scan run before the real one (``scan=True``) does with its names."""



class Tracer:
    """``with model.trace(input) as tracer:`` — see the package docs."""

    # Defaults on the class: a tracer is built for every trace.
    _frame: Any = None
    _takeover: Takeover | None = None
    _captured: CapturedBlock | None = None
    _run: TraceRun | None = None
    _result: Any = None
    job: Any = None  # the remote request's handle (remote=True)

    def __init__(
        self,
        model: "TracedModel",
        args: tuple,
        kwargs: dict,
        backend: Backend,
        *,
        has_input: bool,
        keep_graph: bool = True,
        what: str = "model.trace(...)",
        keep_result: bool = False,
        remote: Any = None,
        pre_scan: Backend | None = None,
    ) -> None:
        self._model = model
        self._args = args
        self._kwargs = kwargs
        self._backend = backend
        self._has_input = has_input
        self._keep_graph = keep_graph
        self._what = what
        # Generation keeps its (small) result for `tracer.result` after the
        # block; a plain trace does not keep the model's output alive.
        self._keep_result = keep_result
        self._remote = remote  # RemoteOptions when the block runs on a server
        # `trace(..., scan=True)`: the scan backend to run the body with first
        self._pre_scan = pre_scan

    # -- the with block -----------------------------------------------------------
    def __enter__(self) -> "Tracer":
        if self._frame is not None:
            raise SeethroughError("this tracer is already running; each `with model.trace(...)` needs its own tracer.")
        self._takeover = Takeover.of_block(sys._getframe(1), self._what)
        self._captured = self._takeover.captured
        self._frame = self._takeover.frame
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        frame, self._frame = self._frame, None
        takeover, self._takeover = self._takeover, None
        if not takeover.end(exc_type):
            if exc_type is None:
                raise TraceSourceError(
                    f"the body of `with {self._what}` ran without seethrough: something else changed "
                    "tracing of this frame (a debugger stepping over the `with` line?). Step into "
                    "the body instead, or put the breakpoint inside it."
                )
            return False
        if self._pre_scan is not None:
            self._scan_first(frame)
        if self._remote is not None:
            self._run_remotely(frame)
            return True
        seed, globals_, _ = frame_namespace(frame)
        run = TraceRun(
            self._model,
            self._captured,
            self,
            seed,
            globals_,
            (self._args, self._kwargs) if self._has_input else None,
            self._backend,
            keep_graph=self._keep_graph,
        )
        self._run = run
        session = open_session()
        unsaved: list[str] | None = [] if session is not None else None

        def receive(values: dict[str, Any]) -> None:
            if self._keep_result:
                self._result = run.output
            write_back(frame, values)
            if session is not None:
                session.lent(frame, {name: values[name] for name in unsaved}, run.saves.values())

        try:
            run.run_to_end(receive, unsaved)
        except BaseException as error:
            # The run made the traceback start at the user's body; coming back
            # through here put this frame in front of it again: take it out.
            hide_library_frames(error)
            del frame, error  # the error's traceback keeps this frame: not the user's too
            raise
        finally:
            self._run = None
        return True

    def _scan_first(self, frame: Any) -> None:
        """``trace(..., scan=True)``: run the body once on fake tensors (see
        ``model.scan``) and drop what it assigned; a mistake fails here, before
        any real compute."""
        seed, globals_, _ = frame_namespace(frame)
        run = TraceRun(
            self._model, self._captured, self, seed, globals_,
            (self._args, self._kwargs) if self._has_input else None, self._pre_scan,
        )
        try:
            run.run_to_end(_drop)
        except BaseException as error:
            hide_library_frames(error)
            raise

    def _run_remotely(self, frame: Any) -> None:
        # The model runs it: remote execution is a layer above tracing.
        generate = getattr(self._backend, "generate_kwargs", None)
        self._model._run_remote(
            options=self._remote, kind="generate" if generate is not None else "trace",
            captured=self._captured, frame=frame, holder=self,
            args=self._args, kwargs=self._kwargs, keep_graph=self._keep_graph, generate=generate,
        )

    # -- used inside the body ---------------------------------------------------------
    def _task(self, what: str) -> Any:
        task = current_task()
        if task is None or task.run is None or task.run.tracer is not self:
            raise SeethroughError(
                f"`tracer.{what}` was used outside its trace body ({where_user_is()}); use it "
                "inside the `with model.trace(...) as tracer:` block."
            )
        return task

    def invoke(self, *args: Any, **kwargs: Any) -> "Invoker":
        """Add one input to the batch: ``with tracer.invoke(input):`` — its body
        sees only its own rows.  Without an input it sees the whole batch."""
        return Invoker(self, args, kwargs, has_input=bool(args or kwargs))

    def stop(self) -> None:
        """End the trace here: the rest of the forward pass is not run; values
        saved so far are kept."""
        self._task("stop()")
        stop_trace()

    def cache(
        self,
        modules: Any = None,
        include_inputs: bool = False,
        include_output: bool = True,
        detach: bool = True,
    ) -> Cache:
        """Record the values of ``modules`` (envoys or path strings; default:
        every module) as the forward pass reaches them; detached from the
        autograd graph unless ``detach=False``."""
        task = self._task("cache(...)")
        run = task.run
        envoys = self._model._resolve_modules(modules)
        cache = Cache(envoys, include_output, include_inputs, not detach, root=self._model, rows=task.rows)
        run.add_cache(cache)
        return cache

    @property
    def iter(self) -> "_Steps":
        """``for step in tracer.iter[:]`` runs its body at each generation step
        (also ``iter[2:5]``, ``iter[3]``, ``iter[[0, 4]]``); ``with
        tracer.iter[:]:`` does the same with a with-block's body."""
        return _Steps(self)

    def all(self) -> "StepLoop":
        """Every generation step: ``for step in tracer.all():`` or ``with tracer.all():``."""
        return self.iter[:]

    def next(self) -> None:
        """Wait for the next generation step."""
        task = self._task("next()")
        interleaver = task.run.interleaver
        interleaver.wait_for_step(task, interleaver.step + 1)

    @property
    def result(self) -> Any:
        """The return value of the traced call (the generated ids for
        ``model.generate``); inside the body it waits until the call returns."""
        return read_result(self, "tracer.result")

    def receive_result(self, value: Any) -> None:
        """Keep ``value`` as this tracer's ``result`` after the block: the call's
        return value as a server sent it back (``model.generate(..., remote=True)``)."""
        self._result = value

    def barrier(self, n_participants: int) -> Barrier:
        """A meeting point for ``n_participants`` invokes: each invoke that
        calls the returned barrier (``b()``) waits there until all of them
        have called it; names read after it from an earlier participant have
        their values as they were there (see :mod:`.barrier`)."""
        self._task("barrier(...)")
        if isinstance(n_participants, bool) or not isinstance(n_participants, int) or n_participants < 1:
            raise InvokeError(
                f"`tracer.barrier({n_participants!r})` ({where_user_is()}): the argument is the number "
                "of invokes that meet at the barrier, a whole number of at least 1 "
                "(e.g. `tracer.barrier(2)` for two invokes)."
            )
        return Barrier(self, n_participants, describe_frame(user_frame(sys._getframe(1))) or "your code")

    def log(self, *values: Any) -> None:
        """``print`` (kept for nnsight compatibility)."""
        print(*values)

    def __repr__(self) -> str:
        return f"<Tracer {self._what}>"


class _Steps:
    """``tracer.iter[...]``."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def __getitem__(self, selector: Any) -> "StepLoop":
        task = self._tracer._task("iter[...]")
        return StepLoop(task, selector)


class StepLoop:
    """The generation steps ``tracer.iter[...]`` selects, used either way:

    * ``for step in tracer.iter[:]:`` — the loop body runs at each step;
    * ``with tracer.iter[:] as step:`` (nnsight 0.5's form) — the with-block's
      body is taken over and run at each step, exactly like the loop's body;
      code after the block runs once generation has ended.
    """

    __slots__ = ("_task", "_selector", "_takeover")

    def __init__(self, task: Any, selector: Any) -> None:
        self._task = task
        self._selector = selector
        self._takeover: Takeover | None = None

    def __iter__(self) -> Iterator[int]:
        return _step_loop(self._task, self._selector)

    def __enter__(self) -> "StepLoop":
        if self._takeover is not None:
            raise SeethroughError(f"this step selection is already in use ({where_user_is()}); open a new `tracer.iter[...]`.")
        self._takeover = Takeover.of_block(sys._getframe(1), "tracer.iter[...]")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        if not takeover.end(exc_type):
            return False
        run_block(takeover.captured, takeover.frame, _step_loop(self._task, self._selector))
        return True


def run_block(captured: CapturedBlock, frame: Any, rounds: Iterable[Any]) -> None:
    """Run a taken-over with-block's body once per item of ``rounds`` (bound
    to its ``as`` name), as if Python had run it in ``frame``.

    In a trace body (module-level code in its own namespace) the block runs in
    that namespace, so other invokes see its names at once.  Elsewhere it runs
    in a namespace of its own (which binds what rewritten ``.save()`` calls
    need), and the names it assigned are written back to the frame at the end.
    """
    seed, globals_, module_level = frame_namespace(frame)
    direct = module_level and isinstance(globals_, BodyNamespace)
    ns = globals_ if direct else BodyNamespace(seed, globals_)
    try:
        for item in rounds:
            if captured.as_name:
                ns[captured.as_name] = item
            exec(captured.code, ns)
    except BaseException as error:
        if isinstance(error.__context__, TAKEN_OVER):
            error.__context__ = None  # the skip of the native run is no part of the user's error
        hide_library_frames(error)
        raise
    finally:
        if not direct:
            names = set(captured.stored) | ({captured.as_name} if captured.as_name else set())
            write_back(frame, {name: dict.__getitem__(ns, name) for name in names if dict.__contains__(ns, name)})


def _step_loop(task: Any, selector: Any) -> Iterator[int]:
    interleaver = task.run.interleaver
    if isinstance(selector, int):
        wanted: Iterator[int] = iter([selector])
    elif isinstance(selector, slice):
        start = selector.start or 0
        step = selector.step or 1

        def counting() -> Iterator[int]:
            index = start
            while selector.stop is None or index < selector.stop:
                yield index
                index += step

        wanted = counting()
    else:
        wanted = iter(sorted(selector))
    # Counted on the task while it is inside a step loop: a value that exists
    # only after generation (`model.generator.output`) refuses to be read there.
    task.step_loops = getattr(task, "step_loops", 0) + 1
    if interleaver.count_calls:
        # One forward (not generation): step i is each module's call number i, as in
        # nnsight; the body runs at once for every step, its reads wait for that call.
        outer, outer_open = task.iteration, task.iteration_open
        task.iteration_open = isinstance(selector, slice) and selector.stop is None
        try:
            for index in wanted:
                task.iteration = index
                yield index
        finally:
            task.iteration, task.iteration_open = outer, outer_open
            task.step_loops -= 1
        return
    try:
        for index in wanted:
            if interleaver.step > index:
                continue  # that step has passed; later ones may still come
            try:
                interleaver.wait_for_step(task, index)
            except _EndOfSteps:
                return
            yield index
    finally:
        task.step_loops -= 1


class Invoker:
    """``with tracer.invoke(input):`` — one input of a batched trace."""

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict, has_input: bool) -> None:
        self._tracer = tracer
        self._args = args
        self._kwargs = kwargs
        self._has_input = has_input
        self._takeover: Takeover | None = None
        self._captured: CapturedBlock | None = None

    def __enter__(self) -> "Invoker":
        task = current_task()
        if task is None or task.run is None or task.run.tracer is not self._tracer:
            raise InvokeError(
                f"`tracer.invoke(...)` was used outside its trace ({where_user_is()}); open it "
                "inside the `with model.trace() as tracer:` block."
            )
        self._takeover = Takeover.of_block(sys._getframe(1), "tracer.invoke(...)")
        self._captured = self._takeover.captured
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        if not takeover.end(exc_type):
            return False
        task = current_task()
        captured = self._captured
        task.run.register_invoke(captured, self._args, self._kwargs, self._has_input, captured.as_name, self)
        if captured.as_name:
            dict.__setitem__(task.ns, captured.as_name, self)
        return True


def read_result(tracer: "Tracer", what: str) -> Any:
    """``tracer.result``: the traced call's return value (inside the body it waits
    until the call returns).  ``what`` names the reader in errors
    (``model.generator.output`` reads it too, from :mod:`seethrough.models`)."""
    task = current_task()
    if task is not None and task.run is not None and task.run.tracer is tracer:
        run = task.run
        value = narrow(run.interleaver.request_result(task, what), task.rows, run.interleaver.batch_size)
        return run.present(value)
    if not tracer._keep_result:
        raise SeethroughError(
            f"`tracer.result` is kept after the block only for `model.generate(...)` "
            f"({where_user_is()}). For a trace, save the output inside the block: "
            "`out = tracer.result.save()` or `out = model.output.save()`."
        )
    return tracer._result
