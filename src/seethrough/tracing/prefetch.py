"""Runs of plain saves, served without leaving the forward pass.

Reading ``module.output`` in a body costs two greenlet switches: the body
switches to the forward to wait, and the module's hook switches back into the
body.  A body that only *saves* a series of values,

.. code-block:: python

    hs = [model.transformer.h[i].output.save() for i in range(12)]

does nothing between two reads that the forward could see: it only picks the
next module and asks again.  So such a comprehension is compiled (see
:func:`rewrite_prefetch`, applied by :mod:`.capture`) into one call of
:func:`prefetch`, which asks for all the values as one :class:`Batch`: the
task waits for the first value; when the hook serves it, the interleaver
(``Interleaver._resume``) hands it to the batch, which records the value and
asks for the next one right there, exactly as the body would have (same
hooks, installed at the same moment; same order among invokes; same errors),
but without switching into the body.  The body runs again once, with every
value, when the batch is complete; it then saves them in order.

Nothing changes in what a body sees.  The batch stops, and the body goes on
the ordinary way for the rest of the items, whenever the ordinary path would
do anything else: a value that is not a plain tensor or tuple (its ``save``
might be a method of its own), a ``tracer.cache`` recording, a ``tracer.iter``
loop counting calls, the forward having ended, a list that changed while it
was iterated.  A comprehension whose parts are not plain envoys (a custom
envoy's property, an attribute of a module, a name that is not an envoy)
runs as written, item by item.  A value that never comes raises the same
error, naming the user's line, as the ordinary path.

What is recognised: a list comprehension ``[<chain>.output.save() for NAME
in ITER]`` (also ``.input`` / ``.inputs``), one ``for``, no ``if``, where
``<chain>`` is a name followed by attribute names and subscripts that are
integer constants or ``NAME`` (``model.layers[i]``, ``layer.mlp`` for
``layer in model.layers``).  ``ITER`` is evaluated as written; the batch is
used when it is a ``range``, tuple, list or envoy (module list).
"""

from __future__ import annotations

import ast
import sys
from typing import Any, Callable

import greenlet
import torch

from ..envoy import Envoy, _read
from ..errors import ModulePathError
from .runtime import SAVE_METHOD, TaskGreenlet

# The name the rewritten code calls (bound in every body namespace, like SAVE_METHOD).
PREFETCH = "__seethrough_prefetch__"
_ITEMS = "__seethrough_items__"  # the fallback's parameter

_ACCESSORS = {"output": "output", "input": "input", "inputs": "input"}
_RESERVED = frozenset({"output", "input", "inputs", "skip", "next", "path", "source"})
_LOOP = None  # a subscript by the comprehension's variable, in a chain's steps

_getcurrent = greenlet.getcurrent


# -- compile time: recognising the runs --------------------------------------------------


def _int_constant(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int
    ):
        return -node.operand.value
    return None


def _chain(node: ast.AST, loop: str) -> tuple[str, tuple] | None:
    """``(root name, steps)`` of ``name.attr[0][loop]...``, or None."""
    steps: list[Any] = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_") or node.attr in _RESERVED:
                return None
            steps.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.Name) and index.id == loop:
                steps.append(_LOOP)
            else:
                constant = _int_constant(index)
                if constant is None:
                    return None
                steps.append((constant,))  # a 1-tuple: told apart from attribute names
            node = node.value
        else:
            return None
    if node.id.startswith("__"):
        return None
    return node.id, tuple(reversed(steps))


def _plain_save(comp: ast.ListComp) -> tuple | None:
    """The site constant for a recognised comprehension, or None."""
    if len(comp.generators) != 1:
        return None
    gen = comp.generators[0]
    if gen.ifs or gen.is_async or not isinstance(gen.target, ast.Name):
        return None
    loop = gen.target.id
    elt = comp.elt
    if not (
        isinstance(elt, ast.Call) and isinstance(elt.func, ast.Name) and elt.func.id == SAVE_METHOD
        and len(elt.args) == 1 and not elt.keywords and isinstance(elt.args[0], ast.Attribute)
        and elt.args[0].attr in _ACCESSORS
    ):
        return None
    read = elt.args[0]
    found = _chain(read.value, loop)
    if found is None:
        return None
    root, steps = found
    return root, steps, _ACCESSORS[read.attr], read.attr


