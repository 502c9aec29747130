"""The package's layers import one way: downward.

Each module of ``seethrough`` belongs to a layer (below); a module may import
from its own layer or from a lower one, never from a higher one — also not
inside a function, where a cycle is only hidden.  The test reads every
import statement with ``ast`` (no module is imported), so it sees imports
that only run on some code paths too.

``KNOWN_UPWARD`` lists the upward imports that exist today, each a debt to
pay (issue: one-way layers).  A new upward import fails the test; so does an
entry of the list that no longer exists (remove it: the list only shrinks).

At folder level (``FOLDERS``, below) every import between two of the
package's folders points down too: ``remote/client`` imports nothing of
``remote/server``, and ``remote="local"`` reaches the server only through
the one entry point the protocol declares (``LOCAL_SERVER``).

No private name crosses a folder: no ``from X import _name`` from another
folder, and no ``x._name`` read where ``_name`` belongs to another folder
(``PRIVATE_CROSSINGS`` and ``ENVOY_INTERFACE`` name the few that remain, each
with its reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "seethrough"

# Lowest first.  A module's layer is that of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("seethrough.errors", "seethrough.config", "seethrough._version", "seethrough._frames"),
    ("seethrough.tracing",),
    ("seethrough.envoy", "seethrough.source"),
    ("seethrough.remote",),  # what client and server both speak: wire, portable, protocol, refusal
    ("seethrough.remote.client",),
    ("seethrough.harvest",),
    ("seethrough.models",),
    ("seethrough.remote.server",),
    ("seethrough.intervention", "seethrough.interp"),
    ("seethrough.cli", "seethrough.__main__", "seethrough"),
]

KNOWN_UPWARD: set[tuple[str, str]] = set()  # none left: keep it so


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def _from_target(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` in ``package`` names."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, text: str | None = None) -> set[str]:
    """Every seethrough module ``path`` imports (relative imports resolved), in any scope
    (``text``: the source to read instead of the file's)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(node, package)
            if target.split(".")[0] != "seethrough":
                continue
            # `from . import wire` imports the submodule `wire`, not the package.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _is_module(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "seethrough")
    found.discard(module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports() -> set[tuple[str, str]]:
    edges = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target in _imports(path):
            if _layer(target) > _layer(source):
                edges.add((source, target))
    return edges


def test_no_new_upward_import():
    new = sorted(upward_imports() - KNOWN_UPWARD)
    assert not new, "upward imports (a lower layer reaching a higher one):\n" + "\n".join(f"  {a} -> {b}" for a, b in new)


def test_known_upward_imports_still_exist():
    gone = sorted(KNOWN_UPWARD - upward_imports())
    assert not gone, "these upward imports are gone; remove them from KNOWN_UPWARD:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in gone)


def test_the_check_sees_imports_inside_functions():
    # The tracer's file, as if it imported the remote client inside a method (an upward import).
    tracer = PACKAGE / "tracing" / "tracer.py"
    hidden = "def run(self):\n    if self.remote:\n        from ..remote.client import backend\n        from ..remote.client.connection import job\n"
    assert {"seethrough.remote.client.backend", "seethrough.remote.client.connection"} <= _imports(tracer, hidden)
    assert "seethrough.remote.client.backend" not in _imports(tracer)
    assert _layer("seethrough.tracing.run") < _layer("seethrough.envoy") < _layer("seethrough.models.model")
    assert _layer("seethrough.remote.server.app") > _layer("seethrough.models.language")


# -- folders ---------------------------------------------------------------------------------
# The package's folders, lowest first: an import from a module of one folder
# into a module of another points down this list.  (A folder nested in
# another is a folder of its own: ``remote.client`` sits above ``remote``.)
# The package's own loose modules are no folder here: they sit both below the
# folders (errors, config) and above them (cli, the package root); LAYERS
# orders them.
FOLDERS: list[str] = [
    "seethrough.tracing",
    "seethrough.remote",  # what client and server both speak
    "seethrough.remote.client",
    "seethrough.harvest",
    "seethrough.models",
    "seethrough.remote.server",
    "seethrough.intervention",
    "seethrough.intervention.tracing",
    "seethrough.modeling",
    "seethrough.interp",
    "seethrough.nnsight",
]


def _folder(module: str) -> str:
    """The folder (package) a module is in; a package is its own folder."""
    return module if (PACKAGE.parent.joinpath(*module.split(".")) / "__init__.py").is_file() else module.rpartition(".")[0]


def downward_violations(texts: dict[Path, str] | None = None) -> set[tuple[str, str]]:
    """Imports between two folders that do not point down :data:`FOLDERS`, as
    ``(module, imported)`` (``texts``: sources to read instead of some files)."""
    texts = texts or {}
    rank = {folder: index for index, folder in enumerate(FOLDERS)}
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        home = _folder(source)
        for target in _imports(path, texts.get(path)):
            there = _folder(target)
            if home == there or "seethrough" in (home, there):
                continue
            assert home in rank and there in rank, f"{home} or {there} is in no folder: add it to FOLDERS"
            if rank[there] > rank[home]:
                found.add((source, target))
    return found


def test_every_folder_is_ranked():
    folders = {_folder(_module_name(path)) for path in PACKAGE.rglob("*.py")} - {"seethrough"}
    assert folders <= set(FOLDERS), f"add these folders to FOLDERS: {sorted(folders - set(FOLDERS))}"


def test_every_arrow_between_folders_points_down():
    found = sorted(downward_violations())
    assert not found, "imports from a folder into a higher one:\n" + "\n".join(f"  {a} -> {b}" for a, b in found)


def test_the_folder_check_sees_an_upward_arrow():
    # The client, as if it imported the server inside a function; the common wire, as if it used the client.
    backend = PACKAGE / "remote" / "client" / "backend.py"
    wire = PACKAGE / "remote" / "wire.py"
    texts = {backend: "def local():\n    from ..server.local import run_local\n",
             wire: "from .client import connection\n"}
    assert downward_violations(texts) == {("seethrough.remote.client.backend", "seethrough.remote.server.local"),
                                          ("seethrough.remote.wire", "seethrough.remote.client.connection")}
    assert FOLDERS.index("seethrough.remote") < FOLDERS.index("seethrough.remote.client") \
        < FOLDERS.index("seethrough.models") < FOLDERS.index("seethrough.remote.server")


def _calls_of(path: Path, name: str) -> set[str]:
    """The functions of ``path`` that call something named ``name``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    callers = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and name in (getattr(node.func, "attr", None), getattr(node.func, "id", None)):
                    callers.add(f"{_module_name(path)}.{function.name}")
    return callers


def test_remote_local_reaches_the_server_only_through_its_declared_entry_point():
    """The client imports nothing of the server; ``remote="local"`` loads the
    one entry point the protocol declares, by name, when it is used."""
    import importlib

    from seethrough.remote import protocol

    module_name, _, function = protocol.LOCAL_SERVER.partition(":")
    assert _folder(module_name) == "seethrough.remote.server" and not function.startswith("_")
    entry = getattr(importlib.import_module(module_name), function)
    assert callable(entry) and entry.__module__ == module_name
    loaders = set()
    for path in sorted((PACKAGE / "remote" / "client").rglob("*.py")):
        loaders |= _calls_of(path, "import_module") | _calls_of(path, "__import__")
    # registry.register imports the user's own module by name; backend.local_server the declared entry point.
    assert loaders == {"seethrough.remote.client.registry.register", "seethrough.remote.client.backend.local_server"}


def private_imports(texts: dict[Path, str] | None = None) -> set[tuple[str, str]]:
    """``from X import _name`` where ``X`` is in another folder than the importer,
    as ``(module, "X._name")`` (``texts``: sources to read instead of some files)."""
    texts = texts or {}
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        tree = ast.parse(texts.get(path) or path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _from_target(node, package)
            if target.split(".")[0] != "seethrough":
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                module = f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target
                if private and _folder(module) != _folder(source):
                    found.add((source, f"{target}.{alias.name}"))
    return found


def test_no_private_name_is_imported_from_another_folder():
    found = sorted(private_imports())
    assert not found, ("private names imported from another folder (make them public where they live):\n"
                       + "\n".join(f"  {a} imports {b}" for a, b in found))
    worker = PACKAGE / "remote" / "server" / "worker.py"
    seen = private_imports({worker: "from ...models.language import _load_weights\nfrom .forking import _x\n"})
    assert ("seethrough.remote.server.worker", "seethrough.models.language._load_weights") in seen
    assert not any(b.endswith("forking._x") for _, b in seen)  # same folder: its own business


# -- no module cycle, type-only imports included ---------------------------------------
#
# Layers order packages; inside one, modules could still import each other in a
# circle.  This check draws every module's imports (any scope, `TYPE_CHECKING`
# blocks too: a type-only import is still a dependency of the reader) and fails
# on any strongly connected group of modules, naming one cycle in it.


def import_graph() -> dict[str, set[str]]:
    """Each seethrough module -> the seethrough modules it imports (any scope)."""
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in graph:
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def one_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest import cycle through the group's first module, for the message."""
    members = set(group)
    start = group[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is no cycle")


def test_no_module_cycle_even_counting_type_only_imports():
    graph = import_graph()
    groups = module_cycles(graph)
    assert not groups, "modules that import each other in a circle (type-only imports included):\n" + "\n".join(
        f"  {len(group)} modules: {', '.join(group)}\n    e.g. {' -> '.join(one_cycle(graph, group))}" for group in groups)


def test_the_cycle_check_sees_type_only_imports():
    runtime = PACKAGE / "tracing" / "runtime.py"
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .tracer import Tracer\n"
    assert "seethrough.tracing.tracer" in _imports(runtime, hidden)
    graph = import_graph()
    graph["seethrough.tracing.runtime"] = graph["seethrough.tracing.runtime"] | _imports(runtime, hidden)
    groups = module_cycles(graph)
    assert any({"seethrough.tracing.runtime", "seethrough.tracing.tracer"} <= set(group) for group in groups)
    cycle = one_cycle(graph, next(g for g in groups if "seethrough.tracing.runtime" in g))
    assert cycle[0] == cycle[-1] and len(cycle) > 2
    # And a small graph, by hand: a -> b -> c -> a is one group; d, alone, none.
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert module_cycles({"a": {"b"}, "b": set()}) == []


# -- tracing/ is a stack: its map, top down, is the import order ----------------------


def tracing_stack() -> list[str]:
    """The modules ``tracing/__init__.py``'s map lists, top first."""
    import re

    text = ast.get_docstring(ast.parse((PACKAGE / "tracing" / "__init__.py").read_text(encoding="utf-8"))) or ""
    return ["seethrough.tracing." + name for name in re.findall(r"^\* :mod:`\.(\w+)`", text, flags=re.MULTILINE)]


def stack_violations(graph: dict[str, set[str]], stack: list[str]) -> list[str]:
    """Imports of a module listed at or above the importer (``stack``: top first)."""
    height = {module: len(stack) - index for index, module in enumerate(stack)}
    return sorted(
        f"  {source} -> {target}" for source in stack for target in graph.get(source, ())
        if target in height and height[target] >= height[source])


def test_tracing_map_lists_every_module_once():
    stack = tracing_stack()
    modules = {name for name in import_graph() if name.startswith("seethrough.tracing.")}
    assert len(stack) == len(set(stack)), f"listed twice in tracing/__init__.py: {sorted({m for m in stack if stack.count(m) > 1})}"
    assert set(stack) == modules, (
        f"tracing/__init__.py's map must list every module of tracing/ (one line each, in import order): "
        f"missing {sorted(modules - set(stack))}, no such module {sorted(set(stack) - modules)}")


def test_tracing_modules_import_only_modules_below_them():
    bad = stack_violations(import_graph(), tracing_stack())
    assert not bad, ("in tracing/, a module imports only modules listed below it in tracing/__init__.py's map "
                     "(type-only imports too):\n" + "\n".join(bad))


def test_the_stack_check_sees_an_import_upward():
    graph = import_graph()
    stack = tracing_stack()
    assert len(stack) > 10 and stack[0] == "seethrough.tracing.tracer" and stack[-1] == "seethrough.tracing.sentinels"
    runtime = PACKAGE / "tracing" / "runtime.py"
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .tasks import Task\n"
    graph["seethrough.tracing.runtime"] = _imports(runtime, hidden)
    assert stack_violations(graph, stack) == ["  seethrough.tracing.runtime -> seethrough.tracing.tasks"]


# -- no private attribute crosses a folder ---------------------------------------------
#
# ``x._name`` where ``_name`` is defined (a ``def``/``class``, an assignment or
# annotation, ``object.__setattr__(x, "_name", ...)``) only in other folders of
# the package than the reader's: one folder reaching into another's insides.
# The owner gives a public function, method or property instead (or the code
# moves to the owner); a lower folder that needs something of a higher one
# declares it (a Protocol, whose declared names count as its own).  ``self._x``
# and ``cls._x`` are the class's own business; names the package defines
# nowhere (torch's ``module._modules``) are not its business.

# The envoy's own interface, used by every folder that handles envoys and
# wrappers.  Reason: an envoy's public attribute namespace is its module's
# (``model.layers``, ``model.path`` of a submodule named ``path``, parameters,
# the module's own attributes), so the envoy keeps its own state and helpers
# underscored; a public name would hide the module's attribute of that name.
# The wrapper (models/) is the root of the envoy tree and builds on these;
# the remote client and server read ``_module`` (the module an envoy stands
# for), ``_root`` and ``_display_path`` (for errors).  The wrapper reads
# ``_path``, not the public ``path``: a user's envoy class (``envoys=``) may
# define a ``path`` of its own.  Declared in envoy.py (``Envoy``,
# ``EnvoyRoot``); elsewhere code uses envoy.py's public functions
# (``alias_target``, ``unknown_name_error``, ``cached_children``).
ENVOY_INTERFACE: dict[str, str] = {
    name: "the envoy's own interface (an envoy's public namespace is its module's); see above"
    for name in ("_module", "_path", "_display_path", "_root", "_child")
}

# Other crossings that remain, each with its reason: (reading module, name).
PRIVATE_CROSSINGS: dict[tuple[str, str], str] = {
    ("seethrough.remote.server.worker", "_model"): "`model._model`, the wrapped torch module: nnsight's name for it, "
                                                  "public API despite the underscore (README)",
    ("seethrough.tracing.saving", "_base"): "torch.Tensor._base (torch's, not ours): same name as Guard's own `_base`",
    ("seethrough.remote.wire", "_TYPES"): "safetensors.torch._TYPES (safetensors', read with a fallback), not settings'",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


_TREES: dict[Path, ast.Module] = {}


def _tree(path: Path, texts: dict[Path, str]) -> ast.Module:
    """``path``'s syntax tree (``texts[path]`` instead where given); files' trees are parsed once."""
    if path in texts:
        return ast.parse(texts[path])
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(encoding="utf-8"))
    return _TREES[path]


def _read_by_string(node: ast.AST) -> str | None:
    """The private name ``getattr(x, "_n")``, ``hasattr``, ``object.__getattribute__(x, "_n")``
    or ``x.__dict__.get("_n")`` reads; None for any other node."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    callee = _callee(node)
    if callee in ("getattr", "hasattr", "__getattribute__") and len(node.args) >= 2:
        name = node.args[1]
    elif callee == "get" and isinstance(node.func, ast.Attribute) and "__dict__" in ast.unparse(node.func.value):
        name = node.args[0]
    else:
        return None
    return name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value) else None


def _callee(call: ast.Call) -> str | None:
    """The called function's own name (``setattr``; ``__setattr__`` of ``object.__setattr__``)."""
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)


def private_definitions(texts: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """Each private name the package defines -> the folders defining it."""
    texts = texts or {}
    defined: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        home = _folder(_module_name(path))
        for node in ast.walk(_tree(path, texts)):
            names: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for part in ast.walk(target):
                        if isinstance(part, ast.Attribute):
                            names.append(part.attr)
                        elif isinstance(part, ast.Name):
                            names.append(part.id)
                        elif (isinstance(part, ast.Subscript) and isinstance(part.slice, ast.Constant)
                              and "__dict__" in ast.unparse(part.value)):  # x.__dict__["_n"] = ...
                            names.append(str(part.slice.value))
            elif (isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and _callee(node) in ("setattr", "__setattr__")):
                names.append(str(node.args[1].value))
            for name in names:
                if _private(name):
                    defined.setdefault(name, set()).add(home)
    return defined


def private_crossings(texts: dict[Path, str] | None = None) -> dict[tuple[str, str], set[str]]:
    """``x._name`` (or ``getattr(x, "_name")``) read in a folder that does not
    define ``_name`` while another does, as ``(module, "_name") -> lines``."""
    texts = texts or {}
    defined = private_definitions(texts)
    found: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        home = _folder(module)
        for node in ast.walk(_tree(path, texts)):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                name = node.attr
            else:
                name = _read_by_string(node)
                if name is None:
                    continue
            owners = defined.get(name, set())
            if owners and home not in owners:
                found.setdefault((module, name), set()).add(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_no_private_attribute_crosses_a_folder():
    found = {key: lines for key, lines in private_crossings().items()
             if key[1] not in ENVOY_INTERFACE and key not in PRIVATE_CROSSINGS}
    defined = private_definitions()
    assert not found, ("private attributes of one folder read from another (give the owner a public name, "
                       "or move the code to it):\n" + "\n".join(
                           f"  {module} reads {name} (defined in {', '.join(sorted(defined[name]))}) at "
                           f"{', '.join(sorted(lines))}" for (module, name), lines in sorted(found.items())))


def test_private_crossing_exceptions_are_still_needed():
    found = private_crossings()
    stale = sorted(key for key in PRIVATE_CROSSINGS if key not in found)
    assert not stale, f"these crossings are gone; remove them from PRIVATE_CROSSINGS: {stale}"
    used = {name for _, name in found}
    assert not sorted(set(ENVOY_INTERFACE) - used), "names no longer crossing: remove them from ENVOY_INTERFACE"


def test_the_private_attribute_check_sees_a_crossing():
    # The server's executor, as if it read the wrappers' hook plan and the tracer's result its own way.
    execute = PACKAGE / "remote" / "server" / "execute.py"
    text = execute.read_text(encoding="utf-8") + (
        "\n\ndef peek(model, tracer):\n    return model._hook_plan, getattr(tracer, '_result'), model._mine, "
        "object.__getattribute__(model, '_edits'), model.__dict__.get('_tokenizer')\n"
        "\n\ndef _mine():\n    pass\n")
    found = private_crossings({execute: text})
    assert ("seethrough.remote.server.execute", "_hook_plan") in found
    assert ("seethrough.remote.server.execute", "_result") in found
    assert {("seethrough.remote.server.execute", "_edits"), ("seethrough.remote.server.execute", "_tokenizer")} <= set(found)
    assert ("seethrough.remote.server.execute", "_mine") not in found  # defined in its own folder
    assert ("seethrough.remote.server.execute", "_result") not in private_crossings()
    # `self._x` is the class's own; a name the package never defines (torch's) is none of its business.
    model = PACKAGE / "models" / "model.py"
    extra = "\n\ndef own(self, net):\n    return self._hook_plan, net._modules, net._no_such_private_name\n"
    assert not any(key[0] == "seethrough.models.model" and key[1] in ("_modules", "_no_such_private_name")
                   for key in private_crossings({model: model.read_text(encoding="utf-8") + extra}))
