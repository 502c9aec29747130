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
task waits for the first value; when the forward reaches it, the batch
records the value and asks for the next one right there, exactly as the
body would have (same order among invokes; same errors), but without
switching into the body.  The body runs again once, with every value, when
the batch is complete; it then saves them in order.

Two things make each value cheap.  While the batch's task is the only one
that wants a value (and sees the whole batch), ``Interleaver.reached`` hands
it straight to :meth:`Batch.record`, with no event to serve; otherwise the
ordinary serving hands it over (``Interleaver._resume`` -> :meth:`Batch.advance`).
And the hooks every value needs are added in one go when the batch starts
(``Interleaver.hook_ahead``), not one at each read: a hook on a module still
ahead of the forward fires the same either way, and one on a module the
forward has passed stays silent, as it would have been added too late; for
messages, a value hooked ahead counts as "its module had run before" only
where a hook added at its read would have seen that.

Nothing changes in what a body sees.  The batch stops, and the body goes on
the ordinary way for the rest of the items, whenever the ordinary path would
do anything else: a value that is not a plain tensor or tuple (its ``save``
might be a method of its own), a ``tracer.cache`` recording, a ``tracer.iter``
loop counting calls, the forward having ended, a list that changed while it
was iterated.  A comprehension whose parts are not plain envoys (a custom
envoy's property, an attribute of a module, a name that is not an envoy)
runs as written, item by item.  A value that never comes raises the same
error, naming the user's line, as the ordinary path.

What is recognised (at the body's own scope, not in functions it defines):

* a list comprehension ``[<chain>.output.save() for NAME in ITER]`` (also
  ``.input`` / ``.inputs``), one ``for``, no ``if``, where ``<chain>`` is a
  name followed by attribute names and subscripts that are integer constants
  or ``NAME`` (``model.layers[i]``, ``layer.mlp`` for ``layer in
  model.layers``) -> :func:`prefetch`; ``ITER`` is evaluated as written, and
  batched when it is a ``range``, tuple, list or module list;
* two or more consecutive ``NAME = <chain>.output.save()`` with constant
  indices, none reading a name an earlier one assigns -> :func:`prefetch_run`;
* ``for NAME in ITER: LIST.append(<chain>.output.save())``, nothing else in
  the loop -> :func:`prefetch_loop`.

The last two assign (or append) once the batch is complete, so they batch
only in bodies without invokes, where no other body can look in between.
The envoys are found ahead of time only through their own plain navigation
(:class:`.contract.PlainNavigation`).
"""

from __future__ import annotations

import ast
import itertools
import sys
from typing import Any, Callable

import greenlet
import torch

from ..errors import MissedProviderError
from .runtime import SAVE_METHOD, TaskGreenlet, save_method

# The name the rewritten code calls (bound in every body namespace, like SAVE_METHOD).
PREFETCH = "__seethrough_prefetch__"
PREFETCH_RUN = "__seethrough_prefetch_run__"
PREFETCH_LOOP = "__seethrough_prefetch_loop__"
_ITEMS = "__seethrough_items__"  # the fallback's parameter
_VALUES = "__seethrough_prefetched__"  # what a run's assignments take their values from

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


def _saved_read(node: ast.AST) -> ast.Attribute | None:
    """``<x>.output`` of ``SAVE_METHOD(<x>.output)`` (a rewritten ``.save()``), or None."""
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == SAVE_METHOD
        and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Attribute)
        and node.args[0].attr in _ACCESSORS
    ):
        return node.args[0]
    return None


def _plain_save(comp: ast.ListComp) -> tuple | None:
    """``(root, steps, kind, accessor)`` of a recognised comprehension, or None."""
    if len(comp.generators) != 1:
        return None
    gen = comp.generators[0]
    if gen.ifs or gen.is_async or not isinstance(gen.target, ast.Name):
        return None
    read = _saved_read(comp.elt)
    if read is None:
        return None
    found = _chain(read.value, gen.target.id)
    if found is None:
        return None
    root, steps = found
    return root, steps, _ACCESSORS[read.attr], read.attr


def _lambda(params: list[str], body: ast.expr) -> ast.Lambda:
    arguments = ast.arguments(posonlyargs=[], args=[ast.arg(p) for p in params], kwonlyargs=[], kw_defaults=[], defaults=[])
    return ast.Lambda(args=arguments, body=body)


def _name(name: str) -> ast.Name:
    return ast.Name(name, ast.Load())


class _Comprehensions(ast.NodeTransformer):
    """List comprehensions of plain saves -> one ``prefetch`` call each."""

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
        # The root is read when the first item is (never, for no items): passed as a function.
        root_value: ast.expr = ast.Constant(None) if root == loop else _lambda([], _name(root))
        items = ast.comprehension(target=gen.target, iter=_name(_ITEMS), ifs=[], is_async=0)
        fallback = _lambda([_ITEMS], ast.ListComp(elt=node.elt, generators=[items]))
        call = ast.Call(func=_name(PREFETCH), args=[site, gen.iter, root_value, _name(SAVE_METHOD), fallback], keywords=[])
        # The call stands where the element was: a value that never comes is
        # reported at that line, as the comprehension's own read would be.
        ast.fix_missing_locations(ast.copy_location(call, node.elt))
        self.changed = True
        return call

    def _scope(self, node: ast.AST) -> ast.AST:
        return node  # functions, classes, lambdas and other comprehensions: left as written

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scope
    visit_SetComp = visit_DictComp = visit_GeneratorExp = _scope


def _plain_assignment(stmt: ast.stmt) -> tuple | None:
    """``(target, root, steps, kind, accessor)`` of ``NAME = <chain>.output.save()``, or None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    read = _saved_read(stmt.value)
    if read is None:
        return None
    found = _chain(read.value, "")
    if found is None:
        return None
    root, steps = found
    return stmt.targets[0].id, root, steps, _ACCESSORS[read.attr], read.attr


def _runs(stmts: list[ast.stmt], changed: list[bool]) -> list[ast.stmt]:
    """``stmts`` with each run of two or more plain-save assignments turned
    into one ``prefetch_run`` call and the assignments taking its values
    (each assignment as written where the call has none for it)."""
    out: list[ast.stmt] = []
    index = 0
    while index < len(stmts):
        run: list[tuple] = []
        targets: set[str] = set()
        roots: set[str] = set()
        while index + len(run) < len(stmts):
            found = _plain_assignment(stmts[index + len(run)])
            if found is None:
                break
            target, root = found[0], found[1]
            if root in targets or target in roots or target in targets or target == root:
                break  # a later read depends on an earlier assignment
            run.append(found)
            targets.add(target)
            roots.add(root)
        if len(run) < 2:
            loop = _appending_loop(stmts[index])
            if loop is not None:
                changed[0] = True
                out.extend(loop)
            else:
                out.append(_nested(stmts[index], changed))
            index += 1
            continue
        changed[0] = True
        originals = stmts[index:index + len(run)]
        order = list(dict.fromkeys(found[1] for found in run))
        site = ast.Constant(tuple(
            (order.index(root), steps, kind, accessor, stmt.lineno)
            for (_, root, steps, kind, accessor), stmt in zip(run, originals)
        ))
        roots_value = _lambda([], ast.Tuple([_name(root) for root in order], ast.Load()))
        call = ast.Call(func=_name(PREFETCH_RUN), args=[site, roots_value, _name(SAVE_METHOD)], keywords=[])
        first = ast.Assign(targets=[ast.Name(_VALUES, ast.Store())], value=call)
        out.append(ast.fix_missing_locations(ast.copy_location(first, originals[0])))
        for stmt in originals:
            taken = ast.Call(func=_name(_VALUES), args=[], keywords=[])  # no attribute: a remote guard checks those
            branch = ast.If(
                test=_name(_VALUES),
                body=[ast.Assign(targets=[ast.Name(stmt.targets[0].id, ast.Store())], value=taken)],
                orelse=[stmt],
            )
            for part in (branch, branch.body[0], *ast.walk(branch.body[0])):
                ast.copy_location(part, stmt)
            out.append(ast.fix_missing_locations(branch))
        index += len(run)
    return out


def _appending_loop(stmt: ast.stmt) -> list[ast.stmt] | None:
    """``for NAME in ITER: LIST.append(<chain>.output.save())`` (nothing else
    in the loop, no ``else``) as a ``prefetch_loop`` call and the same loop
    over what it returns, each append taking its value (or running as
    written where there is none); None for any other statement."""
    if not (
        isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and not stmt.orelse
        and len(stmt.body) == 1 and isinstance(stmt.body[0], ast.Expr)
    ):
        return None
    loop = stmt.target.id
    call = stmt.body[0].value
    if not (
        isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "append"
        and isinstance(call.func.value, ast.Name) and len(call.args) == 1 and not call.keywords
    ):
        return None
    read = _saved_read(call.args[0])
    target = call.func.value.id
    found = _chain(read.value, loop) if read is not None else None
    if found is None or target in (loop, found[0]) or target.startswith("__"):
        return None
    root, steps = found
    site = ast.Constant((steps, _ACCESSORS[read.attr], read.attr, stmt.body[0].lineno))
    root_value: ast.expr = ast.Constant(None) if root == loop else _lambda([], _name(root))
    prepare = ast.Assign(
        targets=[ast.Name(_VALUES, ast.Store())],
        value=ast.Call(func=_name(PREFETCH_LOOP), args=[site, stmt.iter, root_value, _name(SAVE_METHOD)], keywords=[]),
    )
    original = stmt.body[0]
    taken = ast.Expr(ast.Call(
        func=ast.Attribute(ast.Name(target, ast.Load()), "append", ast.Load()),
        args=[ast.Call(func=_name(_VALUES), args=[], keywords=[])], keywords=[],
    ))
    for part in ast.walk(taken):
        ast.copy_location(part, original)
    branch = ast.copy_location(ast.If(test=_name(_VALUES), body=[taken], orelse=[original]), original)
    new_loop = ast.copy_location(
        ast.For(target=stmt.target, iter=_name(_VALUES), body=[branch], orelse=[], type_comment=None), stmt)
    ast.fix_missing_locations(ast.copy_location(prepare, stmt))
    return [prepare, ast.fix_missing_locations(new_loop)]


def _nested(stmt: ast.stmt, changed: list[bool]) -> ast.stmt:
    """A statement of the body's own scope, its nested blocks rewritten (not
    functions or classes: their scopes are their own)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt
    for field in ("body", "orelse", "finalbody"):
        block = getattr(stmt, field, None)
        if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
            setattr(stmt, field, _runs(block, changed))
    for handler in getattr(stmt, "handlers", ()):
        handler.body = _runs(handler.body, changed)
    return stmt


def rewrite_prefetch(body: list[ast.stmt]) -> list[ast.stmt]:
    """``body`` with its runs of plain saves turned into :func:`prefetch` /
    :func:`prefetch_run` calls; ``body`` itself if it has none.  ``body``
    must be a copy the caller owns (its nodes are reused and changed)."""
    changed = [False]
    comprehensions = _Comprehensions()
    new = _runs([comprehensions.visit(stmt) for stmt in body], changed)
    return new if changed[0] or comprehensions.changed else body


# -- run time ----------------------------------------------------------------------------

def _walk(obj: Any, steps: tuple, items: Any) -> list | None:
    """The handle ``obj`` + ``steps`` leads to for each of ``items`` by the
    envoys' own plain navigation (:class:`.contract.PlainNavigation`), or
    None where that would run anything else (the ordinary path then runs as
    written)."""
    walk = getattr(type(obj), "_plain_paths", None)
    return walk(obj, steps, items) if walk is not None else None


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
    without switching into the task between them (see the module docs).

    Only values whose hand-over (``run.present``) and ``save`` run nothing
    but seethrough's own code are recorded: plain tensors and tuples; the
    body asks for anything else itself (its ``save`` may be a method of its own)."""

    __slots__ = ("envoys", "modules", "kinds", "keys", "accessors", "items", "live", "frame", "lines", "values", "run", "early",
                 "turn")

    def __init__(self, run: Any, envoys: list, kinds: Any, accessors: Any, frame: Any,
                 items: tuple = (), live: list | None = None, lines: tuple | None = None) -> None:
        self.run = run
        self.envoys = envoys
        self.kinds = kinds
        self.accessors = accessors
        self.frame = frame  # where the user asked (for messages should a value never come)
        self.lines = lines  # or, for a run of statements, each one's line
        self.items = items  # the iterated items (a list's, to see it change)
        self.live = live  # the list iterated, if it is one
        self.values: list[Any] = []
        self.modules = [envoy._module for envoy in envoys]
        self.keys = [(id(module), kind) for module, kind in zip(self.modules, kinds)]  # what each waits for
        self.early: set[tuple] | None = None  # keys hooked ahead of their reads (see `collect`)
        self.turn = -1  # `interleaver.turns` when `_may_record` last said yes

    def record(self, interleaver: Any, key: tuple, value: Any, task: Any) -> tuple | None:
        """The lean path (``Interleaver.reached``, while ``task``, waiting for
        ``key``, is the only task that wants ``value``): record ``value`` and
        ask for the next one, as :meth:`advance` would, without an event;
        return the key the task now waits for.  None, with nothing changed,
        where the ordinary path must serve it (the last value, a value not
        plainly recorded, a next value the same module's, the batch stopping,
        anything in the trace that the lean path does not do)."""
        values = self.values
        index = len(values)
        following = index + 1
        keys = self.keys
        if following >= len(keys):
            return None  # the last value: the body runs next
        wanted = keys[following]
        if wanted[0] == key[0]:
            return None
        if self.turn != interleaver.turns and not self._may_record(interleaver, task):
            return None
        live = self.live
        if live is not None and (len(live) <= following or live[following] is not self.items[following]):
            return None  # the list changed under the loop: the body iterates it itself
        kind = type(value)  # (an output: `_may_record` allows no inputs)
        if kind is not torch.Tensor and kind is not tuple:
            return None
        values.append(value)
        task.asked = None  # worked out should the value never come (see `settle`)
        return wanted

    def settle(self, interleaver: Any, task: Any) -> None:
        """Before the interleaver reads ``task.asked`` (the value it waits for
        never came): what :meth:`_ask_for` would have left there, for a value
        :meth:`record` asked for (its hooks were in, its module's output is
        wanted, the forward was running).  "Its module had run before" is read
        now: had the module run since the ask, the value would have come."""
        if task.asked is not None:
            return
        task.asked = self._asked(interleaver, len(self.values))

    def _may_record(self, interleaver: Any, task: Any) -> bool:
        """May :meth:`record` take values?  Checked again only after any body
        has run (``interleaver.turns``): nothing else changes what is checked
        here.  It needs every hook in (``collect`` added them ahead), only
        outputs to ask for (an input needs ``prepare_skip``), the whole batch
        (a view of rows is an event's), no other body that might go on
        (blocked) and nothing else that watches values (caches, call counting)."""
        if (
            self.early is None or "input" in self.kinds or task.rows is not None
            or interleaver.hooked_calls_running or interleaver.blocked or _ordinary_only(interleaver)
        ):
            return False
        self.turn = interleaver.turns
        return True

    def _may_ask(self, interleaver: Any, index: int) -> bool:
        """May the batch ask for value ``index`` now (not past its end, its
        list unchanged, nothing in the trace that the ordinary path must see)?"""
        live = self.live
        if live is not None and (len(live) <= index or live[index] is not self.items[index]):
            return False  # the list changed under the loop: the body iterates it itself
        if index == len(self.keys):
            return False  # complete
        return not _ordinary_only(interleaver)

    def _ask_for(self, interleaver: Any, task: Any, index: int) -> None:
        """What the body's own read of value ``index`` does before it waits:
        the hooks, and what a message needs should the value never come."""
        envoy = self.envoys[index]
        kind = self.kinds[index]
        key = self.keys[index]
        if kind == "input":
            # As `_read` does before asking (nothing to do for a module whose
            # event is being served: ``ask`` takes such a value at once).
            self.run.prepare_skip(envoy._module)
        if key not in interleaver.hooks:
            interleaver.hook(envoy._module, kind, envoy)  # as `request` does: the envoy remembers its hook plan
        task.asked = self._asked(interleaver, index)

    def _asked(self, interleaver: Any, index: int) -> tuple:
        """``task.asked`` for value ``index``, asked for now (see ``Task.asked``)."""
        key = self.keys[index]
        frame = self.frame if self.lines is None else _Line(self.frame.f_back.f_code, self.lines[index])
        # "Its module had run before": only what a hook installed at this read would have seen.
        return (self.envoys[index], self.kinds[index], frame, key in interleaver.fired and key not in (self.early or ()),
                not (interleaver.forward_running or interleaver.forward_done))

    def advance(self, interleaver: Any, event: Any, task: Any) -> bool:
        """``event`` serves the value ``task`` waited for (``Interleaver._resume``
        has unwaited it): record it and ask for the next.  True if the task
        waits again; False if it must run now (the batch is complete, or the
        rest goes the ordinary way)."""
        try:
            # `view`, whose first case (the whole batch) is the common one
            value = event.value if task.rows is None else interleaver.view(event, task)
            if self.accessors[len(self.values)] == "input":
                value = _first_input(value)
            kind = type(value)
            if kind is not torch.Tensor and kind is not tuple:
                return False
            self.values.append(value)
            return self.ask(interleaver, event, task)
        except Exception:  # noqa: BLE001 - the body then asks itself, and gets the error there
            return False

    def ask(self, interleaver: Any, event: Any, task: Any) -> bool:
        """Ask for the next values as the body would: served at once when
        ``event`` is theirs; else wait (True).  False: run the body now."""
        values = self.values
        while True:
            index = len(values)
            if not self._may_ask(interleaver, index):
                return False
            key = self.keys[index]
            if event is not None and event.key == key:
                event.served.add(task.index)
                value = event.value if task.rows is None else interleaver.view(event, task)
                if self.accessors[index] == "input":
                    value = _first_input(value)
                if type(value) is not torch.Tensor and type(value) is not tuple:
                    return False
                values.append(value)
                continue
            self._ask_for(interleaver, task, index)
            interleaver.wait(task, key)
            return True

    def collect(self, interleaver: Any, task: Any) -> list:
        """Run the batch from the body: ask, wait if needed (one switch),
        and return the values recorded (a prefix of the items, maybe all)."""
        task.batch = self
        try:
            if len(self.keys) > 1 and self._may_ask(interleaver, 0):
                # Every hook the reads will need, in one go rather than one at
                # each read (as the body's reads would, each at its turn).  A
                # hook on a module ahead of the forward's position fires the same
                # either way; on one the forward has passed, it stays silent.
                hooks = interleaver.hooks
                self.early = {key for key in self.keys if key not in hooks}
                interleaver.hook_ahead(self.modules, self.kinds, self.envoys)
            if self.ask(interleaver, interleaver.current, task):
                interleaver.main.switch()
        finally:
            task.batch = None
            # The frame that made the batch holds the values (and any error,
            # whose traceback holds this frame): dropped, no cycle is left.
            self.frame = None
        return self.values


class _Line:
    """Stands in for the body's frame at one statement of a run, in messages
    about a value that never came (``_frames.describe_frame`` reads these)."""

    __slots__ = ("f_code", "f_lineno", "f_back")

    def __init__(self, code: Any, lineno: int) -> None:
        self.f_code = code
        self.f_lineno = lineno
        self.f_back = None


class _Values(list):
    """A run's values, last first; each assignment calls it for its own; an
    error in it is raised by the call of the statement it belongs to (at its line)."""

    __slots__ = ()

    def __call__(self) -> Any:
        value = self.pop()
        if type(value) is _Raise:
            try:
                raise value.error
            finally:
                del value  # this frame, in the error's traceback, must not hold it
        return value


class _Raise:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        # The traceback from where the error reached the frame that caught it
        # on: that frame, which holds what holds this, is left out (no cycle).
        traceback = error.__traceback__
        self.error = error.with_traceback(traceback.tb_next if traceback is not None else None)


def _interleaver(task: Any) -> Any:
    """The running trace's interleaver, if ``task`` may batch now (else None)."""
    run = task.run
    if run is None or not task.is_invoke or task.batch is not None:
        return None
    interleaver = run.interleaver
    return None if _ordinary_only(interleaver) else interleaver


def _ordinary_only(interleaver: Any) -> bool:
    """Must every value of the trace go the ordinary way now?  The forward
    is over (or the trace closing), a ``tracer.cache`` records values, or a
    ``tracer.iter`` loop counts calls: none of these a batch does."""
    return bool(interleaver.closing or interleaver.forward_done or interleaver.caches or interleaver.count_calls)


def _batching_task(invokes_allowed: bool) -> Any:
    """The running task, if it may batch now (else None); a run of
    assignments or appends only in a body without invokes (``invokes_allowed``
    False), where no other invoke reads names or lists as they fill."""
    current = _getcurrent()
    if type(current) is not TaskGreenlet:
        return None
    task = current.task
    if _interleaver(task) is None or (not invokes_allowed and task.run.flow is not None):
        return None
    return task


_FROM_ITEM = object()  # a chain that starts at the loop's variable (see `_envoys_along`)


def _envoys_along(items: Any, start: Any, steps: tuple) -> list | None:
    """The envoy each item leads to from ``start`` (``_FROM_ITEM``: from the
    item itself), or None where one of them is not plain."""
    if start is not _FROM_ITEM:
        return _walk(start, steps, items)
    envoys = []
    for item in items:
        found = _walk(item, steps, (item,))
        if found is None:
            return None
        envoys.append(found[0])
    return envoys


def _collect_into(values: "_Values", batch: "Batch", task: Any, save: Callable[[Any], Any]) -> None:
    """Run ``batch`` and put its values into ``values``, last first; a value
    that never came (the forward ended) leaves the error after the earlier
    values, raised by the call that takes it."""
    error = None
    try:
        recorded = batch.collect(task.run.interleaver, task)
    except MissedProviderError as missed:
        recorded, error = batch.values, missed
    values.extend(_saved(recorded, task.run, save))
    if error is not None:
        values.append(_Raise(error))
    values.reverse()


def _items_of(iterable: Any) -> tuple[Any, list | None]:
    """``(items, live)``: the items a batch may iterate ahead of the body (a
    range, tuple, list or module list's envoys; None for anything else, which
    the body then iterates itself), and the list itself when it is one (it may
    change while the body runs, see ``Batch``)."""
    kind = type(iterable)
    if kind is range or kind is tuple:
        return iterable, None
    if kind is list:
        return tuple(iterable), iterable
    children = getattr(kind, "_plain_children", None)  # a module list's envoys (contract.PlainNavigation)
    return (children(iterable) if children is not None else None), None


def prefetch(site: tuple, iterable: Any, root: Callable[[], Any] | None, save: Callable[[Any], Any],
             fallback: Callable[[Any], list]) -> list:
    """``[<chain>.<accessor>.save() for item in iterable]`` (see the module
    docs): ``root()`` gives the chain's first name (None: it is the loop's
    variable); ``fallback(items)`` is the comprehension as written, over ``items``."""
    task = _batching_task(invokes_allowed=True)
    if task is None:
        return fallback(iterable)
    items, live = _items_of(iterable)
    if not items:
        return fallback(iterable)
    steps, kind_name, accessor, _ = site
    envoys = _envoys_along(items, root() if root is not None else _FROM_ITEM, steps)
    if envoys is None:
        return fallback(iterable)
    n = len(envoys)
    run = task.run
    batch = Batch(run, envoys, (kind_name,) * n, (accessor,) * n, sys._getframe(), items if live is not None else (), live)
    values = batch.collect(run.interleaver, task)
    out = _saved(values, run, save)
    done = len(values)
    if live is not None:
        if done == len(live) and done == n:
            return out
        return out + fallback(_rest_of(live, done))
    # The ordinary way for the rest, in the body (errors name the user's line).
    for index in range(done, n):
        out.append(save(getattr(envoys[index], accessor)))
    return out


def prefetch_run(site: tuple, roots: Callable[[], tuple], save: Callable[[Any], Any]) -> list:
    """The values of a run of ``NAME = <chain>.<accessor>.save()`` statements
    (see the module docs), last first (the assignments take them in order);
    as many as were recorded: the statements without a value run as written.
    Only in a body whose names no other invoke reads while it runs (no
    invokes): elsewhere an assignment delayed until the run ends could be seen late."""
    task = _batching_task(invokes_allowed=False)
    if task is None:
        return []
    try:
        starts = roots()
    except NameError:
        return []  # the statement that reads it raises, as written
    envoys = []
    for index, steps, _, _, _ in site:
        found = _walk(starts[index], steps, (None,))
        if found is None:
            return []
        envoys.append(found[0])
    batch = Batch(task.run, envoys, tuple(entry[2] for entry in site), tuple(entry[3] for entry in site),
                  sys._getframe(), lines=tuple(entry[4] for entry in site))
    # A value that never came: the statements before it assign theirs, and
    # its own raises the error, as they would have as written.
    out = _Values()
    _collect_into(out, batch, task, save)
    return out


class _Loop(_Values):
    """What a ``for`` loop of appends iterates (``prefetch_loop``): the loop's
    items, as its own iterable gives them; the list itself holds the values
    recorded for the first items, last first; each append calls it for its
    own (an error in it is raised by the call of the item it belongs to)."""

    __slots__ = ("items",)

    def __iter__(self) -> Any:
        return self.items


def _plain_loop(iterable: Any) -> _Loop:
    loop = _Loop()
    loop.items = iter(iterable)
    return loop


def prefetch_loop(site: tuple, iterable: Any, root: Callable[[], Any] | None, save: Callable[[Any], Any]) -> _Loop:
    """``for item in iterable: some_list.append(<chain>.<accessor>.save())``
    (see the module docs): the loop iterates what this returns.  Only in a
    body without invokes (another invoke could see the list fill late)."""
    task = _batching_task(invokes_allowed=False)
    if task is None:
        return _plain_loop(iterable)
    items, live = _items_of(iterable)
    if not items:
        return _plain_loop(iterable)
    steps, kind_name, accessor, line = site
    try:
        start = root() if root is not None else _FROM_ITEM
    except NameError:
        return _plain_loop(iterable)  # the append that reads it raises, as written
    envoys = _envoys_along(items, start, steps)
    if envoys is None:
        return _plain_loop(iterable)
    n = len(envoys)
    batch = Batch(task.run, envoys, (kind_name,) * n, (accessor,) * n, sys._getframe(),
                  items if live is not None else (), live, (line,) * n)
    loop = _Loop()  # a value that never came: raised at the append of the item it belongs to
    _collect_into(loop, batch, task, save)
    if live is None:
        loop.items = iter(items)
    else:
        done = len(loop)  # the values recorded, and the error, if any
        loop.items = itertools.chain(items[:done], _rest_of(live, done))
    return loop


def _saved(values: list, run: Any, save: Callable[[Any], Any]) -> list:
    """``[save(v) for v in values]``, each value handed over as ``_read`` hands
    it (``run.present``).  A tensor saved by seethrough's own ``save_method``
    is added to the run's saves directly (what that function does for one)."""
    out = []
    add = run.saves.add if save is save_method else None
    for value in values:
        if type(value) is torch.Tensor:
            out.append(add(value) if add is not None else save(value))
        else:
            out.append(save(run.present(value)))
    return out


def _rest_of(live: list, start: int) -> Any:
    """The rest of a list iteration from ``start``, as a list iterator gives it (lazily)."""
    index = start
    while index < len(live):
        yield live[index]
        index += 1
