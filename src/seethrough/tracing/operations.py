"""Operations inside a forward, live in a trace (the machinery behind ``.source``).

When a body first asks for an operation of a module (``attn.source.
attention_interface_1.output``), :class:`RunSources` puts an instrumented
copy of the module's forward (see :mod:`.rewrite`) on the module instance,
for this trace only; the run restores the module when it ends, also after
an error.  Modules nobody asks about are never touched.

In the copy every call goes through a dispatch function that looks up its
call site in a list: ``None`` (nobody asked) just makes the call; an
:class:`OpRuntime` reports it, so that the interleaver sees its
arguments as an ``"input"`` event and its result as an ``"output"`` event —
the same two events a module has, keyed by the operation's :class:`OpKey`
instead of the module.  So everything the interleaver does for modules
(invoke rows, generation steps, ``.next()``, order errors, edits) applies to
operations unchanged.

``.source`` on an operation descends into the function the call actually
runs (often a local such as ``attention_interface``): once a body has seen
the callee at the operation's input event, that call and the later calls of
the operation in the trace run an instrumented copy of the callee, whose own
call sites are operations under the first.
"""

from __future__ import annotations

import types
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .._frames import is_library_file
from ..errors import OutOfOrderError, SourceError
from .sentinels import MISSING
from .rewrite import Analysis, analyse, rewrap, unwrap_chain

if TYPE_CHECKING:
    from .interleaver import Interleaver
    from .run import TraceRun

_ORIGINAL = "__seethrough_original__"  # on an installed copy: the forward it replaced


class OpKey:
    """The identity of one call site (of a module's forward, or of a function
    reached through another operation): the interleaver's key for its events."""

    __slots__ = ("name", "index", "assignment", "children", "__weakref__")

    def __init__(self, name: str, index: int, assignment: bool = False) -> None:
        self.name = name
        self.index = index
        self.assignment = assignment  # `t = v`: its callee is `bind`, the function it binds is `v`
        self.children: dict[Analysis, dict[str, OpKey]] = {}

    def child(self, analysis: Analysis, name: str) -> "OpKey":
        table = self.children.setdefault(analysis, {})
        key = table.get(name)
        if key is None:
            site = analysis.by_name[name]
            key = table[name] = OpKey(name, site.index, site.assignment)
        return key


# One key per (module, site), whoever's envoy names it; nothing kept alive by it.
_MODULE_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, OpKey]]" = weakref.WeakKeyDictionary()


def module_key(module: torch.nn.Module, analysis: Analysis, name: str) -> OpKey:
    table = _MODULE_KEYS.get(module)
    if table is None:
        table = _MODULE_KEYS[module] = {}
    key = table.get(name)
    site = analysis.by_name[name]
    if key is None or key.index != site.index:
        key = table[name] = OpKey(name, site.index, site.assignment)
    return key


def forward_function(module: torch.nn.Module) -> tuple[str, types.FunctionType, bool]:
    """``(slot, function, bound)``: the instance attribute that holds what
    ``module(...)`` runs, the Python function behind it, and whether it is
    called bound to the module.  seethrough's own wrappers are looked through."""
    own = module.__dict__
    slot = "_old_forward" if "_old_forward" in own and "forward" in own else "forward"  # accelerate's hooks
    current = own.get(slot)
    if current is None or _is_ours(current):
        current = types.MethodType(type(module).forward, module)
    func = current.__func__ if isinstance(current, types.MethodType) else current
    func = getattr(func, _ORIGINAL, func)
    bound = isinstance(current, types.MethodType) and current.__self__ is module
    if not isinstance(func, types.FunctionType):
        raise SourceError(
            f"the forward of this {type(module).__name__} is a {type(func).__name__}, not a Python "
            "function, so it has no operations to show. Read the module's `.input`/`.output` instead."
        )
    return slot, func, bound


