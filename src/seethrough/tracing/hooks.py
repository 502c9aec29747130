"""Which modules to hook, and adding and removing hooks cheaply.

:class:`ModuleTree` works out a module's *hook plan*: hooking a module's
output also hooks every module containing it (see ``Interleaver.hook``).

``register_forward_hook`` builds a handle with weak references for every
hook (several microseconds each); a trace adds and removes its hooks within
one call, so it writes the entries straight into the module's hook
dictionaries, using ids from the same counter as PyTorch's own handles, and
deletes exactly those entries afterwards.  Where a PyTorch version lacks those
dictionaries, the public API is used instead (:class:`HandleHookSet`; both
behave the same, and both are tested).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.hooks import RemovableHandle

from .contract import HookPlan

_DIRECT = all(
    hasattr(torch.nn.Module(), name)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
)


class DirectHookSet:
    """The hooks one trace added; :meth:`remove_all` takes every one of them
    away.  Writes straight into the modules' hook dictionaries."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[tuple[dict, int, dict | None]] = []

    def add_outputs(self, modules: list[torch.nn.Module], hook: Callable) -> None:
        """``hook(module, args, output)`` after each of ``modules`` runs."""
        hook_id = RemovableHandle.next_id
        RemovableHandle.next_id = hook_id + len(modules)
        entries = self._entries
        for module in modules:
            hooks = module._forward_hooks
            hooks[hook_id] = hook
            entries.append((hooks, hook_id, None))
            hook_id += 1

    def add_input(self, module: torch.nn.Module, hook: Callable) -> None:
        """``hook(module, args, kwargs)`` before the module runs."""
        hook_id = RemovableHandle.next_id
        RemovableHandle.next_id = hook_id + 1
        module._forward_pre_hooks[hook_id] = hook
        module._forward_pre_hooks_with_kwargs[hook_id] = True
        self._entries.append((module._forward_pre_hooks, hook_id, module._forward_pre_hooks_with_kwargs))

    def remove_all(self) -> None:
        entries, self._entries = self._entries, []
        for hooks, hook_id, with_kwargs in entries:
            hooks.pop(hook_id, None)
            if with_kwargs is not None:
                with_kwargs.pop(hook_id, None)


class HandleHookSet:
    """The same through PyTorch's public API (``register_forward_hook``),
    for PyTorch versions without those dictionaries."""

    __slots__ = ("_handles",)

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add_outputs(self, modules: list[torch.nn.Module], hook: Callable) -> None:
        self._handles.extend(module.register_forward_hook(hook) for module in modules)

    def add_input(self, module: torch.nn.Module, hook: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def remove_all(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


def HookSet() -> DirectHookSet | HandleHookSet:  # noqa: N802 - it stands for the class it picks
    """The hook set of one trace: direct where PyTorch has the dictionaries."""
    return DirectHookSet() if _DIRECT else HandleHookSet()


class ModuleTree:
    """The containment tree under one root module, for hook plans.

    Worked out on first use and kept (a model wrapper keeps one across
    traces); a module not found in it (added to the model since) makes it
    read the tree again."""

    __slots__ = ("root", "_parents", "_ancestors", "_plans")

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self._parents: dict[int, list[torch.nn.Module]] | None = None
        # id(module) -> (module, value): the module is kept to check the id still names it
        self._ancestors: dict[int, tuple[torch.nn.Module, list[torch.nn.Module]]] = {}
        self._plans: dict[int, HookPlan] = {}

    def hook_plan(self, module: torch.nn.Module) -> HookPlan:
        """``(module, output key)`` for ``module`` and every module containing
        it, and whether they form one chain (each entry the only parent of
        the one before: then, in a tree, the entries after a hooked one are
        hooked too)."""
        found = self._plans.get(id(module))
        if found is not None and found[0][0][0] is module:
            return found
        plan = [(each, (id(each), "output")) for each in (module, *self.ancestors(module))]
        chain = all(len(self.ancestors(each)) == len(plan) - 1 - i for i, (each, _) in enumerate(plan))
        found = self._plans[id(module)] = (plan, chain)
        return found

    def ancestors(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Every module that (transitively) contains ``module``."""
        found_list = self._ancestors.get(id(module))
        if found_list is not None and found_list[0] is module:
            return found_list[1]
        parents = self._parents
        if parents is None or id(module) not in parents:
            parents = self._parents = {}
            for parent in self.root.modules():
                for child in parent._modules.values():
                    if child is not None:
                        parents.setdefault(id(child), []).append(parent)
            parents.setdefault(id(self.root), [])
        found: dict[int, torch.nn.Module] = {}
        stack = list(parents.get(id(module), ()))
        while stack:
            parent = stack.pop()
            if id(parent) not in found:
                found[id(parent)] = parent
                stack.extend(parents.get(id(parent), ()))
        result = list(found.values())
        self._ancestors[id(module)] = (module, result)
        return result