class _Rewriter(ast.NodeTransformer):
    """Module-level list comprehensions of plain saves -> one ``prefetch`` call."""

    def __init__(self) -> None:
        self.changed = False

    def visit_ListComp(self, node: ast.ListComp) -> ast.AST:
        found = _plain_save(node)
        if found is None:
            return node  # not descended into: its own scope
        root, steps, kind, accessor = found
        gen = node.generators[0]
        loop = gen.target.id
        site = ast.Constant((steps, kind, accessor, root == loop))
        root_value: ast.expr = ast.Constant(None) if root == loop else ast.Name(root, ast.Load())
        fallback = ast.Lambda(
            args=ast.arguments(posonlyargs=[], args=[ast.arg(_ITEMS)], kwonlyargs=[], kw_defaults=[], defaults=[]),
            body=ast.ListComp(
                elt=node.elt,
                generators=[ast.comprehension(target=gen.target, iter=ast.Name(_ITEMS, ast.Load()), ifs=[], is_async=0)],
            ),
        )
        call = ast.Call(
            func=ast.Name(PREFETCH, ast.Load()),
            args=[site, gen.iter, root_value, ast.Name(SAVE_METHOD, ast.Load()), fallback],
            keywords=[],
        )
        # The call stands where the element was: a value that never comes is
        # reported at that line, as the comprehension's own read would be.
        ast.fix_missing_locations(ast.copy_location(call, node.elt))
        self.changed = True
        return call

    def _scope(self, node: ast.AST) -> ast.AST:
        return node  # functions, classes, lambdas and other comprehensions: left as written

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope
    visit_SetComp = visit_DictComp = visit_GeneratorExp = _scope


def rewrite_prefetch(body: list[ast.stmt]) -> list[ast.stmt]:
    """``body`` with its runs of plain saves turned into :func:`prefetch`
    calls; ``body`` itself if it has none.  ``body`` must be a copy the
    caller owns (the nodes are reused)."""
    if not any(isinstance(node, ast.ListComp) for stmt in body for node in ast.walk(stmt)):
        return body
    rewriter = _Rewriter()
    new = [rewriter.visit(stmt) for stmt in body]
    return new if rewriter.changed else body


# -- run time ----------------------------------------------------------------------------

_plain_types: dict[type, bool] = {}


def _is_plain(cls: type) -> bool:
    """Is ``cls`` an envoy class whose navigation and accessors are seethrough's own?"""
    plain = _plain_types.get(cls)
    if plain is None:
        plain = _plain_types[cls] = (
            issubclass(cls, Envoy)
            and cls.__getattribute__ is object.__getattribute__
            and cls.__getattr__ is Envoy.__getattr__
            and cls.__getitem__ is Envoy.__getitem__
            and cls.__iter__ is Envoy.__iter__
            and all(cls.__dict__.get(name, Envoy.__dict__[name]) is Envoy.__dict__[name] for name in _ACCESSORS)
            and all(getattr(cls, name) is Envoy.__dict__[name] for name in _ACCESSORS)
        )
    return plain


def _walk(obj: Any, steps: tuple, item: Any) -> Any:
    """The envoy ``obj`` + ``steps`` leads to, found as plain attribute lookup
    would find it, or None where that would run anything but seethrough's
    own navigation (the ordinary path then runs as written)."""
    for step in steps:
        cls = type(obj)
        if not _plain_types.get(cls) and not _is_plain(cls):
            return None
        if type(step) is str:
            child = obj.__dict__.get(step)
            if child is None:
                if hasattr(cls, step):
                    return None
                modules = obj._module._modules
                if step in modules:
                    child = obj._child(step)
                elif step.endswith("_") and step[:-1] in _RESERVED and step[:-1] in modules:
                    child = obj._child(step[:-1])
                else:
                    child = obj._root._resolve_alias(obj, step)
                    if child is None:
                        return None
        else:
            key = item if step is _LOOP else step[0]
            if type(key) is not int:
                return None
            child = obj._children.get(key)
            if child is None:
                try:
                    child = obj[key]
                except ModulePathError:
                    return None
        obj = child
    cls = type(obj)
    if not _plain_types.get(cls) and not _is_plain(cls):
        return None
    return obj


def _recordable(value: Any) -> bool:
    """Values whose hand-over and save the batch may do later, in the body:
    ``present`` and ``save`` of these run nothing but seethrough's code."""
    kind = type(value)
    return kind is torch.Tensor or kind is tuple


def _first_input(value: Any) -> Any:
    """``.input`` of a call's ``(args, kwargs)`` (as ``envoy._read`` gives it)."""
    args, kwargs = value
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    return None


