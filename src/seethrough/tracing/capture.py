"""Capture the body of a ``with`` block as code seethrough can run itself.

``with model.trace(x): ...`` cannot run its body line by line against a
forward pass that has not started yet, and the body of a remote trace has to
travel as source text.  So when a tracer is entered, we find the ``with``
statement in the caller's source (files, IPython cells, ``python -c``),
compile its body as a module-level code object that keeps the user's file name
and line numbers (so tracebacks and debuggers show the user's lines), and note
which names it assigns and reads.

One rewrite is made on the way: ``X.save()`` with no arguments becomes a call
of :func:`~.runtime.save_method` (bound in every body namespace under
:data:`~.runtime.SAVE_METHOD`), so that ``.save()`` works on any value in a
body (``[].save()``, ``x.shape[-1].save()``, model outputs) without patching
builtins; values whose class has a ``save`` of its own keep it (see
``save_method``).  Calls with arguments (``obj.save(path)``) are left alone.

Captures are cached per (code object, instruction offset): a trace inside a
loop or a function called many times is parsed and compiled once.  Code from
elsewhere (a remote request) can be rewritten before compiling
(:func:`code_transform`) and forgotten afterwards (:func:`forget`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dis
import linecache
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Callable, Iterator

from ..errors import TraceSourceError
from .prefetch import rewrite_prefetch
from .runtime import SAVE_METHOD
from .save_reach import NO_CALLS, SaveReach, analyse_reach

_BEFORE_WITH = dis.opmap.get("BEFORE_WITH")


@dataclass(frozen=True)
class CapturedBlock:
    """The body of one ``with`` statement, ready to run."""

    filename: str
    with_lineno: int
    code: CodeType
    body_source: str  # dedented source text of the body (what a remote run sends)
    body_first_line: int  # line number of the body's first line in ``filename``
    as_name: str | None  # ``with ... as NAME`` target, when it is a plain name
    stored: frozenset[str]  # names the body binds at its own (module-level) scope
    loaded: frozenset[str]  # names the body (or functions defined in it) reads
    attributes: frozenset[str] = field(default=frozenset())  # attribute names used
    defines_scopes: bool = False  # defines functions/classes/lambdas/generators (they keep its namespace)
    rewrote_saves: bool = False  # has argument-less `X.save()` calls (compiled as seethrough's save)
    assigned_lines: dict[str, int] = field(default_factory=dict)  # name -> line of its last plain assignment
    as_names: tuple[str, ...] = ()  # ``with model.edit() as (tracer, edited)``: the two names
    reach: SaveReach = NO_CALLS  # the code the body may call (does a run need Tensor.save? see .save_reach)

    # What the body may need from a run, decided once from its text.
    @property
    def uses_invoke(self) -> bool:
        return "invoke" in self.attributes

    @property
    def uses_skip(self) -> bool:
        return "skip" in self.attributes

    @property
    def uses_steps(self) -> bool:
        return not self.attributes.isdisjoint(("iter", "all", "next"))


_cache: dict[tuple[CodeType, int], CapturedBlock] = {}
_parse_cache: dict[str, tuple[str, ast.Module]] = {}
_CACHE_LIMIT = 2048
# Held while parsing or compiling user code anywhere in seethrough (see
# capture_with_block for why).
PARSE_LOCK = threading.RLock()
# Rewrites of the code of some files before it is compiled, by file-name
# prefix: a remote body's nested blocks are compiled the way the body was.
_transforms: dict[str, Callable[[ast.Module], ast.Module]] = {}


@contextlib.contextmanager
def code_transform(prefix: str, transform: Callable[[ast.Module], ast.Module]) -> Iterator[None]:
    """While open, blocks of files named ``prefix...`` compile ``transform(tree)``."""
    with PARSE_LOCK:
        _transforms[prefix] = transform
    try:
        yield
    finally:
        with PARSE_LOCK:
            if _transforms.get(prefix) is transform:
                del _transforms[prefix]


def forget(prefix: str) -> None:
    """Drop the cached captures, parses and source lines of files named ``prefix...``."""
    with PARSE_LOCK:
        for key in [key for key in _cache if key[0].co_filename.startswith(prefix)]:
            del _cache[key]
        for name in [name for name in _parse_cache if name.startswith(prefix)]:
            del _parse_cache[name]
        for name in [name for name in list(linecache.cache) if isinstance(name, str) and name.startswith(prefix)]:
            linecache.cache.pop(name, None)


def _compile(module: ast.Module, filename: str) -> CodeType:
    for prefix, transform in _transforms.items():
        if filename.startswith(prefix):
            module = transform(module)
            break
    return compile(module, filename, "exec", dont_inherit=True)


def capture_with_block(frame: FrameType, what: str = "model.trace(...)") -> CapturedBlock:
    """Find and compile the body of the ``with`` statement ``frame`` is entering."""
    key = (frame.f_code, frame.f_lasti)
    found = _cache.get(key)
    if found is not None:
        return found
    # CPython's AST conversion keeps interpreter-wide state that concurrent
    # parses from two threads can corrupt ("AST constructor recursion depth
    # mismatch"): parse one block at a time.
    with PARSE_LOCK:
        found = _cache.get(key)
        if found is None:
            found = _capture(frame, what)
            if len(_cache) >= _CACHE_LIMIT:
                _cache.clear()
            _cache[key] = found
    return found


def capture_source_block(source: str, filename: str, what: str = "trace") -> CapturedBlock:
    """Compile a body given as source text (a remote request, or a test).

    The text is registered in :mod:`linecache` under ``filename`` so that
    tracebacks, and ``with tracer.invoke(...)`` blocks nested in it, can be
    found again the same way as in a file."""
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)
    with PARSE_LOCK:
        tree = _parse(source, filename)
        return _build(tree.body, filename, 1, 1, None, lines, what)


def _source_lines(frame: FrameType) -> list[str]:
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if lines:
        return lines
    if filename == "<string>":
        # `python -c "..."`: the code is on the command line, not in a file.
        argv = getattr(sys, "orig_argv", [])
        if "-c" in argv:
            index = argv.index("-c")
            if index + 1 < len(argv):
                return argv[index + 1].splitlines(keepends=True)
    return []


def _parse(text: str, filename: str) -> ast.Module:
    cached = _parse_cache.get(filename)
    if cached is not None and cached[0] == text:
        return cached[1]
    tree = ast.parse(text, filename)
    if len(_parse_cache) >= 64:
        _parse_cache.clear()
    _parse_cache[filename] = (text, tree)
    return tree


def _capture(frame: FrameType, what: str) -> CapturedBlock:
    filename = frame.f_code.co_filename
    lines = _source_lines(frame)
    if not lines:
        raise TraceSourceError(
            f"seethrough could not find the source of the `with {what}` block in {filename!r} "
            f"(line {frame.f_lineno}). A trace body is read from its source, which the plain "
            "Python prompt, and a script piped on standard input (`python - < script.py`), do not "
            "keep. Run the code from a file (`python script.py`), a notebook, IPython or "
            "`python -c`, or put it in a function defined in a file."
        )
    try:
        tree = _parse("".join(lines), filename)
    except SyntaxError as err:  # the file changed on disk since it was imported
        raise TraceSourceError(
            f"the source of {filename!r} no longer parses ({err.msg}, line {err.lineno}); "
            "it may have changed since it was loaded. Re-run it."
        ) from None
    node, item_index = _find_with(tree, frame)
    if node is None:
        raise TraceSourceError(
            f"seethrough could not find the `with {what}` statement at {filename}:"
            f"{frame.f_lineno} in its source; the file may have changed since it was "
            "loaded. Re-run it."
        )
    if item_index != len(node.items) - 1:
        raise TraceSourceError(
            f"`{what}` must be the last context manager of its `with` statement "
            f"({filename}:{node.lineno}); put it in a `with` statement of its own."
        )
    target = node.items[item_index].optional_vars
    as_names: tuple[str, ...] = ()
    if (
        what == "model.edit()" and isinstance(target, (ast.Tuple, ast.List)) and len(target.elts) == 2
        and all(isinstance(e, ast.Name) for e in target.elts)
    ):
        as_names = tuple(e.id for e in target.elts)  # nnsight 0.8: `as (tracer, edited)`
    elif target is not None and not isinstance(target, ast.Name):
        form = " (or, for `model.edit()`, two: `as (tracer, edited)`)" if what == "model.edit()" else ""
        raise TraceSourceError(
            f"`with {what} as ...` must bind a plain name{form} ({filename}:{node.lineno})."
        )
    as_name = target.id if isinstance(target, ast.Name) else None
    return _build(node.body, filename, node.lineno, node.body[0].lineno, as_name, lines, what, as_names)


def _find_with(tree: ast.Module, frame: FrameType) -> tuple[ast.With | None, int]:
    """The ``with`` node whose ``__enter__`` is being called, and the item index."""
    code = frame.f_code
    lasti = frame.f_lasti
    positions = list(code.co_positions())
    line, _end, col, _end_col = positions[lasti // 2]
    # 3.11/3.12 give BEFORE_WITH the span of the whole statement; 3.13 that of
    # the item's context expression.  Accept both.
    for node in ast.walk(tree):
        if not isinstance(node, (ast.With, ast.AsyncWith)):
            continue
        if (node.lineno, node.col_offset) == (line, col):
            return node, _item_index_by_bytecode(code, lasti, positions[lasti // 2], len(node.items))
        for index, item in enumerate(node.items):
            expr = item.context_expr
            if (expr.lineno, expr.col_offset) == (line, col):
                return node, index
    return None, -1


def _item_index_by_bytecode(code: CodeType, lasti: int, position: tuple, n_items: int) -> int:
    if n_items == 1:
        return 0
    offsets = [
        ins.offset
        for ins in dis.get_instructions(code)
        if ins.opcode == _BEFORE_WITH and ins.positions is not None
        and (ins.positions.lineno, ins.positions.col_offset) == (position[0], position[2])
    ]
    return offsets.index(lasti) if lasti in offsets else n_items - 1


def _build(
    body: list[ast.stmt],
    filename: str,
    with_lineno: int,
    first_line: int,
    as_name: str | None,
    lines: list[str],
    what: str,
    as_names: tuple[str, ...] = (),
) -> CapturedBlock:
    _reject_control_flow(body, filename, what)
    rewritten = _rewrite_saves(body)
    prefetching = rewrite_prefetch(rewritten) if rewritten is not body else rewritten  # runs of saves (.prefetch)
    module = ast.Module(body=_rewrite_returns(prefetching, filename, what), type_ignores=[])
    try:
        code = _compile(module, filename)
    except SyntaxError as err:
        raise TraceSourceError(
            f"the body of `with {what}` at {filename}:{with_lineno} cannot run as a trace "
            f"body: {err.msg} (line {err.lineno})."
        ) from None
    names = _NameCollector()
    for stmt in body:
        names.visit(stmt)
    return CapturedBlock(
        filename=filename,
        with_lineno=with_lineno,
        code=code,
        body_source=_body_text(body, lines),
        body_first_line=first_line,
        as_name=as_name,
        stored=frozenset(names.stored),
        loaded=frozenset(names.loaded),
        attributes=frozenset(names.attributes),
        defines_scopes=names.defines_scopes,
        rewrote_saves=rewritten is not body,
        assigned_lines=names.lines,
        as_names=as_names,
        reach=analyse_reach(body, _is_save_call),
    )


def _is_save_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "save"
        and not node.args
        and not node.keywords
    )


class _SaveCalls(ast.NodeTransformer):
    """``X.save()`` -> ``SAVE_METHOD(X)`` (same positions, for tracebacks)."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if not _is_save_call(node):
            return node
        func = ast.copy_location(ast.Name(id=SAVE_METHOD, ctx=ast.Load()), node.func)
        return ast.copy_location(ast.Call(func=func, args=[node.func.value], keywords=[]), node)


