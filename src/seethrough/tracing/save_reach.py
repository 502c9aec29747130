"""Does a trace need ``torch.Tensor.save`` installed while it runs?

Argument-less ``X.save()`` calls written in a body are compiled as
seethrough's own save (see :mod:`.capture`), so they never look ``save`` up
on a tensor.  Only code the body *reaches* can: a helper function that does
``layer.output.save()``, a method of the user's own object, a custom envoy.
Installing the patch has a price proportional to the model: each change of
the ``Tensor`` class empties CPython's per-instruction caches for every tensor
method call in the forward that follows (~25% of an empty trace's cost on a
12-block GPT-2).  So a run installs it only when a body might reach such
code; the answer is "yes" whenever in doubt.

The decision has two halves.  From the body's text, once (:func:`analyse_reach`):
the names at the root of the calls it makes (``helper`` in ``helper(x)``,
``model`` in ``model.layers[0].output.sum()``, ``torch`` in
``torch.relu(h).norm()``), whether some call starts from a value the text
builds itself (unknown), and whether ``.save`` appears other than as a
rewritten call.  At the start of a run, from the values the names it reads
from outside have then (:func:`needs_tensor_save`): each must be inert —
builtins, torch and a few libraries, seethrough's own wrappers without custom
envoys, plain data and small containers of it — since a user object or
function could be called from anywhere (``map(helper, xs)``); and no call may
start from a name the body binds itself.  A run that fails these checks
installs the patch.  Not followed: the user's own code run implicitly by
operators on values the body computes from inert ones (there is none).
"""

from __future__ import annotations

import ast
import builtins
import types
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

# Modules whose functions run no user code that could call `Tensor.save`.
_LIBRARY_PREFIXES = ("torch", "math", "numpy", "einops", "operator", "seethrough", "collections", "itertools")


@dataclass(frozen=True)
class SaveReach:
    """What a body's text says about the code it may call (see module doc)."""

    call_roots: frozenset[str] = frozenset()  # names at the root of a call's callee
    opaque: bool = False  # a call on an unknown value, or `.save` used other than as `X.save()`
    body_names: frozenset[str] = frozenset()  # every name the body binds, at any depth


NO_CALLS = SaveReach()


def analyse_reach(body: Iterable[ast.stmt], is_save_call: Any) -> SaveReach:
    """The :class:`SaveReach` of ``body`` (the statements as written, before
    the save rewrite); ``is_save_call(node)`` says which calls are rewritten."""
    roots: set[str] = set()
    bound: set[str] = set()
    opaque = False
    save_attributes = save_calls = 0
    for node in (each for stmt in body for each in ast.walk(stmt)):
        if isinstance(node, ast.Call):
            if is_save_call(node):
                save_calls += 1
                continue
            root = _root(node.func)
            if isinstance(root, ast.Name):
                roots.add(root.id)
            elif not isinstance(root, ast.Constant):  # `"".join(...)` is the interpreter's own
                opaque = True
        elif isinstance(node, ast.Attribute) and node.attr == "save":
            save_attributes += 1
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            # `__enter__`/`__exit__` of what the block opens: judged as a call on it.
            for item in node.items:
                opened = item.context_expr
                root = _root(opened.func if isinstance(opened, ast.Call) else opened)
                if isinstance(root, ast.Name):
                    roots.add(root.id)
                else:
                    opaque = True
    if save_attributes > save_calls:
        opaque = True
    if not roots and not opaque:
        return NO_CALLS
    return SaveReach(frozenset(roots), opaque, frozenset(bound))


def _root(node: ast.expr) -> ast.expr:
    """The expression a callee's chain of attributes, subscripts and calls
    starts from (``torch`` in ``torch.relu(h).norm()``: a call on what a call
    returned is judged by the first callee's root)."""
    while True:
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            return node


def needs_tensor_save(reach: SaveReach, loaded: Iterable[str], namespaces: tuple[Mapping[str, Any], ...]) -> bool:
    """Whether a run of a body with ``reach`` (and names ``loaded``) must install
    ``Tensor.save``; names are looked up in ``namespaces``, then builtins.

    Every name the body reads from outside must hold a value that runs no
    user code (:func:`_is_inert`), since a user object or function could be
    called from anywhere (``map(helper, xs)``, ``getattr(obj, "m")()``); a name
    the body binds itself holds what the body made from those, but calling a
    method on it is still a call on a value the text cannot see."""
    if reach.opaque:
        return True
    for name in loaded:
        if name in reach.body_names:
            if name in reach.call_roots:
                return True
            continue
        if not _is_inert(_lookup(name, namespaces), 2):
            return True
    return False


_UNBOUND = object()
_RUNS_CODE = (builtins.exec, builtins.eval, builtins.__import__, builtins.breakpoint)
_SCALARS = (int, float, bool, complex, str, bytes, type(None), slice, range, type(Ellipsis))
_CONTAINERS = (list, tuple, set, frozenset, dict)
_CONTAINER_LIMIT = 64  # larger containers are not looked into: assume the worst


def _lookup(name: str, namespaces: tuple[Mapping[str, Any], ...]) -> Any:
    for namespace in namespaces:
        if name in namespace:
            return namespace[name]
    return getattr(builtins, name, _UNBOUND)


def _is_inert(value: Any, depth: int) -> bool:
    """Does ``value`` run no user code when called, iterated or used (builtins,
    torch, allowed libraries, seethrough's own objects, plain data)?"""
    if isinstance(value, _SCALARS):
        return type(value) in _SCALARS  # not a user subclass of int/str
    if type(value) in _CONTAINERS:
        if depth == 0 or len(value) > _CONTAINER_LIMIT:
            return False
        items = value.items() if isinstance(value, dict) else ((each, None) for each in value)
        return all(_is_inert(key, depth - 1) and _is_inert(item, depth - 1) for key, item in items)
    if value is _UNBOUND:
        return False
    if isinstance(value, types.ModuleType):
        return value.__name__.split(".")[0] in _LIBRARY_PREFIXES
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        # C code; a callback handed to it is a name of its own, checked on its
        # own — but code run from text or imported by name is not.
        return value not in _RUNS_CODE
    if isinstance(value, (types.FunctionType, types.MethodType)):
        return (getattr(value, "__module__", None) or "").split(".")[0] in ("torch", "seethrough")
    if isinstance(value, type):
        return (value.__module__ or "").split(".")[0] in ("builtins", "torch")
    module = type(value).__module__ or ""
    if module.split(".")[0] == "torch":
        return True  # tensors, dtypes, devices, torch's own modules
    if module.startswith("seethrough."):
        # A wrapper, envoy or tracer of seethrough's own class; a wrapper with
        # custom envoy classes (`envoys=`) hands out the user's code.
        try:
            root = object.__getattribute__(value, "_root")  # an envoy's wrapper (itself for the wrapper)
        except AttributeError:  # not an envoy
            return True
        try:
            return object.__getattribute__(root, "__dict__").get("_envoys") is None
        except AttributeError:
            return True
    return False


def explain_missing_tensor_save(error: AttributeError) -> None:
    """Add a note to ``'Tensor' object has no attribute 'save'`` raised in a run
    that judged it would not need ``Tensor.save`` (the error keeps its type)."""
    if getattr(error, "name", None) != "save" or not isinstance(getattr(error, "obj", None), torch.Tensor):
        return
    error.add_note(
        "seethrough: this trace ran without `Tensor.save`, because its body reads only envoys, torch, builtins "
        "and plain data, so nothing it calls looked able to save a tensor. The `.save()` above was reached some "
        "other way (e.g. a method of an object the model returned): call `seethrough.save(value)` there instead."
    )
