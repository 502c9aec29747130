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
