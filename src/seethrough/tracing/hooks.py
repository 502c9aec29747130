"""Adding and removing module hooks cheaply.

``register_forward_hook`` builds a handle with weak references for every
hook (several microseconds each); a trace adds and removes its hooks within
one call, so it writes the entries straight into the module's hook
dictionaries, using ids from the same counter as PyTorch's own handles, and
deletes exactly those entries afterwards.  Where a PyTorch version lacks those
dictionaries, the public API is used instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle

_DIRECT = all(
    hasattr(torch.nn.Module(), name)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
)


def _next_id() -> int:
    hook_id = RemovableHandle.next_id
    RemovableHandle.next_id = hook_id + 1
    return hook_id


class HookSet:
    """The hooks one trace added; :meth:`remove_all` takes every one of them away."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[tuple[torch.nn.Module, str, Any]] = []

    def add_output(self, module: torch.nn.Module, hook: Callable) -> None:
        if _DIRECT:
            hook_id = RemovableHandle.next_id
            RemovableHandle.next_id = hook_id + 1
            module._forward_hooks[hook_id] = hook
            self._entries.append((module, "output", hook_id))
        else:  # older/newer PyTorch layouts (tests/test_hooks.py forces this path)
            self._entries.append((module, "handle", module.register_forward_hook(hook)))

    def add_input(self, module: torch.nn.Module, hook: Callable) -> None:
        """``hook(module, args, kwargs)`` before the module runs."""
        if _DIRECT:
            hook_id = _next_id()
            module._forward_pre_hooks[hook_id] = hook
            module._forward_pre_hooks_with_kwargs[hook_id] = True
            self._entries.append((module, "input", hook_id))
        else:
            self._entries.append((module, "handle", module.register_forward_pre_hook(hook, with_kwargs=True)))

    def remove_all(self) -> None:
        entries, self._entries = self._entries, []
        for module, kind, key in entries:
            if kind == "output":
                module._forward_hooks.pop(key, None)
            elif kind == "input":
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            else:
                key.remove()
