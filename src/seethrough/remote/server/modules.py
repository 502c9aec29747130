"""Registered modules on the server: rebuilt from the source a request carries.

A client that registered a module (:mod:`seethrough.remote.client.registry`) sends its source, and
that of the registered modules it imports, with each request that uses it.
That source is code a stranger sent, so it passes the sandbox exactly as a
body does (:mod:`.sandbox`: the syntax allowlist, no underscores, forbidden
names and attributes, assignments; :mod:`.reach`: every attribute checked at
run time), with the few additions a module of helpers needs:

* ``import other`` / ``from .other import f`` of the *other modules sent with
  the request* (relative imports resolved as Python does), besides torch,
  math and einops; ``from __future__ import annotations``;
* **classes**, at the module's top level only: no decorators, no keywords
  (``metaclass=``), bases that are plain names — at run time classes the
  request built or the plain exception classes a body may raise; a body of
  methods, plain class attributes and a docstring (bases are checked by
  :meth:`.reach.Guard.build_class`); besides public names,
  methods may be one of :data:`DUNDER_METHODS` (``__init__``, ``__call__``,
  ...); inside a method, ``self.name = value`` (the first parameter) may be
  assigned, and at run time only on instances of classes the request built.

Modules are built lazily, in Python's order (parents first, on first
import), in namespaces of their own, sharing the request's guard; each is a
:class:`RebuiltModule`, whose public names a body reads like a module's.
Nothing of them outlives the request.
"""

from __future__ import annotations

import __future__
import ast
from dataclasses import dataclass
from typing import Any, Callable

from . import sandbox
from .reach import Guard, ReadOnlyView, guard_tree
from ..refusal import SandboxViolation, user_line

__all__ = ["DUNDER_METHODS", "ModuleBuilder", "ModuleRules", "RebuiltModule", "validate_module"]

DUNDER_METHODS = frozenset({"__init__", "__call__", "__len__", "__getitem__", "__setitem__", "__iter__",
                            "__contains__"})
_CLASS_BODY = (ast.FunctionDef, ast.Assign, ast.AnnAssign, ast.Expr, ast.Pass)


@dataclass(frozen=True)
class ModuleRules:
    """What a registered module's source may do beyond a body: its own name
    (for relative imports), whether it is a package, and the names of the
    modules sent with it (importable)."""

    name: str
    package: bool
    importable: frozenset[str]

    def resolve(self, module: str | None, level: int) -> str:
        """The absolute name of ``from <level dots><module> import ...``."""
        if not level:
            return module or ""
        base = self.name.split(".") if self.package else self.name.split(".")[:-1]
        if level - 1 > len(base) or (level - 1 == len(base) and not module):
            return ""
        anchor = base[: len(base) - (level - 1)]
        return ".".join(anchor + ([module] if module else []))


