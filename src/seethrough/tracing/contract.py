"""What tracing needs from the layers above it, declared here.

The tracing package sits below the envoys and the model wrappers: it may not
import them.  It talks to them through these protocols instead, which
:class:`seethrough.envoy.Envoy` and :class:`seethrough.models.Model`
implement (checked by ``tests/test_contract.py``).  A wrapper of another
kind, or a test, can stand in with any object that has these members.

* :class:`ModuleHandle` — what the interleaver and a run read of an envoy:
  the module it stands for, its path, how to name it in messages.
* :class:`PersistentEdit` — what a run applies of an edit (``model.edit()``);
* :class:`TracedModel` — what a trace uses of a model wrapper: the root
  module, preparing and batching each invoke's inputs, the hook plan, the
  persistent edits, resolving ``tracer.cache(modules=...)``, and running a
  block remotely (``remote=True``: remote execution is a layer above).

The backends (what a trace calls on the batched inputs) are the wrapper's
business; a run only calls ``backend(run, args, kwargs)`` (see
:data:`.run.Backend`).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

# A hook plan: ``(module, its output event key)`` for a module and every
# module containing it, and whether they form one chain (each entry the only
# parent of the one before).  See :class:`.hooks.ModuleTree`.
HookPlan = tuple[list[tuple[torch.nn.Module, tuple]], bool]


@runtime_checkable
class ModuleHandle(Protocol):
    """What tracing reads of an envoy (``model.layers[0]``)."""

    _module: torch.nn.Module  # the module it stands for
    _path: str  # dotted path from the root ("" for the root)

    def _display_path(self) -> str:
        """The path as the user writes it (``model.layers[0].mlp``), for messages."""
        ...

    def _remembered_hook_plan(self, plan_of: Callable[[torch.nn.Module], HookPlan]) -> HookPlan:
        """The module's hook plan, ``plan_of(module)`` (the model's ``_hook_plan``),
        worked out once and remembered by the handle across traces.  (A handle
        whose values reach the trace otherwise, an operation of ``.source``,
        is never asked.)"""
        ...


class PlainNavigation(Protocol):
    """How runs of plain saves (:mod:`.prefetch`) find their envoys ahead of
    time: only by the envoys' own navigation, which runs no user code and
    reads no value (optional: objects without these are read the ordinary way)."""

    def _plain_paths(self, steps: tuple, items: Sequence[Any]) -> list | None:
        """The handle ``steps`` lead to from here for each of ``items``: each
        step a child or alias name (``str``), a constant index (``(i,)``) or
        ``None`` for the item as index; the handles must read values through
        the standard accessors.  None where getting to any of them would run
        anything else (a property of a custom envoy, an attribute of the module)."""
        ...

    def _plain_children(self) -> tuple | None:
        """What iterating this gives (a module list's children), or None
        where iterating would run anything but the library's own code."""
        ...


@runtime_checkable
class PreparedInputs(Protocol):
    """One invoke's inputs, ready for the forward (``_prepare_input``)."""

    args: tuple
    kwargs: dict
    rows: int  # how many rows of the batch they take


class PersistentEdit(Protocol):
    """A persistent edit as a run applies it (``model.edit()`` records a
    :class:`.run.EditSpec`): its captured body, and the namespaces it runs in."""

    captured: Any  # the edit's CapturedBlock (its code, the names it stores)
    globals: dict

    def namespace(self, model: Any) -> dict:
        """The namespace an application of the edit to ``model``'s run starts with."""
        ...


@runtime_checkable
class TracedModel(Protocol):
    """What a trace uses of a model wrapper (``seethrough.Model`` and subclasses)."""

    _module: torch.nn.Module  # the root module, the one the backend calls
    _edits: list[PersistentEdit]  # persistent edits (``model.edit()``), applied by every trace

    def _prepare_input(self, args: tuple, kwargs: dict) -> PreparedInputs:
        """One invoke's inputs as the forward takes them (tokenized, on the model's device)."""
        ...

    def _batch_inputs(self, prepared: list[Any]) -> tuple[tuple, dict]:
        """The prepared inputs of several invokes as one batch, in order."""
        ...

    def _hook_plan(self, module: torch.nn.Module) -> HookPlan:
        """The modules whose outputs are hooked together with ``module``'s."""
        ...

    def _resolve_modules(self, modules: Any) -> list[Any]:
        """Envoys (:class:`ModuleHandle`) for ``tracer.cache(modules=...)``:
        None (every module), envoys, or path strings."""
        ...

    def _child_path(self, path: str, name: str, index_only: bool = False) -> str | None:
        """The real path of ``name`` (a child, an index, an alias) under the
        module at ``path``; None if it names nothing (cache keys)."""
        ...

    def _run_remote(self, **request: Any) -> dict[str, Any]:
        """Run a captured block on a server (``remote=...``) and bind its values
        in the caller's frame; the request's keywords: ``options``, ``kind``,
        ``captured``, ``frame``, ``holder``, and for a trace ``args``,
        ``kwargs``, ``keep_graph``, ``generate``."""
        ...