class Batch:
    """The values one task asks for in a row, served at the forward's hooks
    without switching into the task between them (see the module docs)."""

    __slots__ = ("envoys", "kind", "accessor", "items", "live", "frame", "values", "run")

    def __init__(self, run: Any, envoys: list, kind: str, accessor: str, items: tuple, live: list | None, frame: Any) -> None:
        self.run = run
        self.envoys = envoys
        self.kind = kind
        self.accessor = accessor
        self.items = items  # the iterated items (a list's, to see it change)
        self.live = live  # the list iterated, if it is one
        self.frame = frame  # where the user asked (for messages should a value never come)
        self.values: list[Any] = []

    def advance(self, interleaver: Any, event: Any, task: Any) -> bool:
        """``event`` serves the value ``task`` waited for (``Interleaver._resume``
        has unwaited it): record it and ask for the next.  True if the task
        waits again; False if it must run now (the batch is complete, or the
        rest goes the ordinary way)."""
        try:
            if not self._record(interleaver._view(event, task)):
                return False
            return self.ask(interleaver, event, task)
        except Exception:  # noqa: BLE001 - the body then asks itself, and gets the error there
            return False

    def _record(self, value: Any) -> bool:
        if self.accessor == "input":
            value = _first_input(value)
        if not _recordable(value):
            return False
        self.values.append(value)
        return True

    def ask(self, interleaver: Any, event: Any, task: Any) -> bool:
        """Ask for the next values as the body would: served at once when
        ``event`` is theirs; else wait (True).  False: run the body now."""
        values = self.values
        envoys = self.envoys
        kind = self.kind
        live = self.live
        n = len(envoys)
        while True:
            index = len(values)
            if live is not None and (len(live) <= index or live[index] is not self.items[index]):
                return False  # the list changed under the loop: the body iterates it itself
            if index == n:
                return False  # complete
            if interleaver.caches or interleaver.forward_done or interleaver.closing or interleaver.count_calls:
                return False
            envoy = envoys[index]
            module = envoy._module
            key = (id(module), kind)
            if kind == "input":
                self.run.prepare_skip(module)  # as `_read` does before asking
            if event is not None and event.key == key:
                event.served.add(task.index)
                if not self._record(interleaver._view(event, task)):
                    return False
                continue
            if key not in interleaver.hooks:
                interleaver.hook(module, kind, envoy)
            task.asked = (envoy, kind, self.frame, key in interleaver.fired,
                          not (interleaver.forward_running or interleaver.forward_done))
            interleaver._wait(task, key)
            return True


def prefetch(site: tuple, iterable: Any, root: Any, save: Callable[[Any], Any], fallback: Callable[[Any], list]) -> list:
    """``[<chain>.<accessor>.save() for item in iterable]`` (see the module docs);
    ``fallback(items)`` is that comprehension as written, over ``items``."""
    current = _getcurrent()
    if type(current) is not TaskGreenlet:
        return fallback(iterable)
    task = current.task
    run = task.run
    interleaver = run.interleaver if run is not None else None
    if (
        interleaver is None or not task.is_invoke or task.batch is not None or interleaver.closing
        or interleaver.forward_done or interleaver.caches or interleaver.count_calls
    ):
        return fallback(iterable)
    kind = type(iterable)
    live = None
    if kind is range or kind is tuple:
        items = iterable
    elif kind is list:
        items = tuple(iterable)
        live = iterable
    elif isinstance(iterable, Envoy) and _is_plain(kind):
        items = tuple(iterable)
    else:
        return fallback(iterable)
    steps, kind_name, accessor, loop_root = site
    envoys = []
    for item in items:
        envoy = _walk(item if loop_root else root, steps, item)
        if envoy is None:
            return fallback(iterable)
        envoys.append(envoy)
    if not envoys:
        return fallback(iterable)
    batch = Batch(run, envoys, kind_name, accessor, items if live is not None else (), live, sys._getframe())
    task.batch = batch
    try:
        if batch.ask(interleaver, interleaver.current, task):
            interleaver.main.switch()
    finally:
        task.batch = None
    values = batch.values
    out = []
    for value in values:
        out.append(save(value if type(value) is torch.Tensor else run.present(value)))
    done = len(values)
    if live is not None:
        if done == len(live) and done == len(items):
            return out
        return out + fallback(_rest_of(live, done))
    if done == len(envoys):
        return out
    for index in range(done, len(envoys)):
        # The ordinary way for the rest, in the body (errors name the user's line).
        out.append(save(_read(envoys[index], kind_name, accessor)))
    return out


def _rest_of(live: list, start: int) -> Any:
    """The rest of a list iteration from ``start``, as a list iterator gives it (lazily)."""
    index = start
    while index < len(live):
        yield live[index]
        index += 1