class _ModuleChecker(sandbox._Checker):
    """The body's checks, plus what :class:`ModuleRules` allows (see the module docs)."""

    def __init__(self, source: str, filename: str, rules: ModuleRules) -> None:
        super().__init__(source, filename)
        self.rules = rules
        self.classes: set[int] = set()
        self.dunders: set[int] = set()
        self.self_targets: set[int] = set()

    def check(self, tree: ast.AST) -> None:
        if isinstance(tree, ast.Module):
            self.classes = {id(node) for node in tree.body if isinstance(node, ast.ClassDef)}
        super().check(tree)

    def _check_node(self, node: ast.AST, line: int) -> None:
        if isinstance(node, ast.ClassDef):
            if id(node) not in self.classes:
                self._refuse(node, line, "class", "classes may be defined only at the top level of a registered "
                             "module", "move the class to the top level of the module")
            self._check_class(node, line)
            return
        super()._check_node(node, line)

    def _check_class(self, node: ast.ClassDef, line: int) -> None:
        self._name(node.name, node, line)
        if node.decorator_list:
            self._refuse(None, node.decorator_list[0].lineno, "@" + self._construct(node.decorator_list[0], "decorator"),
                         "decorators are not allowed", "build the class without them")
        if node.keywords or getattr(node, "type_params", None):
            self._refuse(node, line, f"class {node.name}(...)", "class keywords (metaclass=...) and type "
                         "parameters reach the class machinery", "use plain bases")
        for base in node.bases:
            if not isinstance(base, ast.Name):
                self._refuse(base, line, "base", "a base class is a plain name (a class of this request or an "
                             "exception class)", "import the base class by name first")
        for item in node.body:
            if not isinstance(item, _CLASS_BODY) or (isinstance(item, ast.Expr) and not isinstance(
                    item.value, ast.Constant)) or (isinstance(item, ast.Assign) and not all(
                    isinstance(t, ast.Name) for t in item.targets)) or (isinstance(item, ast.AnnAssign) and not
                    isinstance(item.target, ast.Name)):
                self._refuse(item, getattr(item, "lineno", line), type(item).__name__, "a class body holds methods, "
                             "plain class attributes and a docstring", "move other code into a method or function")
            if isinstance(item, ast.FunctionDef):
                if item.name in DUNDER_METHODS:
                    self.dunders.add(id(item))
                positional = item.args.posonlyargs + item.args.args
                if positional:
                    self._mark_self_targets(item, positional[0].arg)

    def _mark_self_targets(self, method: ast.FunctionDef, self_name: str) -> None:
        for inner in ast.walk(method):
            if (isinstance(inner, ast.Attribute) and not isinstance(inner.ctx, ast.Load)
                    and isinstance(inner.value, ast.Name) and inner.value.id == self_name):
                self.self_targets.add(id(inner))

    def _check_FunctionDef(self, node: ast.FunctionDef, line: int) -> None:
        if id(node) not in self.dunders:
            return super()._check_FunctionDef(node, line)
        # One of DUNDER_METHODS in a class body: the body's rules but the name's.
        if node.decorator_list:
            self._refuse(None, node.decorator_list[0].lineno, "@" + self._construct(node.decorator_list[0], "decorator"),
                         "decorators are not allowed", "call the function explicitly, e.g. f = wrap(f)")
        if getattr(node, "type_params", None):
            self._refuse(node, line, node.name, "generic type parameters are not supported", "remove them")

    def _check_Attribute(self, node: ast.Attribute, line: int) -> None:
        if id(node) in self.self_targets:
            self._attribute(node.attr, node, line)  # the name rules still apply
            return
        super()._check_Attribute(node, line)

    def _check_Import(self, node: ast.Import, line: int) -> None:
        for alias in node.names:
            if alias.name in self.rules.importable:
                if alias.asname is not None:
                    self._name(alias.asname, node, line)
                continue
            super()._check_Import(ast.copy_location(ast.Import(names=[alias]), node), line)

    def _check_ImportFrom(self, node: ast.ImportFrom, line: int) -> None:
        if node.module == "__future__" and not node.level:
            if any(alias.name != "annotations" for alias in node.names):
                self._refuse(node, line, "from __future__ import ...", "only `annotations` is supported",
                             "remove the other names")
            return
        absolute = self.rules.resolve(node.module, node.level)
        if absolute in self.rules.importable or any(
                f"{absolute}.{alias.name}" in self.rules.importable for alias in node.names):
            for alias in node.names:
                if alias.name == "*":
                    self._refuse(node, line, "import *", "star imports hide which names the module uses",
                                 "import the names you need")
                self._name(alias.asname or alias.name, node, line)
            return
        super()._check_ImportFrom(node, line)


def validate_module(source: str, filename: str, rules: ModuleRules) -> ast.Module:
    """Parse and check a registered module's source (raises :class:`SandboxViolation`)."""
    tree = sandbox.validate_with(source, filename, lambda: _ModuleChecker(source, filename, rules))
    return tree