def _rewrite_saves(body: list[ast.stmt]) -> list[ast.stmt]:
    """The body with every argument-less ``.save()`` call rewritten; the
    parsed tree itself (cached, shared with other captures) is not touched."""
    if not any(_is_save_call(node) for stmt in body for node in ast.walk(stmt)):
        return body
    return [_SaveCalls().visit(copy.deepcopy(stmt)) for stmt in body]


def _body_text(body: list[ast.stmt], lines: list[str]) -> str:
    first, last = body[0], body[-1]
    end = last.end_lineno or last.lineno
    chunk = lines[first.lineno - 1 : end]
    if not chunk:
        return ""
    # A body on the same line as its `with` starts mid-line.
    chunk[0] = " " * first.col_offset + chunk[0][first.col_offset :]
    return textwrap.dedent("".join(chunk))


RETURN_REACHED = "__seethrough_return__"  # bound to TraceSourceError in every body namespace (.namespace)
_RETURN_HINT = "`return` inside the block: assign the value to a name and return it after the block"
_CONTROL_HINT = {
    ast.Yield: "`yield` inside the block: collect the values and yield them after the block",
    ast.YieldFrom: "`yield from` inside the block: move it after the block",
    ast.Await: "`await` inside the block: await after the block",
}
_NEW_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)


