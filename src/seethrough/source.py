"""``envoy.source``: the operations inside a module's forward, as in nnsight.

``print(model.transformer.h[0].attn.source)`` shows the forward's source with
a name in front of every call site; in a trace, each named operation has the
accessors of a module::

    with model.trace(prompt):
        attn = model.transformer.h[0].attn.source
        weights = attn.attention_interface_1.output[1].save()   # read
        attn.self_c_proj_0.output[:] = 0                        # edit the running forward
        args, kwargs = attn.attention_interface_1.inputs

``.source`` on an operation descends into the function that call runs
(``attn.attention_interface_1.source.torch_matmul_0``); which function that
is is known only while the model runs, so this works inside a trace.
Naming rules: :mod:`seethrough.tracing.rewrite`; the machinery:
:mod:`seethrough.tracing.operations`.
"""

from __future__ import annotations

import difflib
import types
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ._frames import where_user_is
from .envoy import NextCall, ValueAccessor, _read, _task_or_raise, _write
from .errors import ModulePathError, NotInTraceError, SourceError, UsageAttributeError
from .tracing.operations import OpKey, OpRuntime, RunSources, body_of, forward_function, module_key
from .tracing.rewrite import Analysis
from .tracing.runtime import current_task

if TYPE_CHECKING:
    from .envoy import Envoy


class _Source:
    """The named operations of one function (shared by the two kinds below)."""

    def _analysis_(self) -> Analysis:
        raise NotImplementedError

    def _operation(self, name: str) -> "Operation":
        raise NotImplementedError

    def _where_(self) -> str:
        raise NotImplementedError

    def __getattr__(self, name: str) -> "Operation":
        if name.startswith("__"):
            raise AttributeError(name)
        analysis = self._analysis_()
        if name not in analysis.by_name:
            names = list(analysis.by_name)
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
            raise ModulePathError(
                f"`{self._where_()}` has no operation `{name}` ({where_user_is()}).{hint} "
                f"`print({self._where_()})` shows the source with every operation's name."
            )
        return self._operation(name)

    def __iter__(self) -> Iterator["Operation"]:
        return (self._operation(site.name) for site in self._analysis_().sites)

    def __len__(self) -> int:
        return len(self._analysis_().sites)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._analysis_().by_name))

    def __repr__(self) -> str:
        analysis = self._analysis_()
        return analysis.listing(f"{self._where_()}: {analysis.qualname} ({analysis.filename}:{analysis.def_lineno})")

    __str__ = __repr__


class ModuleSource(_Source):
    """``envoy.source``: the operations of the module's forward."""

    def __init__(self, envoy: "Envoy") -> None:
        object.__setattr__(self, "_envoy", envoy)
        object.__setattr__(self, "_ops", {})
        object.__setattr__(self, "_analysis", None)

    def _analysis_(self) -> Analysis:
        analysis = self._analysis
        if analysis is None:
            what = f"`{self._where_()}`"
            try:
                _, func, _ = forward_function(self._envoy._module)
            except SourceError as error:
                raise SourceError(f"{what}: {error}") from None
            _, analysis = body_of(func, what)
            object.__setattr__(self, "_analysis", analysis)
        return analysis

    def _where_(self) -> str:
        return f"{self._envoy._display_path()}.source"

    def _operation(self, name: str) -> "Operation":
        op = self._ops.get(name)
        if op is None:
            analysis = self._analysis_()
            key = module_key(self._envoy._module, analysis, name)
            op = self._ops[name] = Operation(self, key, analysis)
        return op

    def _attach(self, op: "Operation", run: Any) -> OpRuntime:
        return RunSources.of(run).attach_module_op(self._envoy._module, op._module, f"`{op._display_path()}`")

    def _path_(self) -> str:
        return f"{self._envoy._path}.source" if self._envoy._path else "source"

    def __setattr__(self, name: str, value: Any) -> None:
        raise UsageAttributeError(f"cannot set `{name}` on `{self._where_()}`: assign an operation's `.output`/`.input` instead.")


class FunctionSource(_Source):
    """``operation.source``: the operations of the function an operation calls."""

    def __init__(self, parent: "Operation", analysis: Analysis) -> None:
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_analysis", analysis)
        object.__setattr__(self, "_ops", {})

    def _analysis_(self) -> Analysis:
        return self._analysis

    def _where_(self) -> str:
        return f"{self._parent._display_path()}.source"

    def _operation(self, name: str) -> "Operation":
        op = self._ops.get(name)
        if op is None:
            key = self._parent._module.child(self._analysis, name)
            op = self._ops[name] = Operation(self, key, self._analysis)
        return op

    def _attach(self, op: "Operation", run: Any) -> OpRuntime:
        parent = self._parent._attach(run)
        return RunSources.of(run).attach_inner_op(parent, self._analysis, op._module)

    def _path_(self) -> str:
        return f"{self._parent._path}.source"

    def __setattr__(self, name: str, value: Any) -> None:
        raise UsageAttributeError(f"cannot set `{name}` on `{self._where_()}`: assign an operation's `.output`/`.input` instead.")


