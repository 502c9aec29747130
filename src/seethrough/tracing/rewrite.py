"""Name every call site of a function and compile a copy that reports them.

``.source`` needs two things from a forward method: a stable name for each
call inside its body, and a version of the function whose calls can be
watched.  This module gives both, and nothing else (no tracing state):

* :func:`analyse` parses the function from its file and names its
  operations the way nnsight 0.8 does, so ported code finds the same ones.
  An operation is a call or an assignment, numbered in the order they run:
  a call after its callee and arguments (inner calls first), an assignment
  after its value and its target's subscripts.  A call is named by its
  callee's attribute chain joined with ``_``, subscripts skipped
  (``self.c_proj(x)`` -> ``self_c_proj``, ``self.layers[0](x)`` ->
  ``self_layers``; a chain that does not start at a plain name keeps only
  its attribute names: ``f(x).split(...)`` -> ``split``, and one with none
  is ``call``).  An assignment to one target is named by the target the
  same way (``h = ...`` -> ``h``, ``self.cache = ...`` -> ``self_cache``,
  ``g[0] = ...`` -> ``g``); ``a, b = x, y`` names each element's binding,
  while ``a, b = f()``, ``a = b = v``, ``x += v`` and bare annotations are
  not operations.  Calls and assignments share one counter per name:
  ``_N`` counts the earlier operations of that name from 0.
* :meth:`Analysis.build` makes a new function object from the rewritten code
  in which ``callee(a, *b, k=c)`` reads ``__st_op__(N, callee, a, *b, k=c)``
  and ``t = v`` reads ``t = __st_op__(N, __st_bind__, v)`` (``__st_bind__``
  returns its argument): the callee and the arguments are evaluated exactly
  as before, in the same order, and ``__st_op__`` decides when the call
  happens whether to just make it or to report it (so an operation asked for
  while its arguments were being computed is still seen).  The copy keeps the original's globals, defaults and closure
  cells (so ``super()`` and closed-over names work) and its file and line
  numbers (so tracebacks point at the real source).

Decorators are kept: :func:`unwrap_chain` follows ``__wrapped__`` to the
function that holds the body, and :func:`rewrap` rebuilds each wrapper
around the instrumented copy by swapping the closure cell that held the
original.  A wrapper that does not hold what it wraps in a cell cannot be
rebuilt, and says so.
"""

from __future__ import annotations

import ast
import copy
import functools
import linecache
import types
from typing import Any, Callable

from ..errors import SourceError

OP = "__st_op__"  # the name the rewritten code calls; a closure cell, never a global
BIND = "__st_bind__"  # the callee of an assignment's operation: returns the value bound


def bind(value: Any) -> Any:
    """What an assignment's operation calls: the value being bound, unchanged."""
    return value
_SHELL = "__seethrough_shell__"


class Site:
    """One operation: its name, where it is, and whether it is an assignment."""

    __slots__ = ("name", "index", "lineno", "end_lineno", "assignment")

    def __init__(self, name: str, index: int, lineno: int, end_lineno: int, assignment: bool = False) -> None:
        self.name = name
        self.index = index
        self.lineno = lineno
        self.end_lineno = end_lineno
        self.assignment = assignment