class _Returns(ast.NodeTransformer):
    """``return`` in a body (not in a function it defines) -> raising
    :class:`TraceSourceError` when reached: a body runs as a unit and cannot
    return from the function around the ``with``.  Only a ``return`` the body
    actually reaches is an error (nnterp's tests keep one on a branch never
    taken), and it says so with the line and the fix."""

    def __init__(self, filename: str, what: str) -> None:
        self.filename = filename
        self.what = what

    def visit_Return(self, node: ast.Return) -> ast.AST:
        message = f"{self.filename}:{node.lineno}: {_RETURN_HINT}. A `with {self.what}` body runs as a unit."
        call = ast.Call(func=ast.Name(id=RETURN_REACHED, ctx=ast.Load()), args=[ast.Constant(message)], keywords=[])
        raised = ast.copy_location(ast.Raise(exc=call, cause=None), node)
        for part in ast.walk(raised):  # the new nodes take the `return`'s position
            ast.copy_location(part, node)
        return raised

    def _scope(self, node: ast.AST) -> ast.AST:
        return node  # a function, lambda or class of the body: its returns are its own

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _scope


def _rewrite_returns(body: list[ast.stmt], filename: str, what: str) -> list[ast.stmt]:
    if not any(isinstance(node, ast.Return) for stmt in body for node in ast.walk(stmt)):
        return body
    return [_Returns(filename, what).visit(copy.deepcopy(stmt)) for stmt in body]


