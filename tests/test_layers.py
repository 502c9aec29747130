"""The package's layers import one way: downward.

Each module of ``seethrough`` belongs to a layer (below); a module may import
from its own layer or from a lower one, never from a higher one — also not
inside a function, where a cycle is only hidden.  The test reads every
import statement with ``ast`` (no module is imported), so it sees imports
that only run on some code paths too.

``KNOWN_UPWARD`` lists the upward imports that exist today, each a debt to
pay (issue: one-way layers).  A new upward import fails the test; so does an
entry of the list that no longer exists (remove it: the list only shrinks).
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
    ("seethrough.remote", "seethrough.remote.wire", "seethrough.remote.protocol", "seethrough.remote.client",
     "seethrough.remote.backend", "seethrough.remote.collect"),
    ("seethrough.harvest",),
    ("seethrough.models",),
    ("seethrough.remote.server", "seethrough.remote.execute", "seethrough.remote.sandbox", "seethrough.remote.modules",
     "seethrough.remote.local"),
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


def _imports(path: Path, text: str | None = None) -> set[str]:
    """Every seethrough module ``path`` imports (relative imports resolved), in any scope
    (``text``: the source to read instead of the file's)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8") if text is None else text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
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
    hidden = "def run(self):\n    if self.remote:\n        from ..remote import backend\n        from ..remote.client import job\n"
    assert {"seethrough.remote.backend", "seethrough.remote.client"} <= _imports(tracer, hidden)
    assert "seethrough.remote.backend" not in _imports(tracer)
    assert _layer("seethrough.tracing.run") < _layer("seethrough.envoy") < _layer("seethrough.models.model")
    assert _layer("seethrough.remote.server.app") > _layer("seethrough.models.language")


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