class Operation:
    """One call site: ``.output``, ``.input``, ``.inputs`` (read and assign),
    ``.next()`` and ``.source``, like a module's envoy."""

    __slots__ = ("_owner", "_module", "_analysis", "_path", "_inner")

    def __init__(self, owner: ModuleSource | FunctionSource, key: OpKey, analysis: Analysis) -> None:
        self._owner = owner
        self._module = key  # what the interleaver keys this operation's events by
        self._analysis = analysis
        self._path = f"{owner._path_()}.{key.name}"
        self._inner: dict[Analysis, FunctionSource] = {}

    @property
    def name(self) -> str:
        return self._module.name

    def _display_path(self) -> str:
        return f"{self._owner._where_()}.{self._module.name}"

    def _attach(self, run: Any) -> OpRuntime:
        return self._owner._attach(self, run)

    def _ready(self, accessor: str) -> None:
        task = _task_or_raise(self, accessor)
        self._attach(task.run)

    output = ValueAccessor("output", "output", "The operation's return value in the running trace.")
    input = ValueAccessor("input", "input", "The operation's first argument in the running trace.")
    inputs = ValueAccessor("input", "inputs", "``(args, kwargs)`` the operation is called with in the running trace.")

    def _read_value(self, kind: str, accessor: str) -> Any:
        self._ready(accessor)
        return _read(self, kind, accessor, 0)

    def _write_value(self, kind: str, accessor: str, value: Any) -> None:
        self._ready(accessor)
        _write(self, kind, accessor, value)

    def next(self, calls: int = 1) -> NextCall:
        """The operation's call after the current one (a loop, a later step)."""
        self._ready("next()")
        return NextCall(self, calls)  # type: ignore[arg-type]

    @property
    def source(self) -> FunctionSource:
        """The operations of the function this call runs (inside a trace: the
        callee is known only when the model gets there)."""
        task = _task_or_raise_source(self)
        runtime = self._attach(task.run)
        if not (runtime.running and (runtime.descend or self._module.assignment) and runtime.fn is not None):
            # Wait until the model is at this call; a body already inside it (reading an
            # operation of the callee, then writing one) names the running callee as it is,
            # and one at an assignment (having read its value) the function it binds.
            _read(self, "input", "inputs", 0)
        fn = runtime.fn
        what = f"`{self._display_path()}.source`"
        func = getattr(fn, "__func__", fn)
        if isinstance(fn, torch.nn.Module):
            raise SourceError(
                f"{what} ({where_user_is()}): this call runs a submodule ({type(fn).__name__}); use "
                "that module's envoy and its own `.source` instead."
            )
        if self._module.assignment and not isinstance(func, types.FunctionType):
            raise SourceError(
                f"{what} ({where_user_is()}): `{self._module.name}` is an assignment, not a call, and "
                f"the value it binds is a {type(fn).__name__}, not a Python function, so there is no "
                "function to look into. Its `.output` is the value assigned; the call that computed "
                "it is listed before it in `print(<module>.source)`."
            )
        if not callable(fn) or not hasattr(func, "__code__"):
            raise SourceError(
                f"{what} ({where_user_is()}): this call runs `{getattr(fn, '__qualname__', type(fn).__name__)}`, "
                "which is not a Python function (a builtin or compiled operation), so it has no "
                "operations inside. Read this operation's `.input`/`.output` instead."
            )
        _, analysis = body_of(func, what)
        runtime.descend = True
        runtime.installed(analysis)
        inner = self._inner.get(analysis)
        if inner is None:
            inner = self._inner[analysis] = FunctionSource(self, analysis)
        return inner

    def __repr__(self) -> str:
        site = self._analysis.by_name[self._module.name]
        return self._analysis.context(site, f"{self._display_path()}:")

    __str__ = __repr__


def source_view(envoy: Any) -> ModuleSource:
    """``envoy.source``: the envoy's one :class:`ModuleSource` (made on first
    use, kept in the envoy); in a trace, the module's forward is instrumented
    now, before values inside it are read (unless it is already running)."""
    view = envoy.__dict__.get("_source")
    if view is None:
        view = envoy.__dict__["_source"] = ModuleSource(envoy)
    task = current_task()
    if task is not None and task.run is not None:
        RunSources.of(task.run).prepare(envoy._module, f"`{view._where_()}`")
    return view


def _task_or_raise_source(op: Operation) -> Any:
    try:
        return _task_or_raise(op, "source")
    except NotInTraceError:
        raise NotInTraceError(
            f"`{op._display_path()}.source` was used outside a trace ({where_user_is()}). Which "
            "function an operation calls is known only while the model runs: use it inside "
            "`with model.trace(...)` (print it there to see its operations)."
        ) from None
