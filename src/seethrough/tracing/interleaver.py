"""Interleave trace bodies with the running forward pass.

Every body that takes part in a trace (each invoke, and the trace body
itself) is a :class:`Task` running in its own greenlet.  The forward pass runs
in the trace's forward greenlet (the "main" one here; see :mod:`.stacks` for
where these greenlets live and why).  When a body reads
``module.output``, its task asks the :class:`Interleaver` for the event
(module, "output"): a hook is put on that module (only on modules someone asks
for, so untouched modules cost nothing), and the task sleeps.  When the
forward reaches the module, the hook wakes each waiting task in invoke order
with its view of the value; the task runs on until it asks for the next
value, and then the forward continues with whatever the tasks changed.

A task may also *block* until a condition holds: a name another invoke has
yet to assign (:mod:`.namespace`), or a barrier the other invokes have yet to
reach (:mod:`.barrier`).  Blocked tasks run again, in invoke order, as soon as
their condition holds; those still blocked when the forward ends get the
error their blocker gave with the condition.

The meaning of ``envoy.output`` follows from this: the value of the module's
current call if the forward is stopped at it, else of its next call.  A value
asked for after its module has run is never delivered; when the forward ends,
each task still waiting gets an :class:`OutOfOrderError` raised at its line.

Switching greenlets costs about a microsecond, so reading a value costs little
more than the hook itself.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable

import greenlet
import torch

from .._frames import describe_frame, user_frame, where_user_is
from ..errors import InvokeError, MissedProviderError, ModuleNotCalledError, OutOfOrderError, ShapeMismatchError
from .hooks import HookSet
from .messages import after_result_message, never_called_message, too_late_message
from .runtime import FINISHED
from .sentinels import MISSING
from .stacks import give_back_worker, take_worker
from .tasks import (BLOCKED, DONE, RUNNING, WAITING, Event, Task, _by_index, _EndOfSteps, _HookedCall, _LoopCutShort, _StopForward,
                    _StopTrace, _UNBATCHED)
from .values import narrow, rejoin, splice

if TYPE_CHECKING:
    from .cache import Cache
    from .contract import HookPlan, ModuleHandle


def _outside_invoke(envoy: "ModuleHandle", kind: str) -> str:
    """The message for a module value read by a task that is no invoke (a
    run built by a tracer says more: see ``TraceRun.module_access_outside_invoke``)."""
    return (
        f"`{envoy._display_path()}.{kind}` is read outside any invoke, where the model's values "
        "are not available: read it inside a `with tracer.invoke(...):` block."
    )


def _deadlock(task: Task) -> BaseException:
    """The error for a task still blocked when the forward ended, where its
    blocker gave none (a barrier and the name flow give their own, naming what
    the task waited for)."""
    return InvokeError(f"{task.label} was still waiting when the forward pass ended: {task.waited_for or 'nothing came'}.")


class Interleaver:
    """Schedules the tasks of one trace around one forward (or generate) call."""

    # Defaults on the class: a trace creates one interleaver per run, so its
    # construction is part of every trace's fixed cost.
    current: Event | None = None
    forward_running = False
    forward_done = False
    stopped = False
    closing = False
    batch_size = 0
    step = -1  # index of the current call of the root module (generation step)
    root_output_by_return = False  # see `run_forward`
    count_calls = False  # count each hooked event's calls (see `iterate_calls`)
    hooked_calls_running = 0  # modules a body runs with `hook=True`, now running (see `call_hooked`)
    output_hook: Callable | None = None  # made on first use (see `_output_hook`)
    on_module_hooked: Callable[[torch.nn.Module], None] | None = None
    caches: Any = ()  # the `tracer.cache(...)` objects recording in this trace (see `add_cache`)
    result: Any = None  # what the backend returned (see `finish_with_result`)
    turns = 0  # counts the times a body runs (goes on): what bodies change can only change then

    def __init__(
        self,
        root: torch.nn.Module,
        hook_plan: Callable[[torch.nn.Module], "HookPlan"],
        outside_invoke: Callable[["ModuleHandle", str], str] = _outside_invoke,
    ) -> None:
        """Its collaborators: ``root``, the module the forward pass calls;
        ``hook_plan(module)``, which modules to hook with ``module`` (a
        model's ``_hook_plan``, or :meth:`.hooks.ModuleTree.hook_plan`);
        ``outside_invoke(envoy, kind)``, the message for a value read by a
        body that is no invoke."""
        self.root = root
        self.hook_plan = hook_plan
        self.outside_invoke = outside_invoke
        self.tasks: list[Task] = []
        self.main = greenlet.getcurrent()
        # Tasks waiting for each event key, in invoke order, and tasks blocked
        # on a name: hooks look here instead of scanning every task.
        self.waiting: dict[tuple, list[Task]] = {}
        self.blocked: list[Task] = []
        self.hooks: dict[tuple, bool] = {}
        self.hook_set = HookSet()
        self.fired: dict[tuple, int] = {}  # events that have happened in this forward: calls begun
        # Callbacks run after the tasks at an event (tracer.cache records there).
        self.after: dict[tuple, list[Callable[[Any], None]]] = {}

    # -- running tasks ------------------------------------------------------
    def add(self, task: Task) -> None:
        task.index = len(self.tasks)  # unique within the trace; also the serving order
        self.tasks.append(task)

    def start(self, task: Task) -> None:
        """Run a new task until it first waits, blocks or ends."""
        task.greenlet = take_worker(task, self.main)
        self._switch(task, MISSING)

    def _switch(self, task: Task, value: Any, throw: BaseException | None = None) -> None:
        # The body runs in its own grad mode, but never with grad on where the forward
        # has it off (generate runs under no_grad): an in-place edit of a value the
        # forward made there would otherwise be refused by autograd, as nnsight's bodies,
        # which run in the forward's mode, are not.  A mode the body sets itself is kept.
        main_grad = torch.is_grad_enabled()
        mode = task.grad_enabled and main_grad
        if mode != main_grad:
            torch.set_grad_enabled(mode)
        task.state = RUNNING
        self.turns += 1
        worker = task.greenlet
        try:
            if throw is not None:
                result = worker.throw(throw)
            elif value is MISSING:
                result = worker.switch()
            else:
                result = worker.switch(value)
            while type(result) is _HookedCall:
                result = self._run_hooked_call(worker, result)
        except _StopTrace:
            self._ended(task)
            self.stopped = True
            if self.forward_running:
                raise _StopForward() from None
            return
        except _LoopCutShort:
            self._ended(task)  # its `tracer.iter` loop asked past the calls made: it ends there
            return
        except BaseException:
            self._ended(task)
            raise
        finally:
            now = torch.is_grad_enabled()
            if now != mode:
                task.grad_enabled = now  # the body changed its mode
            if now != main_grad:
                torch.set_grad_enabled(main_grad)
        if result is FINISHED:
            self._ended(task)

    def _run_hooked_call(self, worker: Any, call: _HookedCall) -> Any:
        """Run a module a body called with ``hook=True``, here in the main
        greenlet, so that its hooks serve the tasks waiting for its values;
        hand the result (or the error) back to the body."""
        self.hooked_calls_running += 1
        try:
            value = call.module(*call.args, **call.kwargs)
        except BaseException as error:  # noqa: BLE001 - it belongs to the body that made the call
            self.hooked_calls_running -= 1
            self.turns += 1  # the body goes on
            return worker.throw(error)
        self.hooked_calls_running -= 1
        self.turns += 1  # the body goes on
        return worker.switch(value)

    def _ended(self, task: Task) -> None:
        task.state = DONE
        worker, task.greenlet = task.greenlet, None
        if worker is not None:
            give_back_worker(worker)

    def _next(self, event: Event | None) -> Task | None:
        """The first task (in invoke order) that can go on now: one waiting for
        ``event`` and not yet served it, or one whose name has been assigned."""
        best = None
        if event is not None:
            for task in self.waiting.get(event.key, ()):
                if task.index not in event.served:
                    best = task
                    break
        for task in self.blocked:
            if (best is None or task.index < best.index) and task.blocked_until():
                best = task
                break
        return best

    def drain(self, event: Event | None) -> None:
        """Let every task that can go on run, until all wait, block or end."""
        while not self.stopped:
            task = self._next(event)
            if task is None:
                return
            if task.state == BLOCKED:
                self.blocked.remove(task)
                task.blocked_until = None
                self._switch(task, None)
                continue
            self._resume(task, event)

    def _resume(self, task: Task, event: Event) -> None:
        """Hand ``event``'s value to ``task``, which waited for it."""
        self._unwait(task)
        event.served.add(task.index)
        if task.batch is not None and task.batch.advance(self, event, task):
            return  # recorded; it waits for its next value (see .prefetch)
        self._switch(task, self.view(event, task))

    def wait(self, task: Task, key: tuple) -> None:
        """Queue ``task`` (in invoke order) as waiting for the value of ``key``."""
        task.pending = key
        task.state = WAITING
        queue = self.waiting.get(key)
        if queue is None:
            self.waiting[key] = [task]
        else:
            self._queue(queue, task)

    @staticmethod
    def _queue(queue: list[Task], task: Task) -> None:
        """Add ``task`` to the tasks waiting for one key, kept in invoke order."""
        queue.append(task)
        if len(queue) > 1 and queue[-2].index > task.index:
            queue.sort(key=_by_index)

    def _unwait(self, task: Task) -> None:
        key = task.pending
        task.pending = None
        queue = self.waiting.get(key)
        if queue is not None:
            queue.remove(task)
            if not queue:
                del self.waiting[key]

    # -- called from inside a task -------------------------------------------
    def request(self, task: Task, envoy: "ModuleHandle", kind: str, skip_current: bool = False) -> Any:
        """The value of ``kind`` ("input"/"output") of ``envoy``'s module for ``task``."""
        # The hot path of every `.output`/`.input`: kept to few steps.
        if self.closing or not task.is_invoke:
            if self.closing:
                raise greenlet.GreenletExit()
            raise InvokeError(self.outside_invoke(envoy, kind))
        module = envoy._module
        key = (id(module), kind)
        event = self.current
        if event is not None and event.key == key:
            if not (skip_current and task.index in event.served):
                event.served.add(task.index)
                return self.view(event, task)
        if self.forward_done or self.caches:
            if self.caches:
                cached = self._cached(task, envoy, kind)
                if cached is not MISSING:
                    return cached
            if self.forward_done:
                message = too_late_message(envoy, kind, sys._getframe(1), finished=True)
                if task.result_waited is not None:
                    message = after_result_message(envoy, kind, task.result_waited)
                raise OutOfOrderError(message)
        if key not in self.hooks:
            self.hook(module, kind, envoy)
        # For messages, should the value never come; the frame is the user's
        # (found from here on error).
        task.asked = (envoy, kind, sys._getframe(1), key in self.fired, not (self.forward_running or self.forward_done))
        self.wait(task, key)
        return self.main.switch()

    def iterate_calls(self) -> None:
        """In a single forward, ``tracer.iter[i]`` means each module's call
        number ``i`` (a module called several times per forward, as an RNN
        cell): count every hooked event's calls, and serve requests made in
        such a loop by call number.  Traces without step loops never pay."""
        if not self.count_calls:
            self.count_calls = True
            self.request = self._request_call  # type: ignore[method-assign]

    def _request_call(self, task: Task, envoy: "ModuleHandle", kind: str, skip_current: bool = False) -> Any:
        """``request`` in a trace that counts calls: inside a step loop, the
        value of the module's call number ``task.iteration``."""
        wanted = task.iteration
        if wanted is None or skip_current:
            return Interleaver.request(self, task, envoy, kind, skip_current)
        key = (id(envoy._module), kind)
        made = self.fired.get(key, 0)  # calls begun so far (the current one included)
        event = self.current
        if made - 1 == wanted and event is not None and event.key == key:
            return Interleaver.request(self, task, envoy, kind)
        if made > wanted:
            raise OutOfOrderError(
                f"`{envoy._display_path()}.{kind}` of call {wanted} was asked for in a `tracer.iter` loop "
                f"({where_user_is()}), but the module had already made {made} call(s) by then. Within one "
                "invoke, read values in the order the model makes them."
            )
        value = Interleaver.request(self, task, envoy, kind, skip_current=True)
        while self.fired.get(key, 0) - 1 < wanted:
            value = Interleaver.request(self, task, envoy, kind, skip_current=True)
        return value

    def _cached(self, task: Task, envoy: "ModuleHandle", kind: str) -> Any:
        """The value a ``tracer.cache`` recorded for ``envoy`` (``task``'s rows), or MISSING."""
        for cache in self.caches:
            if cache._rows is not None:
                if cache._rows != task.rows:
                    continue  # another invoke's rows
                found = cache._lookup(envoy._path, kind)
                if found is not MISSING:
                    return found
                continue
            found = cache._lookup(envoy._path, kind)
            if found is not MISSING:
                if kind == "output":
                    return narrow(found, task.rows, self.batch_size)
                args, kwargs = found
                return (
                    tuple(narrow(a, task.rows, self.batch_size) for a in args),
                    {k: narrow(v, task.rows, self.batch_size) for k, v in kwargs.items()},
                )
        return MISSING

    def call_hooked(self, task: Task, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run ``module(*args, **kwargs)`` for ``task`` with the trace watching:
        its hooks (and its submodules') serve the bodies waiting for their
        values, as the forward pass's own calls do.  Those values are the
        call's own, not rows of the batch, so every body sees them whole."""
        if self.closing:
            raise greenlet.GreenletExit()
        if task.hooked_calls is None:
            task.hooked_calls = set()
        task.hooked_calls.update(id(each) for each in module.modules())
        return self.main.switch(_HookedCall(module, args, kwargs))

    def wait_for_step(self, task: Task, step: int) -> None:
        """Sleep until the root module's call number ``step`` begins (generation)."""
        if self.step >= step:
            return
        key = ("step", step)
        self.hook(self.root, "input")
        task.asked = (None, "step", sys._getframe(1), False, False)
        self.wait(task, key)
        self.main.switch()

    def block(self, task: Task, until: Callable[[], bool], never: Callable[[], BaseException] | None = None) -> None:
        """Sleep until ``until()`` is true (another invoke assigned a name, the
        invokes met at a barrier); should it still be false when the forward
        has ended, the task gets ``never()`` thrown in."""
        task.blocked_until = until
        task.never_unblocked = never
        task.state = BLOCKED
        self.blocked.append(task)
        self.blocked.sort(key=_by_index)
        try:
            self.main.switch()
        finally:
            task.never_unblocked = None  # it refers to the task: no cycle left behind

    def assign(self, task: Task, envoy: "ModuleHandle", kind: str, value: Any, accessor: str) -> None:
        """Replace ``kind`` of the module's current call, for the task's rows."""
        try:
            self._assign(task, envoy, kind, value, accessor)
        except ShapeMismatchError as error:
            raise type(error)(f"{error} ({where_user_is()})") from None

    def _assign(self, task: Task, envoy: "ModuleHandle", kind: str, value: Any, accessor: str) -> None:
        self.request(task, envoy, kind)  # waits until the forward is there
        event = self.current
        rows = task.rows
        what = f"{envoy._display_path()}.{accessor}"
        if event.handed:
            # Views handed out so far stay on the gradient path (values.rejoin).
            event.value = rejoin(event.value, event.handed)
            event.handed = {}
        if kind == "output":
            event.value = splice(event.value, rows, value, event.batch_size, what)
            return
        args, kwargs = event.value
        if accessor == "inputs":
            new_args, new_kwargs = value
            if len(new_args) != len(args) or set(new_kwargs) != set(kwargs):
                # A rebuilt call (`m.inputs = ((x,), kwargs)`): the module is
                # called with exactly these arguments, as a forward pre-hook
                # returning them would do; only possible for the whole batch.
                if rows is None or (rows.start in (0, None) and rows.stop == event.batch_size):
                    event.value = (tuple(new_args), dict(new_kwargs))
                    return
                raise ShapeMismatchError(
                    f"cannot change which arguments {what} passes from an invoke that sees only rows "
                    f"{rows.start}:{rows.stop} of the batch (it had {len(args)} positional and "
                    f"{sorted(kwargs)} keyword arguments, the new value {len(new_args)} and "
                    f"{sorted(new_kwargs)}): assign the same arguments with new values, or do it in "
                    "a trace (or an invoke without input) that sees the whole batch."
                )
            event.value = (
                tuple(splice(tuple(args), rows, tuple(new_args), event.batch_size, what)),
                splice(dict(kwargs), rows, dict(new_kwargs), event.batch_size, what),
            )
        elif args:
            first = splice(args[0], rows, value, event.batch_size, what)
            event.value = ((first, *args[1:]), kwargs)
        elif kwargs:
            name = next(iter(kwargs))
            kwargs = dict(kwargs)
            kwargs[name] = splice(kwargs[name], rows, value, event.batch_size, what)
            event.value = (args, kwargs)

    # -- hooks ---------------------------------------------------------------
    def add_cache(self, cache: "Cache") -> None:
        """Let ``cache`` record its modules' values as the forward reaches them
        (after the tasks at each), and serve requests for them later."""
        if not self.caches:
            self.caches = []
        self.caches.append(cache)
        for envoy in cache._envoys:
            module = envoy._module
            for kind, wanted in (("output", cache.include_output), ("input", cache.include_inputs)):
                if wanted:
                    self.hook(module, kind)
                    recorder = cache._recorder(envoy._path, kind, self._event_batch_size)
                    self.after.setdefault((id(module), kind), []).append(recorder)

    def _event_batch_size(self) -> int:
        """The batch size of the values now reached (a body's own `hook=True` call: unbatched)."""
        return self.batch_size if not self.hooked_calls_running else _UNBATCHED

    def hook(self, module: torch.nn.Module, kind: str, envoy: "ModuleHandle | None" = None) -> None:
        """Hook ``kind`` of ``module`` (once per trace).

        A hook added to a module whose call has already begun does not fire
        for that call.  A body can only ask for a value while the forward is
        paused at a hook, and every module that can be running at such a pause
        is an ancestor of a hooked module; so hooking a module also hooks the
        output of the module itself and of all its ancestors, always before
        their calls begin.  ``envoy``, the module's, remembers its plan across
        traces (the same module tree every time)."""
        key = (id(module), kind)
        if key not in self.hooks:
            self._install_plans(((module, kind, envoy),))

    def hook_ahead(self, modules: list[torch.nn.Module], kinds: Any, envoys: list["ModuleHandle"]) -> None:
        """:meth:`hook` for each of ``modules`` (``kinds``, their ``envoys``)
        at once, ahead of the reads that will ask for them (a batch of plain
        saves, see :mod:`.prefetch`)."""
        self._install_plans(zip(modules, kinds, envoys))

    def _install_plans(self, wanted: Any) -> None:
        """Hook each ``(module, kind, envoy or None)`` of ``wanted`` with its
        hook plan (see :meth:`hook`), where not hooked yet."""
        hooks = self.hooks
        plan_of = self.hook_plan
        # The root runs once and its output is what the backend returns: served
        # from there (see `run_forward`), saving a hook on the root and
        # PyTorch's slow call path for it.
        by_return = self.root if self.root_output_by_return else None
        modules = []
        for module, kind, envoy in wanted:
            if kind == "input":
                key = (id(module), kind)
                if key not in hooks:
                    self._install_input(module, key)
            plan, chain = envoy._remembered_hook_plan(plan_of) if envoy is not None else plan_of(module)
            for each, each_key in plan:
                if each_key not in hooks:
                    hooks[each_key] = True
                    if each is not by_return:
                        modules.append(each)
                elif chain:
                    break  # hooked with all its ancestors, which come after it here
        if modules:
            self.hook_set.add_outputs(modules, self._output_hook())
            if self.on_module_hooked is not None:
                for module in modules:
                    self.on_module_hooked(module)

    def _install_input(self, module: torch.nn.Module, key: tuple) -> None:
        """Add an input hook to ``module`` (``key`` its input event)."""
        self.hooks[key] = True
        self.hook_set.add_input(module, self._make_input_hook(module, key))
        if self.on_module_hooked is not None:
            self.on_module_hooked(module)

    def reported_elsewhere(self, key: tuple) -> None:
        """The values of ``key`` reach this trace through :meth:`reached` called
        by someone else (an operation of ``.source``, see :mod:`.operations`),
        not through a module hook: requests for it install none."""
        self.hooks[key] = True

    def in_our_forward(self) -> bool:
        """Is this call part of this trace's own forward pass?  Hooks also fire
        when a body calls a module itself, or when another thread runs the same
        model: only our own forward pass counts, and the calls a body makes
        with ``hook=True`` (run in the main greenlet)."""
        return (self.forward_running or self.hooked_calls_running > 0) and greenlet.getcurrent() is self.main

    def _output_hook(self) -> Callable:
        """The output hook of this trace (one function for every module)."""
        hook = self.output_hook
        if hook is None:
            hook = self.output_hook = self._make_output_hook()
        return hook

    def _make_output_hook(self) -> Callable:
        def output_hook(mod: torch.nn.Module, args: Any, output: Any) -> Any:
            if not self.in_our_forward():
                return None
            result = self.reached((id(mod), "output"), "output", output)
            return result if result is not output else None

        return output_hook

    def _make_input_hook(self, module: torch.nn.Module, key: tuple) -> Callable:
        is_root = module is self.root

        def input_hook(mod: torch.nn.Module, args: Any, kwargs: Any) -> Any:
            if not self.in_our_forward():
                return None
            if is_root:
                self.step += 1
                self._serve_step()
            value = (args, kwargs)
            result = self.reached(key, "input", value)
            return result if result is not value else None

        return input_hook

    def reached(self, key: tuple, kind: str, value: Any) -> Any:
        """The forward pass reached ``key`` with ``value``: serve the tasks that
        want it, let caches record it; return it as the tasks left it."""
        fired = self.fired
        fired[key] = fired.get(key, 0) + 1  # how many calls have begun (see `iterate_calls`)
        waiting = self.waiting
        queue = waiting.get(key)
        if queue is None:
            if not self.blocked and key not in self.after:
                # Nobody waits for it (or might, once unblocked), and no cache records
                # it: the hook only keeps an ancestor observable (the common case).
                return value
        elif len(queue) == 1 and queue[0].batch is not None:
            # One task wants it, for a batch of plain saves (see .prefetch): the
            # batch records it and asks for its next value without an event.
            task = queue[0]
            wanted = task.batch.record(self, key, value, task)
            if wanted is not None:
                del waiting[key]  # it was the only one waiting here
                self.wait(task, wanted)
                return value
        return self._deliver(key, kind, value)

    def _deliver(self, key: tuple, kind: str, value: Any) -> Any:
        """Serve ``value`` to the tasks that want ``key`` (see `reached`)."""
        batch_size = self.batch_size if not self.hooked_calls_running else _UNBATCHED
        event = Event(key, kind, value, batch_size)
        if torch.is_grad_enabled():
            event.handed = {}
        result = self._serve(event)
        if event.handed:
            result = event.value = rejoin(result, event.handed)
        for record in self.after.get(key, ()):
            record(result)
        return result

    def _serve(self, event: Event) -> Any:
        previous = self.current
        self.current = event
        try:
            key = event.key
            waiting = self.waiting
            queue = waiting.get(key)
            if queue is not None and len(queue) == 1 and not self.blocked:
                # The common case: exactly one task waits for this value.
                self._resume(queue[0], event)
                if key in waiting or self.blocked:
                    self.drain(event)
            else:
                self.drain(event)
        finally:
            self.current = previous
        return event.value

    def _serve_step(self) -> None:
        key = ("step", self.step)
        event = Event(key, "step", None, self.batch_size)
        for waiting_key in [k for k in self.waiting if k[0] == "step" and k[1] <= self.step]:
            for task in list(self.waiting[waiting_key]):
                self._unwait(task)
                self.wait(task, key)
        if key in self.waiting or self.blocked:
            self._serve(event)

    def view(self, event: Event, task: Task) -> Any:
        """``task``'s view of ``event``'s value (narrowed to its rows)."""
        rows = task.rows
        if rows is None and (event.kind == "output" or event.kind == "input"):
            return event.value  # the whole batch: nothing to narrow
        if event.kind == "step":
            return None
        if event.kind == "result":
            return event.value
        value = event.value
        views = event.views
        if views is None:
            views = event.views = {}
        else:
            earlier = views.get(task.index)
            if earlier is not None and earlier[0] is value:
                return earlier[1]
        handed = event.handed
        if event.kind == "output":
            view = narrow(value, rows, event.batch_size, handed)
        else:
            view = (
                tuple(narrow(a, rows, event.batch_size, handed) for a in value[0]),
                {k: narrow(v, rows, event.batch_size, handed) for k, v in value[1].items()},
            )
        views[task.index] = (value, view)
        return view

    def request_result(self, task: Task, what: str = "tracer.result") -> Any:
        """The backend's return value (``tracer.result``), once it has returned;
        ``what`` names the accessor for a later order error."""
        if self.forward_done:
            return self.result
        task.result_waited = (what, where_user_is())
        task.asked = (None, "result", sys._getframe(1), False, False)
        self.wait(task, ("result",))
        return self.main.switch()

    # -- the forward pass -------------------------------------------------------
    def run_forward(self, call: Callable[..., Any], *args: Any) -> Any:
        """Run the forward pass, ``call(*args)``, with the tasks served at its
        hooks; then :meth:`finish_with_result`.  Returns its result as the
        tasks left it (None if a task stopped the trace)."""
        result = None
        self.forward_running = True
        try:
            result = call(*args)
            if self.root_output_by_return:
                # The root ran once and returned `result`: serve it as the
                # root's output event; the tasks may edit it.
                result = self.reached((id(self.root), "output"), "output", result)
        except _StopForward:
            pass
        finally:
            self.forward_running = False
        self.finish_with_result(result)
        return result

    # -- the end of the forward pass ------------------------------------------
    def finish_with_result(self, result: Any) -> None:
        """The backend returned ``result``: hand it to tasks waiting for it, then
        :meth:`finish`."""
        self.forward_done = True
        self.result = result
        if not self.waiting and not self.blocked:
            return  # every task has ended (nothing for `finish` to do)
        if ("result",) in self.waiting:
            self._serve(Event(("result",), "result", result, self.batch_size))
        self.finish()

    def finish(self) -> None:
        """After the forward: tell waiting tasks their value never came; let
        blocked tasks go on; run everything to its end."""
        self.forward_done = True
        while not self.stopped:
            task = self._next(None)
            if task is not None:
                self.blocked.remove(task)
                task.blocked_until = None
                self._switch(task, None)
                continue
            pending = [queue[0] for queue in self.waiting.values()]
            if not pending:
                break
            waiting = min(pending, key=_by_index)
            key = waiting.pending
            self._unwait(waiting)
            if waiting.batch is not None:
                waiting.batch.settle(self, waiting)  # what it asked for, for the messages below
            if key[0] == "step":
                self._switch(waiting, None, throw=_EndOfSteps())
            elif waiting.iteration is not None and self.count_calls:
                self._switch(waiting, None, throw=self._cut_short(waiting))
            else:
                self._switch(waiting, None, throw=self._not_provided(waiting, key))
        blocked, self.blocked = self.blocked, []
        for task in blocked:
            never = task.never_unblocked
            self._switch(task, None, throw=never() if never is not None else _deadlock(task))

    def _cut_short(self, task: Task) -> _LoopCutShort:
        """A task in a single forward's step loop asked for a call that was not
        made: like nnsight, the loop ends there, keeping what was saved, and the
        code after the loop does not run; a warning says so when the loop had
        an end (`iter[:5]`) that the forward did not reach."""
        if task.iteration_open:
            return _LoopCutShort()  # an open loop (`iter[:]`, `all()`) ends at the last call, by design
        envoy, kind, frame, _, _ = task.asked
        path = envoy._display_path() if envoy is not None else "the model"
        user = user_frame(frame)
        where = describe_frame(user)
        warnings.warn_explicit(
            f"`{path}.{kind}` of call {task.iteration} was asked for in a `tracer.iter` loop"
            f"{f' (at {where})' if where else ''}, but the forward made fewer calls: the loop ended there "
            f"({task.label}). Values saved in the loop are kept; the code after the loop did not run. Bound the "
            "loop to the number of calls (`tracer.iter[:n]`), or put what follows it in another invoke.",
            UserWarning,
            user.f_code.co_filename if user is not None else "<trace>",
            user.f_lineno if user is not None else 0,
        )
        return _LoopCutShort()

    def _not_provided(self, task: Task, key: tuple) -> MissedProviderError:
        """The error for ``task``, still waiting for ``key`` when the forward ended."""
        envoy, kind, frame, ran_before, asked_before_forward = task.asked
        if asked_before_forward and key not in self.fired and kind in ("input", "output"):
            # Hooked before the forward began and never reached: the model did
            # not call the module at all (not a question of order).
            return ModuleNotCalledError(never_called_message(envoy, kind, frame))
        message = too_late_message(envoy, kind, frame, ran_before=ran_before, waited_for=task.waited_for)
        if task.hooked_calls and key[0] in task.hooked_calls:
            path = envoy._display_path() if envoy is not None else "the module"
            message += (
                f" This invoke ran `{path}` itself (with `hook=True`) before that line: the values of such a "
                "call reach only the bodies already waiting for them (another invoke, or the trace when an edit "
                "makes the call). Use the call's return value here, or read the value in a body that waits for it."
            )
        return OutOfOrderError(message)

    def close(self) -> None:
        """Remove every hook and end every task that has not ended."""
        self.closing = True
        if self.hooks:
            self.hook_set.remove_all()
            self.hooks.clear()
        self.output_hook = None  # it refers back to this interleaver: no cycle left behind
        if self.after or self.waiting or self.blocked:
            self.after.clear()
            self.waiting.clear()
            self.blocked.clear()
        for task in self.tasks:
            worker = task.greenlet
            if worker is not None:
                if not worker.dead:
                    try:
                        result = worker.throw(greenlet.GreenletExit())
                    except BaseException:  # noqa: BLE001 - a dying body may raise anything
                        result = FINISHED
                    if result is FINISHED and worker.task is None:
                        give_back_worker(worker)
                task.greenlet = None
                task.state = DONE
                task.blocked_until = None
                task.never_unblocked = None
            if task.asked is not None:
                task.asked = None  # it holds a frame of the user's code: let it go
        self.current = None

    def detach(self) -> None:
        """Drop the collaborators that belong to the run (they refer back to
        it), so that the run and what it holds do not wait for the garbage
        collector.  After :meth:`close`."""
        self.outside_invoke = _outside_invoke
        self.on_module_hooked = None