class Analysis:
    """The named call sites of one function, and its instrumented code."""

    def __init__(self, fn: types.FunctionType, node: ast.FunctionDef | ast.AsyncFunctionDef, filename: str) -> None:
        self.qualname = fn.__qualname__
        self.filename = filename
        self.def_lineno = node.lineno
        self.first_lineno = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        self.end_lineno = node.end_lineno or node.lineno
        body_start = node.body[0].lineno if node.body else node.lineno
        self.header_end = max(node.lineno, body_start - 1)
        self.sites: list[Site] = []
        self.by_name: dict[str, Site] = {}
        rewritten = _Rewriter(self).visit(_bare_def(node))
        self.code = _compile_shell(rewritten, fn.__code__.co_freevars, filename)

    def build(self, fn: types.FunctionType, dispatch: Callable[..., Any]) -> types.FunctionType:
        """A copy of ``fn`` running the rewritten body, its calls going through ``dispatch``."""
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        cells[OP] = types.CellType(dispatch)
        cells[BIND] = types.CellType(bind)
        try:
            closure = tuple(cells[name] for name in self.code.co_freevars)
        except KeyError as missing:  # pragma: no cover - the body names what the original named
            raise SourceError(f"cannot rebuild `{self.qualname}`: no closure cell for {missing}.") from None
        new = types.FunctionType(self.code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
        new.__qualname__ = fn.__qualname__
        new.__module__ = fn.__module__
        new.__doc__ = fn.__doc__
        return new

    # -- showing it ---------------------------------------------------------------
    def lines(self) -> list[tuple[int, str]]:
        """``(line number, text)`` of the function, decorators included."""
        return [
            (n, linecache.getline(self.filename, n).rstrip("\n"))
            for n in range(self.first_lineno, self.end_lineno + 1)
        ]

    def listing(self, title: str) -> str:
        """The source with each operation's name in front of its line (the first
        of a line's operations; the others follow it, in the order they run)."""
        raw = self.lines()
        indent = _common_indent([text for _, text in raw])
        names: dict[int, list[str]] = {}
        for site in self.sites:
            names.setdefault(site.lineno, []).append(site.name)
        width = max((len(s.name) for s in self.sites), default=0)
        rows = [title]
        counter = 0
        for lineno, text in raw:
            text = text[indent:]
            if lineno <= self.header_end:
                mark = "*" if lineno == self.def_lineno else " "
                rows.append(f"{'':{width}}     {mark:>4}  {text}")
                continue
            here = names.get(lineno, [])
            label = f"{here[0]:{width}} -> " if here else f"{'':{width}}    "
            rows.append(f"{label} {counter:>4}  {text}")
            for extra in here[1:]:  # the later operations of this line, in the order they run
                rows.append(f"{extra:{width}} ->  {'':>4}  ⋮")
            counter += 1
        return "\n".join(rows)

    def context(self, site: Site, title: str, around: int = 3) -> str:
        """The lines around one call site, the site marked."""
        raw = self.lines()
        indent = _common_indent([text for _, text in raw])
        rows = [title]
        for lineno, text in raw:
            if site.lineno - around <= lineno <= site.end_lineno + around:
                inside = site.lineno <= lineno <= site.end_lineno
                rows.append(f"{'-->' if inside else '   '} {text[indent:]}")
        return "\n".join(rows)


class _Rewriter(ast.NodeTransformer):
    """Names call sites (children first, fields in source order) and routes
    each call's callee through ``__st_op__``."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.counts: dict[str, int] = {}
        self.top: ast.AST | None = None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        if self.top is None:  # the function itself: rewrite its body only
            self.top = node
            node.body = [self.visit(statement) for statement in node.body]
            return node
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _name(self, base: str, node: ast.AST, assignment: bool = False) -> Site:
        number = self.counts.get(base, 0)
        self.counts[base] = number + 1
        name = f"{base}_{number}"
        site = Site(name, len(self.analysis.sites), node.lineno, node.end_lineno or node.lineno, assignment)
        self.analysis.sites.append(site)
        self.analysis.by_name[name] = site
        return site

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not (node.args or node.keywords):
            return node  # zero-argument super() reads its caller's frame: leave it alone
        self.generic_visit(node)
        base = dotted_name(node.func)[0] or "call"
        site = self._name(base, node)
        if base in _FRAME_SENSITIVE and isinstance(node.func, ast.Name):
            return node  # they read the frame that calls them: named, but never routed
        routed = ast.Call(
            func=ast.Name(id=OP, ctx=ast.Load()),
            args=[ast.Constant(site.index), node.func, *node.args],
            keywords=node.keywords,
        )
        ast.copy_location(routed, node)
        ast.fix_missing_locations(routed)
        return routed

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        # The value runs before the targets' own expressions (`x[f(i)] = g()` runs g, then f).
        node.value = self.visit(node.value)
        node.targets = [self.visit(target) for target in node.targets]
        if len(node.targets) == 1:  # `a = b = v` is not an operation
            node.value = self._bound(node.targets[0], node.value, node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:  # a bare annotation binds nothing
            node.value = self._bound(node.target, self.visit(node.value), node)
        return node

    def _bound(self, target: ast.expr, value: ast.expr, node: ast.AST) -> ast.expr:
        """``value`` routed through ``__st_bind__`` as the operation named after ``target``."""
        if isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(target.elts) == len(value.elts):
                if not any(isinstance(e, ast.Starred) for e in (*target.elts, *value.elts)):
                    value.elts = [self._bound(t, v, node) for t, v in zip(target.elts, value.elts)]
            return value  # `a, b = f()` unpacks one value: not an operation
        base, rooted = dotted_name(target)
        if not rooted:
            return value  # `f()[0] = v`: no name to give it
        site = self._name(base, node, assignment=True)
        routed = ast.Call(func=ast.Name(id=OP, ctx=ast.Load()), args=[ast.Constant(site.index), ast.Name(id=BIND, ctx=ast.Load()), value], keywords=[])
        ast.copy_location(routed, value)
        ast.fix_missing_locations(routed)
        return routed


# Builtins that look at their caller's frame: a call through `__st_op__` would
# show them the wrong one.
_FRAME_SENSITIVE = frozenset({"locals", "vars", "globals", "dir", "eval", "exec"})


def dotted_name(expr: ast.expr) -> tuple[str, bool]:
    """The attribute chain of ``expr`` joined with ``_``, subscripts skipped,
    and whether it starts at a plain name: ``a.b[0].c`` -> ``("a_b_c", True)``;
    ``f(x).split`` -> ``("split", False)``; ``f(x)`` -> ``("", False)``."""
    parts: list[str] = []
    node = expr
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            parts.append(node.id)
            return "_".join(reversed(parts)), True
        else:
            return "_".join(reversed(parts)), False


def _bare_def(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.FunctionDef | ast.AsyncFunctionDef:
    bare = copy.deepcopy(node)
    bare.decorator_list = []  # rebuilt around the copy by `rewrap`, never re-run here
    bare.returns = None
    for arg in (*bare.args.posonlyargs, *bare.args.args, *bare.args.kwonlyargs, bare.args.vararg, bare.args.kwarg):
        if arg is not None:
            arg.annotation = None
    bare.args.defaults = []  # taken from the original function object
    bare.args.kw_defaults = [None] * len(bare.args.kw_defaults)
    return bare


def _compile_shell(node: ast.AST, freevars: tuple[str, ...], filename: str) -> types.CodeType:
    """Compile ``node`` inside a shell function whose parameters are the
    original's free variables and ``__st_op__``, so they are closure cells of
    the result; return the result's code object."""
    params = [ast.arg(arg=name) for name in (OP, BIND, *freevars)]
    shell = ast.FunctionDef(
        name=_SHELL,
        args=ast.arguments(posonlyargs=[], args=params, vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=[node, ast.Return(value=ast.Name(id=node.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        shell.type_params = []  # Python 3.12+
    module = ast.Module(body=[shell], type_ignores=[])
    ast.copy_location(shell, node)
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec", dont_inherit=True)
    shell_code = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == _SHELL)
    return next(c for c in shell_code.co_consts if isinstance(c, types.CodeType) and c.co_name == node.name)


def _common_indent(texts: list[str]) -> int:
    widths = [len(t) - len(t.lstrip()) for t in texts if t.strip()]
    return min(widths) if widths else 0


# -- finding and caching ----------------------------------------------------------

_ANALYSES: dict[types.CodeType, Analysis] = {}
_TREES: dict[str, tuple[int, ast.Module]] = {}


def analyse(fn: types.FunctionType, what: str) -> Analysis:
    """The (cached) analysis of ``fn``'s body; ``what`` names it in errors."""
    found = _ANALYSES.get(fn.__code__)
    if found is None:
        filename = fn.__code__.co_filename
        node = _find_def(fn, filename)
        if node is None:
            raise SourceError(
                f"{what}: the source of `{fn.__qualname__}` ({filename}) cannot be found, so its "
                "operations cannot be named. `.source` needs a function defined in a Python file "
                "(not in an interactive prompt, `exec`, or compiled code) that has not changed since "
                "it was imported."
            )
        found = Analysis(fn, node, filename)
        _ANALYSES[fn.__code__] = found
    return found


def _find_def(fn: types.FunctionType, filename: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    lines = linecache.getlines(filename, fn.__globals__)
    if not lines:
        return None
    cached = _TREES.get(filename)
    if cached is None or cached[0] != len(lines):
        try:
            tree = ast.parse("".join(lines), filename)
        except SyntaxError:
            return None
        cached = (len(lines), tree)
        _TREES[filename] = cached
    first = fn.__code__.co_firstlineno
    for node in ast.walk(cached[1]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn.__name__:
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            if first in (start, node.lineno):
                return node
    return None


# -- decorators ------------------------------------------------------------------


def unwrap_chain(fn: types.FunctionType) -> list[types.FunctionType]:
    """``[fn, what fn wraps, ...]`` down to the function holding the body."""
    chain = [fn]
    while True:
        inner = getattr(chain[-1], "__wrapped__", None)
        if not isinstance(inner, types.FunctionType) or inner in chain:
            return chain
        chain.append(inner)


def rewrap(chain: list[types.FunctionType], innermost: types.FunctionType, what: str) -> types.FunctionType:
    """Copies of the wrappers in ``chain`` around ``innermost`` (the
    instrumented body) in place of the original body."""
    current = innermost
    for wrapper, original in zip(reversed(chain[:-1]), reversed(chain[1:])):
        cells = wrapper.__closure__ or ()
        if not any(_holds(cell, original) for cell in cells):
            raise SourceError(
                f"{what}: `{wrapper.__qualname__}` is wrapped by a decorator that does not keep the "
                "function it wraps in a closure, so the forward cannot be rebuilt with its operations "
                "visible. Use `.source` on the undecorated function's module, or read the module's "
                "`.input`/`.output` instead."
            )
        closure = tuple(types.CellType(current) if _holds(cell, original) else cell for cell in cells)
        copied = types.FunctionType(wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, closure)
        copied.__kwdefaults__ = copy.copy(wrapper.__kwdefaults__)
        functools.update_wrapper(copied, wrapper, updated=())
        copied.__wrapped__ = current
        current = copied
    return current


def _holds(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False
