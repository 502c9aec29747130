"""One run of a captured trace: the single mechanism behind every kind of trace.

:class:`TraceRun` takes a captured body, the variables it starts with, the
inputs and a *backend* (what to call on the batched inputs: the model's
forward, a fake-tensor scan, HuggingFace ``generate``) and:

1. runs the trace body until it first waits for a value (registering the
   ``tracer.invoke`` blocks it opens on the way);
2. batches the inputs of all invokes into one call, gives each invoke its
   rows, and starts the invoke bodies;
3. calls the backend, with the :class:`~.interleaver.Interleaver` feeding each
   body the values it asks for;
4. lets every body finish, then hands the assigned names back (see
   :mod:`.saving`) and restores everything it touched.

Local traces, scans, edits, sessions and the remote server all use this class.
"""

from __future__ import annotations

import weakref
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable

import greenlet
import torch

from .._frames import describe_location, only_user_frames, show_library_frames
from ..errors import InvokeError, OutOfOrderError, SeethroughError, WeightsModifiedError
from .capture import CapturedBlock
from .interleaver import Interleaver
from .tasks import WAITING, Task, _StopTrace
from .namespace import BodyNamespace, CrossFlow, TracedNamespace
from .backward import BACKWARD_PATCH
from .patches import SAVE_PATCH, ForwardSkip
from .save_reach import NO_CALLS, explain_missing_tensor_save, needs_tensor_save
from .runtime import current_task, running_traces
from .stacks import run_on_hub
from .saving import LazyText, NotSaved, SaveRegistry, hand_back
from .values import savable, splice
from .takeover import TAKEN_OVER

if TYPE_CHECKING:
    from .cache import Cache
    from .contract import ModuleHandle, TracedModel

Backend = Callable[["TraceRun", tuple, dict], Any]


class EditSpec:
    """A persistent intervention recorded by ``model.edit()``.

    The wrapper that owns the edit holds it (``model._edits``), so the edit
    must not hold that wrapper: the names of the edit's own frame that are
    bound to it (``with model.edit(inplace=True)``'s ``model``, the ``as``
    name) are kept apart in ``self_names`` and bound, at each run, to the
    wrapper (held weakly; a copy made by a later ``edit()`` stands in once the
    owner is gone).  Without that cycle, dropping the wrapper frees it at once.
    """

    __slots__ = ("captured", "seed", "globals", "self_names", "_owner")

    def __init__(
        self, captured: CapturedBlock, seed: dict, globals_: dict, owner: Any = None, self_names: tuple[str, ...] = ()
    ) -> None:
        self.captured = captured
        self.seed = seed
        self.globals = globals_
        self.self_names = self_names
        self._owner = weakref.ref(owner) if owner is not None else None

    def namespace(self, model: Any) -> "BodyNamespace":
        """The namespace an application of the edit to ``model``'s run starts with."""
        ns = BodyNamespace(self.seed, self.globals)
        if self.self_names:
            owner = self._owner() if self._owner is not None else None
            for name in self.self_names:
                dict.__setitem__(ns, name, owner if owner is not None else model)
        return ns


_NOTHING: Any = MappingProxyType({})  # an empty, read-only default for rarely used maps
# Attribute names in a body's text that ask for a run's preparation (`_note`).
_SPECIAL = frozenset({"backward", "skip", "iter", "all", "next"})