def _compile(tree: ast.Module, filename: str) -> Any:
    """Compile with the guard's rewrite; ``from __future__ import annotations`` as a flag."""
    body = [node for node in tree.body
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__" and not node.level)]
    flags = __future__.annotations.compiler_flag if len(body) != len(tree.body) else 0
    module = ast.Module(body=body, type_ignores=[])
    with sandbox.PARSE_LOCK:
        return compile(guard_tree(module), filename, "exec", flags=flags, dont_inherit=True)


class RebuiltModule(ReadOnlyView):
    """A registered module as rebuilt on the server: its public names, read-only."""

    __slots__ = ("_name", "_namespace")

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        super().__init__(_name=name, _namespace=namespace)

    def _allowed(self, name: str) -> bool:
        return not name.startswith("_") and name in self._namespace

    def _why(self, name: str) -> str:
        public = sorted(n for n in self._namespace if not n.startswith("_"))
        return f"the registered module {self._name} has no `{name}` (it defines {', '.join(public[:30])})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._namespace:
            raise AttributeError(f"module {self._name!r} has no attribute {name!r}")
        return self._namespace[name]

    def _written(self, name: str) -> str:
        return f"registered modules are read-only on the server (tried to set `{self._name}.{name}`)"

    def __repr__(self) -> str:
        return f"<registered module {self._name!r} (rebuilt on the server)>"


class ModuleBuilder:
    """The registered modules of one request, built on first import."""

    def __init__(self, packages: dict[str, dict], guard: Guard, print_function: Callable[..., Any],
                 filename: Callable[[str], str], linecache_add: Callable[[str, str], None]) -> None:
        self.packages = packages
        self.guard = guard
        self.print_function = print_function
        self.filename = filename
        self.linecache_add = linecache_add
        self.built: dict[str, RebuiltModule] = {}
        self.importable = frozenset(packages)

    def validate_all(self) -> None:
        """Check every module's source before anything runs."""
        for name, entry in self.packages.items():
            validate_module(entry["source"], self.filename(name), self.rules(name))

    def rules(self, name: str) -> ModuleRules:
        return ModuleRules(name, bool(self.packages[name]["package"]), self.importable)

    def get(self, name: str) -> RebuiltModule:
        """The module ``name``, built now if it was not yet (its parents first)."""
        found = self.built.get(name)
        if found is not None:
            return found
        parent = name.rpartition(".")[0]
        if parent and parent in self.packages:
            self.get(parent)
            if name in self.built:  # the parent imported it
                return self.built[name]
        entry = self.packages[name]
        filename = self.filename(name)
        tree = validate_module(entry["source"], filename, self.rules(name))
        self.linecache_add(filename, entry["source"])
        namespace = sandbox.safe_globals({}, self.print_function, self.guard)
        table = dict(namespace["__builtins__"])
        table["__import__"] = self._import
        table["__build_class__"] = self.guard.build_class
        namespace.update(__builtins__=table, __name__=name,
                         __package__=name if entry["package"] else parent)
        module = self.built[name] = RebuiltModule(name, namespace)
        exec(_compile(tree, filename), namespace)
        if parent in self.built:
            self.built[parent]._namespace[name.rpartition(".")[2]] = module
        return module

    def _import(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        """``__import__`` of registered modules: other sent modules, else the body's rules."""
        package = (globals or {}).get("__package__") or ""
        if level:
            base = package.split(".") if package else []
            if level - 1 > len(base):
                raise SandboxViolation(f"{user_line()}relative import beyond the registered package {package!r}")
            absolute = ".".join(base[: len(base) - (level - 1)] + ([name] if name else []))
        else:
            absolute = name
        if absolute in self.packages:
            module = self.get(absolute)
            for item in fromlist or ():
                if f"{absolute}.{item}" in self.packages:
                    self.get(f"{absolute}.{item}")
            if fromlist or level:
                return module
            return self.get(absolute.split(".")[0]) if absolute.split(".")[0] in self.packages else module
        if level:
            raise SandboxViolation(f"{user_line()}`from {'.' * level}{name} import ...`: the module {absolute!r} was "
                                   "not sent with the request (register it, or import only registered modules)")
        return sandbox._guarded_import(name, globals, locals, fromlist, level)