def _is_ours(current: Any) -> bool:
    func = current.__func__ if isinstance(current, types.MethodType) else current
    code = getattr(func, "__code__", None)
    return hasattr(func, _ORIGINAL) or (code is not None and is_library_file(code.co_filename))


def body_of(func: types.FunctionType, what: str) -> tuple[list[types.FunctionType], Analysis]:
    """The decorator chain of ``func`` and the analysis of the function holding its body."""
    chain = unwrap_chain(func)
    return chain, analyse(chain[-1], what)


class Installed:
    """One instrumented copy of a function, for one trace: which of its call
    sites someone asked for."""

    __slots__ = ("analysis", "active", "dispatch")

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        active: list[OpRuntime | None] = [None] * len(analysis.sites)
        self.active = active

        def dispatch(index: int, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            op = active[index]
            if op is None:
                return fn(*args, **kwargs)
            return op.call(fn, args, kwargs)

        self.dispatch = dispatch

    def build(self, chain: list[types.FunctionType], what: str) -> types.FunctionType:
        body = self.analysis.build(chain[-1], self.dispatch)
        top = rewrap(chain, body, what)
        setattr(top, _ORIGINAL, chain[0])
        return top


class OpRuntime:
    """An operation someone asked for in this trace: reports its calls."""

    __slots__ = ("key", "key_in", "key_out", "interleaver", "fn", "descend", "inner", "built", "running")

    def __init__(self, key: OpKey, interleaver: "Interleaver") -> None:
        self.key = key
        self.key_in = (id(key), "input")
        self.key_out = (id(key), "output")
        self.interleaver = interleaver
        self.fn: Any = None  # the callee of the call being reported (for `.source` on the op)
        self.descend = False  # run an instrumented copy of the callee
        self.inner: dict[Analysis, Installed] = {}
        self.built: dict[Any, tuple[types.FunctionType, Any]] = {}
        self.running = 0  # calls past their input and not yet returned (the instrumented callee runs)

    def call(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        interleaver = self.interleaver
        if not interleaver.in_our_forward():
            return fn(*args, **kwargs)
        if self.key.assignment:
            return self._bind(args[0])
        self.fn = fn
        args, kwargs = interleaver.reached(self.key_in, "input", (args, kwargs))
        target = self._descended(fn) if self.descend else fn
        self.running += 1
        try:
            result = target(*args, **kwargs)
        finally:
            self.running -= 1
        return interleaver.reached(self.key_out, "output", result)

    def _bind(self, value: Any) -> Any:
        """An assignment: report the value bound.  After ``.source`` on it, a
        function bound is replaced by its instrumented copy, so the call that
        runs it later shows its operations."""
        interleaver = self.interleaver
        self.fn = value
        self.running += 1  # `.source` asked while the body is at this binding needs no wait
        try:
            (value,), _ = interleaver.reached(self.key_in, "input", ((value,), {}))
            self.fn = value
            value = interleaver.reached(self.key_out, "output", value)
        finally:
            self.running -= 1
        if not self.descend:
            return value
        copy = self._descended(value)
        if copy is value:
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.running += 1  # as for a call: `.source` again while it runs needs no wait
            try:
                return copy(*args, **kwargs)
            finally:
                self.running -= 1

        return counted

    def installed(self, analysis: Analysis) -> Installed:
        found = self.inner.get(analysis)
        if found is None:
            found = self.inner[analysis] = Installed(analysis)
        return found

    def _descended(self, fn: Any) -> Any:
        func, owner = (fn.__func__, fn.__self__) if isinstance(fn, types.MethodType) else (fn, None)
        entry = self.built.get(func)
        if entry is None:
            if not isinstance(func, types.FunctionType) or isinstance(fn, torch.nn.Module):
                return fn  # not a Python function: nothing to descend into (`.source` said so)
            what = f"`.source` of operation `{self.key.name}`"
            chain, analysis = body_of(func, what)
            entry = (self.installed(analysis).build(chain, what), func)
            self.built[func] = entry
        return entry[0] if owner is None else types.MethodType(entry[0], owner)


class RunSources:
    """What ``.source`` put in place for one trace, and how to take it away."""

    def __init__(self, run: "TraceRun") -> None:
        self.run = run
        self.modules: dict[int, Installed] = {}
        self.ops: dict[int, OpRuntime] = {}
        self._restore: list[tuple[torch.nn.Module, str, Any]] = []

    @classmethod
    def of(cls, run: "TraceRun") -> "RunSources":
        return run.source_instrumentation(cls)

    def attach_module_op(self, module: torch.nn.Module, key: OpKey, what: str) -> OpRuntime:
        """Report the calls of ``key`` (a call site of ``module``'s forward) in this trace."""
        runtime = self.ops.get(id(key))
        if runtime is None:
            installed = self._install(module, what)
            runtime = self._add(key)
            installed.active[key.index] = runtime
        return runtime

    def attach_inner_op(self, parent: OpRuntime, analysis: Analysis, key: OpKey) -> OpRuntime:
        """Report the calls of ``key``, a call site of the function ``parent`` calls."""
        runtime = self.ops.get(id(key))
        if runtime is None:
            parent.descend = True
            runtime = self._add(key)
            parent.installed(analysis).active[key.index] = runtime
        return runtime

    def prepare(self, module: torch.nn.Module, what: str) -> None:
        """Instrument ``module`` for this trace ahead of any operation, unless
        its forward is running (then the first operation asked for says why
        its values cannot be seen)."""
        if id(module) not in self.modules and not self._running(module):
            self._install(module, what)

    def _add(self, key: OpKey) -> OpRuntime:
        interleaver = self.run.interleaver
        runtime = self.ops[id(key)] = OpRuntime(key, interleaver)
        interleaver.reported_elsewhere(runtime.key_in)
        interleaver.reported_elsewhere(runtime.key_out)
        return runtime

    def _install(self, module: torch.nn.Module, what: str) -> Installed:
        installed = self.modules.get(id(module))
        if installed is not None:
            return installed
        self._check_not_running(module, what)
        def instrument() -> None:
            slot, func, bound = forward_function(module)
            chain, analysis = body_of(func, what)
            installed = Installed(analysis)
            new = installed.build(chain, what)
            self._restore.append((module, slot, module.__dict__.get(slot, MISSING)))
            setattr(module, slot, types.MethodType(new, module) if bound else new)
            self.modules[id(module)] = installed

        self.run.replace_forward(module, instrument)  # beneath a `.skip` wrapper, if any
        # The module and its ancestors are running whenever a body waits at one
        # of its operations: hook their outputs now, before their calls begin.
        self.run.interleaver.hook(module, "output")
        return self.modules[id(module)]

    def _running(self, module: torch.nn.Module) -> bool:
        """Is ``module``'s forward running (the forward paused inside it)?"""
        interleaver = self.run.interleaver
        if not interleaver.forward_running:
            return False
        frame = interleaver.main.gr_frame
        while frame is not None:
            if frame.f_locals.get("self") is module and frame.f_code.co_name in ("forward", "_call_impl"):
                return True
            frame = frame.f_back
        return False

    def _check_not_running(self, module: torch.nn.Module, what: str) -> None:
        if self._running(module):
            raise OutOfOrderError(
                f"{what} was used first while that module's forward was already running (the body "
                "had read a value inside it), so the operations of this call cannot be seen. Use "
                "the module's `.source` before reading values inside that module, e.g. "
                "`src = model.<path>.source` at the top of the invoke, then `src.<op>.output`."
            )

    def restore(self) -> None:
        """Put every instrumented module back as it was (last change first)."""
        entries, self._restore = self._restore, []
        for module, slot, previous in reversed(entries):
            if previous is MISSING:
                module.__dict__.pop(slot, None)
            else:
                setattr(module, slot, previous)
        self.modules.clear()
        self.ops.clear()