class TraceRun:
    """Runs one captured trace body against one call of the model."""

    # Defaults on the class (a run is built for every trace); the maps are
    # replaced by real dicts where something is first stored.
    output: Any = None
    setup_done = False
    flow: CrossFlow | None = None
    shared_kwargs: Any = _NOTHING  # `model.trace(**kwargs)` with invokes: for every invoke
    skips: Any = _NOTHING  # id(module) -> ForwardSkip
    _skip_values: Any = _NOTHING  # id(module) -> [(rows, value, what)]
    _weights: Any = _NOTHING  # id(tensor) -> (name, tensor, version) of weights read in the body
    meetings: Any = _NOTHING  # Barrier -> Meeting: the barriers' rounds in this run
    _uses_backward = False  # `with loss.backward():` needs the Tensor.backward patch
    _backward_patched = False
    _needs_save = False  # a body may reach code calling `Tensor.save` (see `_note_calls`)
    _save_patched = False
    _executing = False
    sources: Any = None  # RunSources: forwards instrumented for `.source` (tracing/operations.py)
    streamed: Any = None  # what `generate` streamed (models/streaming.py), in a generation
    edit_tasks: Any = ()  # Tasks of the model's persistent edits (model.edit())
    explicit_invokes: Any = ()  # Tasks of the `tracer.invoke` blocks, in order

    def __init__(
        self,
        model: "TracedModel",
        captured: CapturedBlock,
        tracer: Any,
        seed: dict,
        globals_: dict,
        inputs: tuple[tuple, dict] | None,
        backend: Backend,
        keep_graph: bool = True,
    ) -> None:
        self.model = model
        self.root_module: torch.nn.Module = model._module
        self.captured = captured
        self.tracer = tracer
        self.seed = seed
        self.globals = globals_
        self.backend = backend
        self.inputs = inputs
        self.has_input = inputs is not None
        self.saves = SaveRegistry(keep_graph)
        interleaver = self.interleaver = Interleaver(
            self.root_module, model._hook_plan, self.module_access_outside_invoke
        )
        # Backends that call the root module exactly once say so; its output
        # is then observed from their return value instead of a hook.
        if getattr(backend, "single_call", False):
            interleaver.root_output_by_return = True
        self.invoke_inputs: list[tuple[Task, tuple[tuple, dict]]] = []

        uses_invoke = "invoke" in captured.attributes
        body_ns = TracedNamespace(seed, globals_) if uses_invoke else BodyNamespace(seed, globals_)
        if captured.as_name:
            dict.__setitem__(body_ns, captured.as_name, tracer)
        self.body = Task(self, 0, "the trace body", captured.code, body_ns, None, captured.stored, self.has_input)
        if uses_invoke:
            self.flow = CrossFlow(interleaver, self.body, globals_)
        if not captured.attributes.isdisjoint(_SPECIAL):
            self._note(captured)
        self._note_calls(captured, (body_ns, globals_))  # body_ns: the seed and the `as` name
        if model._edits:
            self.edit_tasks = []
            for spec in model._edits:
                edit_ns = spec.namespace(model)
                self.edit_tasks.append(
                    Task(self, 0, "an edit (model.edit)", spec.captured.code, edit_ns, None, spec.captured.stored, True)
                )
                self._note(spec.captured)
                self._note_calls(spec.captured, (edit_ns, spec.globals))

    def _note(self, captured: CapturedBlock) -> None:
        """Prepare what this body's text says it may need."""
        if "backward" in captured.attributes:
            self._uses_backward = True
            if self._executing:  # an invoke opened while the trace runs
                self._patch_backward()
        if captured.uses_skip:
            self.interleaver.on_module_hooked = self._make_skippable
        if captured.uses_steps:
            if self.interleaver.root_output_by_return:
                self.interleaver.iterate_calls()  # one forward: steps are each module's calls
            self.interleaver.hook(self.root_module, "input")

    def _note_calls(self, captured: CapturedBlock, namespaces: tuple) -> None:
        """If this body might reach code that calls ``.save()`` on a tensor (see
        :mod:`.save_reach`), the run installs ``Tensor.save``."""
        reach = captured.reach
        if reach is NO_CALLS or self._needs_save or not needs_tensor_save(reach, captured.loaded, namespaces):
            return
        self._needs_save = True
        if self._executing:  # an invoke opened while the trace runs
            self._patch_save()

    def _patch_save(self) -> None:
        if not self._save_patched:
            self._save_patched = True
            SAVE_PATCH.enter()

    def _patch_backward(self) -> None:
        if not self._backward_patched:
            self._backward_patched = True
            BACKWARD_PATCH.enter()

    # -- running ------------------------------------------------------------------
    def execute(self) -> None:
        """Run everything.  User exceptions propagate with their own type."""
        running = running_traces()
        running.append(self)
        self._executing = True
        if self._needs_save:
            self._patch_save()
        if self._uses_backward:
            self._patch_backward()
        try:
            run_on_hub(self._execute_on_hub)
        finally:
            try:
                if not self.interleaver.closing:  # the forward greenlet never ran
                    self.interleaver.close()
                if self.skips:
                    for skip in self.skips.values():
                        skip.restore()
                    self.skips = _NOTHING
                if self.sources is not None:
                    self.sources.restore()  # after the skips: they wrap the instrumented forwards
                    self.sources = None
            finally:
                self._executing = False
                if self._backward_patched:
                    self._backward_patched = False
                    BACKWARD_PATCH.exit()
                if self._save_patched:
                    self._save_patched = False
                    SAVE_PATCH.exit()
                running.pop()

    def _execute_on_hub(self) -> None:
        """Everything the bodies and the forward pass do, in a forward greenlet
        (see :mod:`.stacks`); the tasks' greenlets are closed here too."""
        self.interleaver.main = greenlet.getcurrent()  # the greenlet the forward runs in
        try:
            self._execute()
            if self._skip_values:
                self._check_skips_applied()
        except _StopTrace:
            pass
        finally:
            self.interleaver.close()

    def _check_skips_applied(self) -> None:
        """A ``.skip()`` the forward pass never reached (the module had already
        run, or does not run for this input) skipped nothing: say so, as
        nnsight does (an ``OutOfOrderError``), rather than end quietly."""
        for entries in self._skip_values.values():
            if entries:
                what = entries[0][2]
                module = what[: -len(".skip(...)")] if what.endswith(".skip(...)") else what
                raise OutOfOrderError(
                    f"`{what}` in the trace at {self._where()} skipped nothing: `{module}` did not run after "
                    "that point of the forward pass (it had already run, or the model does not call it for "
                    "this input). Call `.skip()` before reading any value of that module or of later modules."
                )

    def _execute(self) -> None:
        interleaver = self.interleaver
        body = self.body
        for task in self.edit_tasks:
            interleaver.add(task)
            interleaver.start(task)
        interleaver.add(body)
        if self.has_input:
            self.invoke_inputs.append((body, self.inputs))
        interleaver.start(body)
        self.setup_done = True
        if interleaver.stopped:
            return
        batched = self._batch()
        if self.explicit_invokes:
            for task in self.explicit_invokes:
                interleaver.start(task)
                if interleaver.stopped:
                    return
            interleaver.drain(None)
        if batched is None:
            if any(key[0] != "result" for key in interleaver.waiting):
                raise InvokeError(
                    f"the trace at {self._where()} has no input, so the model never runs: pass the "
                    "input to `model.trace(input)`, or open `with tracer.invoke(input):` blocks."
                )
            interleaver.finish_with_result(None)
        else:
            self.output = interleaver.run_forward(self.backend, self, *batched)

    def _batch(self) -> tuple[tuple, dict] | None:
        entries = self.invoke_inputs
        if not entries:
            return None
        if len(entries) == 1 and entries[0][0] is self.body:
            # One input: no batching, no narrowing, no copies.
            args, kwargs = entries[0][1]
            try:
                prepared = self.model._prepare_input(args, kwargs)
            except SeethroughError as error:
                raise _located(error, f"the input of the trace at {self._where()}") from None
            self.interleaver.batch_size = prepared.rows
            return prepared.args, prepared.kwargs
        prepared = []
        for task, inputs in entries:
            try:
                prepared.append(self.model._prepare_input(*inputs))
            except SeethroughError as error:
                code = task.code
                raise _located(error, f"the input of {task.label} at {describe_location(code.co_filename, code.co_firstlineno)}") from None
        try:
            args, kwargs = self.model._batch_inputs(prepared)
        except SeethroughError as error:
            raise _located(error, f"batching the invokes of the trace at {self._where()}") from None
        start = 0
        for (task, _), item in zip(entries, prepared):
            task.rows = slice(start, start + item.rows)
            start += item.rows
        self.interleaver.batch_size = start
        return args, kwargs

    # -- called from bodies ------------------------------------------------------
    def register_invoke(self, captured: CapturedBlock, args: tuple, kwargs: dict, has_input: bool, as_name: str | None, invoker: Any) -> None:
        task = current_task()
        if task is not self.body:
            raise InvokeError(
                f"`tracer.invoke(...)` at {describe_location(captured.filename, captured.with_lineno)} "
                "is inside another invoke (or an edit); open invokes directly in the trace body."
            )
        if self.has_input and not self.inputs[0] and not self.explicit_invokes and self.body.state != WAITING:
            # `model.trace(logits_to_keep=1)` + invokes: keyword arguments only,
            # shared by every invoke's forward, not an input of their own.
            self.shared_kwargs = self.inputs[1]
            self.has_input = False
            self.inputs = None
            self.body.is_invoke = False
            self.invoke_inputs = [entry for entry in self.invoke_inputs if entry[0] is not self.body]
        if self.has_input:
            raise InvokeError(
                f"`tracer.invoke(...)` at {describe_location(captured.filename, captured.with_lineno)}: "
                "this trace already has an input (`model.trace(input)`), which is its only invoke. "
                "Use `model.trace()` with one `with tracer.invoke(input):` block per input instead "
                "(keyword arguments alone, `model.trace(key=value)`, apply to every invoke)."
            )
        if self.setup_done:
            raise InvokeError(
                f"`tracer.invoke(...)` at {describe_location(captured.filename, captured.with_lineno)} "
                "comes after trace-body code that uses results of earlier invokes; all invokes must be "
                "opened before such code. Move that code after the last invoke, or into an invoke."
            )
        if self.flow is None:
            self.flow = CrossFlow(self.interleaver, self.body, self.globals)
        if not self.explicit_invokes:
            self.explicit_invokes = []
        ns, side, segments = self.flow.invoke_namespace(captured)
        if as_name:
            dict.__setitem__(ns, as_name, invoker)
        number = len(self.explicit_invokes) + 1
        invoke = Task(self, 0, f"invoke {number}", captured.code, ns, None, captured.stored, True)
        self.interleaver.add(invoke)  # gives it its index, which the flow keys on
        self.flow.add_invoke(invoke, captured, side, segments)
        self.explicit_invokes.append(invoke)
        if has_input:
            if self.shared_kwargs:
                kwargs = {**self.shared_kwargs, **kwargs}
            self.invoke_inputs.append((invoke, (args, kwargs)))
        if not captured.attributes.isdisjoint(_SPECIAL):
            self._note(captured)
        self._note_calls(captured, (ns, self.seed, self.globals))

    def module_access_outside_invoke(self, envoy: "ModuleHandle", kind: str) -> str:
        accessor = "output" if kind == "output" else "input"
        if self.explicit_invokes:
            return (
                f"`{envoy._display_path()}.{accessor}` is read in the trace body outside any invoke. "
                "With `tracer.invoke(...)` blocks, read module values inside an invoke; use "
                "`with tracer.invoke():` (no input) to see the whole batch."
            )
        return (
            f"`{envoy._display_path()}.{accessor}` is read in a trace without input, so the model "
            "never runs: pass the input to `model.trace(input)` or open `with tracer.invoke(input):`."
        )

    def present(self, value: Any) -> Any:
        """A value as handed to a body: with a ``.save()`` method where possible."""
        if isinstance(value, torch.Tensor):
            return value  # `.save()` comes from the Tensor patch
        if isinstance(value, dict):
            return self.saves.decorate(value)
        return savable(value)

    def add_cache(self, cache: "Cache") -> None:
        self.interleaver.add_cache(cache)

    def skip(self, task: Task, envoy: "ModuleHandle", value: Any) -> None:
        module = envoy._module
        current = self.interleaver.current
        if id(module) not in self.skips:
            if current is not None and current.key == (id(module), "input"):
                raise InvokeError(
                    f"`{envoy._display_path()}.skip(...)` was called while the module had already "
                    "started (from its own `.input`), too late to skip it this time. Call `.skip()` "
                    "before reading values of that module."
                )
            self._make_skippable(module)
        self._skip_values.setdefault(id(module), []).append((task.rows, value, f"{envoy._display_path()}.skip(...)"))
        self.skips[id(module)].replacement = self._skipped_call(module)

    def prepare_skip(self, module: torch.nn.Module) -> None:
        """Before a body waits for ``module``'s input: make the module skippable
        now, while its call has not started, so that the body may still skip
        that call after reading its input (``h = layer.input; layer.skip(h)``,
        as nnterp's ``skip_layer`` does).  Once a call has started, its forward
        is fixed: ``skip`` then says it is too late."""
        if not isinstance(module, torch.nn.Module):
            return  # an operation of `.source`: skipped through its own machinery
        current = self.interleaver.current
        if (self.skips and id(module) in self.skips) or (current is not None and current.key[0] == id(module)):
            return
        self._make_skippable(module)

    def _skipped_call(self, module: torch.nn.Module) -> Callable:
        def call(original: Callable, args: tuple, kwargs: dict) -> Any:
            entries = self._skip_values.pop(id(module), [])
            whole = [value for rows, value, _ in entries if rows is None]
            if whole:
                return whole[-1]
            output = original(*args, **kwargs)
            for rows, value, what in entries:
                output = splice(output, rows, value, self.interleaver.batch_size, what)
            return output

        return call

    def _make_skippable(self, module: torch.nn.Module) -> None:
        if not self.skips:
            self.skips, self._skip_values = {}, {}
        if id(module) not in self.skips:
            self.skips[id(module)] = ForwardSkip(module)

    def replace_forward(self, module: torch.nn.Module, change: Callable[[], None]) -> None:
        """Call ``change``, which replaces ``module``'s forward for this run
        (``.source`` instruments it), beneath the module's ``.skip`` wrapper if
        it has one: a skip still skips the new forward."""
        skip = self.skips.get(id(module)) if self.skips else None
        if skip is None:
            change()
            return
        replacement = skip.replacement
        skip.restore()  # the forward underneath, for `change` to replace
        try:
            change()
        finally:
            again = self.skips[id(module)] = ForwardSkip(module)
            again.replacement = replacement

    def source_instrumentation(self, make: Callable[["TraceRun"], Any]) -> Any:
        """What ``.source`` put in place in this run (a :class:`.operations.RunSources`,
        ``make(self)`` at first use); the run restores it when it ends."""
        found = self.sources
        if found is None:
            found = self.sources = make(self)
        return found

    def meeting(self, barrier: Any, make: Callable[[], Any]) -> Any:
        """The state of ``barrier`` in this run (a :class:`.barrier.Meeting`,
        ``make()`` at its first call): kept here, so that a barrier object
        never holds a trace's tasks."""
        meetings = self.meetings
        if not meetings:
            meetings = self.meetings = {}
        found = meetings.get(barrier)
        if found is None:
            found = meetings[barrier] = make()
        return found

    def touched_weight(self, name: str, tensor: torch.Tensor) -> None:
        if id(tensor) not in self._weights and tensor.grad_fn is None:
            if not self._weights:
                self._weights = {}
            self._weights[id(tensor)] = (name, tensor, tensor._version)

    # -- the end ----------------------------------------------------------------
    def run_to_end(self, receive: Callable[[dict[str, Any]], None], in_session: list[str] | None = None) -> None:
        """The whole life of a run, the same for a local trace, a scan and a
        remote request: execute the bodies, check the weights, hand the names
        back to ``receive`` — also when the run failed, so that what was saved
        before the error still reaches the caller — and release the run.  An
        error propagates with its traceback starting at the user's body
        (``in_session``: see :meth:`hand_back`)."""
        try:
            self.execute()
            if self._weights:
                self.check_weights()
        except BaseException as error:
            if isinstance(error, AttributeError) and not self._needs_save:
                explain_missing_tensor_save(error)
            self.clean_traceback(error)
            raise
        finally:
            try:
                receive(self.hand_back(in_session))
            finally:
                self.release()

    def hand_back(self, in_session: list[str] | None = None) -> dict[str, Any]:
        """The names to bind in the caller's scope (see :mod:`.saving`;
        ``in_session`` collects the names handed back unsaved in a session)."""
        replaced = self.saves.finish() if len(self.saves) else {}
        # Placeholders of unsaved names outlive the run: they hold where it
        # was, never the run (nor, through it, the model and its values).
        filename, lineno = self.captured.filename, self.captured.with_lineno
        where = LazyText(lambda: f"at {describe_location(filename, lineno)}")
        flow = self.flow
        if flow is not None and flow.invokes:
            names = set(self.captured.stored)
            for task in flow.invokes:
                names |= task.stored
            raw = flow.final_values(names)
        else:
            ns = self.body.ns
            raw = {n: dict.__getitem__(ns, n) for n in self.captured.stored if dict.__contains__(ns, n)}
        seed = self.seed
        lines = self.captured.assigned_lines
        out: dict[str, Any] = {}
        for name, value in raw.items():
            if name in seed and seed[name] is value:
                continue  # never reassigned
            out[name] = hand_back(name, value, self.saves, replaced, where, lines.get(name), in_session)
        if self.captured.as_name:
            out[self.captured.as_name] = self.tracer
        self._scrub(out, where)
        return out

    def _scrub(self, out: dict[str, Any], where: Any) -> None:
        """Drop the links from the namespaces back to this run; where a body
        defined functions (which keep its namespace as their globals), leave
        nothing unsaved reachable from it."""
        tasks = (self.body, *self.explicit_invokes, *self.edit_tasks) if self.explicit_invokes or self.edit_tasks else (self.body,)
        for task in tasks:
            ns = task.ns
            ns.resolver = None
            if isinstance(ns, TracedNamespace):
                ns.side.clear()
            task.run = None  # type: ignore[assignment]
        if self.flow is not None:
            self.flow.release()
            self.flow = None
        if not self.captured.defines_scopes and not any(t.code is not self.captured.code for t in self.explicit_invokes):
            return
        for task in (self.body, *self.explicit_invokes):
            ns = task.ns
            for name, value in list(dict.items(ns)):
                if name in out:
                    dict.__setitem__(ns, name, out[name])
                elif isinstance(value, torch.Tensor) and value not in self.saves:
                    dict.__setitem__(ns, name, NotSaved(name, where, self.captured.assigned_lines.get(name)))

    def check_weights(self) -> None:
        if not self._weights:
            return
        changed = [name for name, tensor, version in self._weights.values() if tensor._version != version]
        self._weights = _NOTHING
        if changed:
            raise WeightsModifiedError(
                f"the trace at {self._where()} changed model weights in place: {', '.join(changed)}. "
                "The model now differs from before the trace. Edit activations (`.output`) instead, "
                "or change weights deliberately on `model._model` outside a trace."
            )

    def release(self) -> None:
        """Break every link this run holds, so that nothing it touched waits
        for the garbage collector (activations are freed as soon as the user
        drops them)."""
        self.saves.release()
        interleaver = self.interleaver
        for cache in interleaver.caches:
            cache._detach_run()
        self.meetings = _NOTHING
        # The one cycle left (tasks no longer point here, see _scrub): the
        # interleaver holds methods of this run.  The rest goes when the run is dropped.
        interleaver.detach()
        self.body = None  # type: ignore[assignment]
        self.seed = self.globals = self.inputs = self.output = None  # type: ignore[assignment]
        self.tracer = None

    def _where(self) -> str:
        return describe_location(self.captured.filename, self.captured.with_lineno)

    def clean_traceback(self, error: BaseException) -> None:
        """Start the error's traceback at the user's body, hiding the library
        frames (and the model's forward frames that lead back into them);
        with ``CONFIG.APP.DEBUG`` on, leave it whole."""
        if isinstance(error.__context__, TAKEN_OVER):
            error.__context__ = None
        if show_library_frames():
            return
        tb = error.__traceback__
        codes = {task.code for task in self.interleaver.tasks}
        codes.add(self.captured.code)
        first_body = None
        node = tb
        while node is not None:
            if node.tb_frame.f_code in codes:
                first_body = node
                break
            node = node.tb_next
        # From the body on, without the library's frames; an error of the
        # library's alone (no frame of the user's left) shows where the
        # user's `with` statement is, added as it leaves the trace.
        error.__traceback__ = only_user_frames(first_body if first_body is not None else tb)


def _located(error: SeethroughError, where: str) -> SeethroughError:
    """The same error, its message ending with where in the user's code it arose."""
    try:
        return type(error)(f"{error} ({where})")
    except TypeError:  # an error class with a different constructor: keep it as is
        return error