def _reject_control_flow(body: list[ast.stmt], filename: str, what: str) -> None:
    """Statements that act on the enclosing function or loop cannot run in a
    captured body; say so with the line and the fix (instead of the bare
    SyntaxError that compiling would give)."""

    def check(nodes: list[ast.AST], in_loop: bool) -> None:
        for node in nodes:
            if isinstance(node, _NEW_SCOPES):
                continue  # their own scope: return/yield there are fine
            hint = _CONTROL_HINT.get(type(node))
            if hint is not None:
                raise TraceSourceError(
                    f"{filename}:{node.lineno}: {hint}. A `with {what}` body runs as a unit."
                )
            if isinstance(node, (ast.Break, ast.Continue)) and not in_loop:
                raise TraceSourceError(
                    f"{filename}:{node.lineno}: `break`/`continue` that leaves a `with {what}` "
                    "block is not supported: set a flag inside the block and act on it after it."
                )
            if isinstance(node, _LOOPS):
                check(node.body, True)
                check(node.orelse, in_loop)
                check([n for n in ast.iter_child_nodes(node) if n not in node.body and n not in node.orelse], in_loop)
            else:
                check(list(ast.iter_child_nodes(node)), in_loop)

    check(list(body), False)


class _NameCollector(ast.NodeVisitor):
    """Names bound at the body's own scope, and every name read anywhere in it."""

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.lines: dict[str, int] = {}  # where each stored name was last assigned, in source order
        self.loaded: set[str] = set()
        self.attributes: set[str] = set()
        self._depth = 0  # > 0 inside nested function/class/comprehension scopes
        self._function_depth = 0  # > 0 inside nested function/class scopes
        self.defines_scopes = False

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loaded.add(node.id)
        elif self._depth == 0:
            self.stored.add(node.id)
            self.lines[node.id] = node.lineno

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.add(node.attr)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        # A walrus binds in the nearest enclosing function scope; inside plain
        # comprehensions of the body that is the body's own scope.
        if isinstance(node.target, ast.Name) and self._function_depth == 0:
            self.stored.add(node.target.id)
            self.lines[node.target.id] = node.lineno
        self.visit(node.value)

    def _scoped(self, node: ast.AST, name: str | None, is_function: bool) -> None:
        if is_function or isinstance(node, ast.GeneratorExp):
            self.defines_scopes = True
        if name is not None and self._depth == 0:
            self.stored.add(name)
        self._depth += 1
        if is_function:
            self._function_depth += 1
        for child in ast.iter_child_nodes(node):
            self.visit(child)
        self._depth -= 1
        if is_function:
            self._function_depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._scoped(node, node.name, True)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, node.name, True)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scoped(node, None, True)

    def _comprehension(self, node: ast.AST) -> None:
        self._scoped(node, None, False)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import) -> None:
        if self._depth == 0:
            for alias in node.names:
                self.stored.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if self._depth == 0:
            for alias in node.names:
                self.stored.add(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name and self._depth == 0:
            self.stored.add(node.name)
        self.generic_visit(node)
