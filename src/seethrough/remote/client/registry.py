"""Registered modules: local code that travels with remote requests as source.

A remote body may call the user's own helper functions: each travels as its
source (:mod:`.collect`).  A whole module of helpers — functions, classes,
constants, modules importing one another — travels once it is *registered*::

    import my_helpers
    seethrough.register(my_helpers)          # or register("my_helpers"); nnsight.register
    with model.trace("Hello", remote=True):
        h = my_helpers.last_token(model.transformer.h[0].output).save()
        probe = my_helpers.Probe(3)          # classes too

Registering a package registers its submodules.  Whatever a body uses of a
registered module (the module, a function or a class defined at its top level)
makes the request carry that module's source, plus the source of every
registered module it imports (found by reading its ``import`` statements, and
its registered submodules already imported here).  The server rebuilds them
from that source inside its sandbox, under the same checks as the body itself
(:mod:`seethrough.remote.server.modules`), importing them in Python's order when first imported.
Instances of registered classes do not travel (their state is not source):
create them in the body.

This module is the client's side: the process-wide registry
(:func:`register`, :func:`unregister`) and the sources a request carries
(:func:`module_sources`).  It never imports the server.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import threading
import types
from typing import Any

from ...errors import SeethroughError, UsageTypeError

__all__ = ["RegistrationError", "module_sources", "owner", "register", "registered", "unregister"]

_REGISTERED: set[str] = set()
_LOCK = threading.Lock()
# Modules a body reaches by name anyway (the sandbox's proxies) or that are the library itself.
_NEVER = ("torch", "math", "einops", "seethrough", "builtins", "nnsight")


class RegistrationError(SeethroughError, ValueError):
    """A module that cannot be registered (or whose source cannot be sent)."""


def register(module: types.ModuleType | str) -> None:
    """Register ``module`` (a module object or its name) so that a remote body
    can use its functions and classes: they travel with the request as source
    and are rebuilt on the server (see the module docs).  nnsight's
    ``nnsight.register`` / ``nnsight.ndif.register``."""
    if isinstance(module, str):
        name = module
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise RegistrationError(f"register({name!r}): the module cannot be imported here ({error}); register "
                                    "a module this process can import, or pass the module object.") from None
    elif not isinstance(module, types.ModuleType):
        raise UsageTypeError(f"register() takes a module or its name, not a {type(module).__name__}: "
                             "`import my_helpers; seethrough.register(my_helpers)`.")
    name = module.__name__
    if name.split(".")[0] in _NEVER:
        raise RegistrationError(
            f"register({name!r}): {name.split('.')[0]} is not registered — torch, math and einops are available to "
            "remote bodies by name, and the library itself is on the server. Register your own modules.")
    if not _source_file(module):
        raise RegistrationError(f"register({name!r}): the module has no Python source file (it is built in or "
                                "compiled), so it cannot travel to a server as source.")
    with _LOCK:
        _REGISTERED.add(name)


def unregister(module: types.ModuleType | str) -> None:
    """Undo :func:`register` (no error if it was not registered)."""
    name = module if isinstance(module, str) else getattr(module, "__name__", "")
    with _LOCK:
        _REGISTERED.discard(name)


def registered() -> frozenset[str]:
    """The names of the registered modules (packages stand for their submodules too)."""
    with _LOCK:
        return frozenset(_REGISTERED)


def owner(value: Any) -> str | None:
    """The registered module ``value`` is (a module) or was defined in (a function
    or a class, by its ``__module__``); None when it is not registered."""
    if isinstance(value, types.ModuleType):
        name = value.__name__
    elif isinstance(value, (types.FunctionType, type)):
        name = getattr(value, "__module__", None)
    else:
        return None
    if not isinstance(name, str):
        return None
    names = registered()
    return name if any(name == r or name.startswith(r + ".") for r in names) else None


def _source_file(module: types.ModuleType) -> str | None:
    path = getattr(module, "__file__", None)
    return path if isinstance(path, str) and path.endswith(".py") else None


def _is_package(module: types.ModuleType) -> bool:
    return hasattr(module, "__path__")


def module_sources(names: list[str]) -> dict[str, dict[str, Any]]:
    """``{module name: {"source": text, "package": bool}}`` for the registered
    modules ``names`` and every registered module they import, transitively."""
    out: dict[str, dict[str, Any]] = {}
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in out:
            continue
        module = sys.modules.get(name)
        if module is None:
            raise RegistrationError(f"the registered module {name!r} is not imported in this process; import it "
                                    "before the trace that uses it.")
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):
            raise RegistrationError(f"the source of the registered module {name!r} cannot be read, so it cannot "
                                    "travel to the server.") from None
        package = _is_package(module)
        out[name] = {"source": source, "package": package}
        for other in _imports_of(source, name, package) + _child_modules(module):
            if other not in out and owner(sys.modules.get(other)) is not None:
                pending.append(other)
    return out


def _child_modules(module: types.ModuleType) -> list[str]:
    """Registered submodules bound in ``module`` (``import pkg.sub`` made ``pkg.sub``)."""
    prefix = module.__name__ + "."
    return [value.__name__ for value in vars(module).values()
            if isinstance(value, types.ModuleType) and value.__name__.startswith(prefix)]


def _imports_of(source: str, name: str, package: bool) -> list[str]:
    """Absolute names of the modules ``source`` imports (relative ones resolved;
    ``from pkg import sub`` counts ``pkg.sub`` where that is a module)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []  # the server's sandbox reports it, with the line
    base = name if package else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.extend(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - (node.level - 1)] if base else []
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module:
                continue
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in sys.modules)
    return found
