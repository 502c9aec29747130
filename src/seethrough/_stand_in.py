"""The machinery of the ``nnsight`` stand-in (the switch is :mod:`seethrough.stand_in`).

While the stand-in is on, an import finder placed first on ``sys.meta_path``
answers every import of ``nnsight`` and ``nnsight.<x>``:

* a name seethrough provides resolves to seethrough's own module, the very
  object (``sys.modules["nnsight.intervention.envoy"] is
  seethrough.intervention.envoy``): :data:`COUNTERPARTS` maps nnsight's
  module trees onto seethrough's (longest prefix wins, the rest of the name
  is kept), covering nnsight 0.8's layout and the 0.5–0.7 paths libraries
  still import (``nnsight.intervention.tracing.globals``);
* any other ``nnsight.<x>`` raises ``ModuleNotFoundError`` naming the module
  and the switch.

Switching on drops every ``nnsight`` module already imported from
``sys.modules`` (a real nnsight, installed and imported before) and keeps it
aside, with a warning: code that imported the real one keeps its references.
:func:`undo` removes the finder and the stand-in's entries from
``sys.modules`` and puts any real nnsight modules back.  Libraries imported
while the stand-in was on keep the seethrough objects they imported.

Nothing here runs at ``import seethrough``; only :func:`activate` (called by
``import seethrough.stand_in`` and ``seethrough.stand_in_for_nnsight()``)
changes the import system.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
import warnings
from typing import Any

__all__ = ["COUNTERPARTS", "StandIn", "activate", "counterpart", "is_active", "undo"]

# nnsight module tree -> seethrough module tree (the rest of the dotted name is kept).
COUNTERPARTS: dict[str, str] = {
    "nnsight": "seethrough.nnsight",
    "nnsight.intervention": "seethrough.intervention",
    "nnsight.tracing": "seethrough.intervention.tracing",  # nnsight 0.8's layout
    "nnsight.modeling": "seethrough.modeling",
    "nnsight.ndif": "seethrough.ndif",
}
_TOP = "nnsight"
_LOCK = threading.RLock()
_STATE: dict[str, Any] = {"finder": None, "aside": {}}


def counterpart(name: str) -> str | None:
    """The seethrough module the nnsight module ``name`` resolves to, or None
    when ``name`` is outside the trees seethrough provides."""
    if name in COUNTERPARTS:
        return COUNTERPARTS[name]
    for prefix in sorted(COUNTERPARTS, key=len, reverse=True):
        if prefix != _TOP and name.startswith(prefix + "."):
            return COUNTERPARTS[prefix] + name[len(prefix):]
    return None


def _missing(name: str) -> ModuleNotFoundError:
    provided = ", ".join(sorted(COUNTERPARTS))
    return ModuleNotFoundError(
        f"No module named {name!r}: seethrough stands in for nnsight in this process (seethrough.stand_in) and "
        f"has no counterpart of {name}. It provides {provided} and the modules below them that seethrough has. "
        "Use the seethrough equivalent, or call seethrough.stand_in.undo() before importing code that needs the "
        "real nnsight.",
        name=name,
    )


class _AliasLoader(importlib.abc.Loader):
    """Loads an nnsight name as the seethrough module it stands for (the same object)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        try:
            module = importlib.import_module(self.target)
        except ModuleNotFoundError as error:
            if error.name == self.target:
                raise _missing(spec.name) from None
            raise
        self._spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system set `module.__spec__` to the nnsight spec: the module stays seethrough's own.
        module.__spec__ = self._spec


class _Finder(importlib.abc.MetaPathFinder):
    """Answers imports of ``nnsight`` and ``nnsight.<x>`` while the stand-in is on."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TOP and not fullname.startswith(_TOP + "."):
            return None
        name = counterpart(fullname)
        if name is None:
            raise _missing(fullname)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(name))

    def __repr__(self) -> str:
        return "<seethrough stand-in for nnsight>"


def is_active() -> bool:
    """Whether ``import nnsight`` gives seethrough in this process."""
    finder = _STATE["finder"]
    return finder is not None and finder in sys.meta_path


def _nnsight_names() -> list[str]:
    return [name for name in list(sys.modules) if name == _TOP or name.startswith(_TOP + ".")]


def _is_ours(name: str) -> bool:
    """Is ``sys.modules[name]`` (an nnsight name) the seethrough module standing
    in for it — the very object, not a module that merely looks like it?"""
    target = counterpart(name)
    return target is not None and name in sys.modules and sys.modules.get(target) is sys.modules[name]


def activate() -> "StandIn":
    """Switch the stand-in on (idempotent); returns a handle whose ``undo()``
    (or the end of a ``with`` block) switches it off."""
    with _LOCK:
        if not is_active():
            real = {name: sys.modules.pop(name) for name in _nnsight_names() if not _is_ours(name)}
            if real:
                _STATE["aside"].update(real)
                warnings.warn(
                    f"seethrough stands in for nnsight from now on, but the real nnsight was already imported "
                    f"({len(real)} module(s), e.g. {sorted(real)[0]!r}); it is set aside, and code that imported it "
                    "before keeps using it. Switch the stand-in on before importing libraries built on nnsight.",
                    stacklevel=3,
                )
            finder = _Finder()
            _STATE["finder"] = finder
            sys.meta_path.insert(0, finder)
            importlib.invalidate_caches()
    return StandIn()


def undo() -> None:
    """Switch the stand-in off: ``import nnsight`` finds the real package again
    (if installed); the real nnsight modules set aside at switch-on come back."""
    with _LOCK:
        finder = _STATE["finder"]
        if finder is not None and finder in sys.meta_path:
            sys.meta_path.remove(finder)
        _STATE["finder"] = None
        for name in _nnsight_names():
            if _is_ours(name):
                del sys.modules[name]
        aside = _STATE["aside"]
        for name, module in aside.items():
            sys.modules.setdefault(name, module)
        aside.clear()
        importlib.invalidate_caches()


class StandIn:
    """The handle :func:`activate` returns: ``undo()``, or use it as a context
    manager (``with seethrough.stand_in_for_nnsight(): import nnterp``) to
    switch the stand-in off at the end of the block."""

    @property
    def active(self) -> bool:
        return is_active()

    def undo(self) -> None:
        undo()

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        undo()

    def __repr__(self) -> str:
        return f"<seethrough stand-in for nnsight: {'on' if is_active() else 'off'}>"
