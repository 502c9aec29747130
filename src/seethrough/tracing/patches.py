"""Patches that exist only while a trace runs, and are always taken back.

* ``torch.Tensor.save`` (so ``h = module.output.save()`` works on the real
  tensor) and ``torch.Tensor.backward`` (so ``with loss.backward():`` can
  pause at each gradient) are installed when the first trace of the process
  starts and removed when the last one ends (reference-counted, thread-safe).
* ``module.forward`` is wrapped, per module and per trace, only when a body
  calls ``.skip(...)`` on it.

Nothing is patched at import.  Each patch checks that it is being called from
a running trace on the calling thread, and otherwise behaves exactly like
the original.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from .runtime import current_task, tensor_save

_lock = threading.Lock()
_save_users = 0
_backward_users = 0
_original_backward = torch.Tensor.backward


def enter_save_patch() -> None:
    """Install ``Tensor.save`` while a trace runs (reference-counted)."""
    global _save_users
    with _lock:
        _save_users += 1
        if _save_users == 1:
            torch.Tensor.save = tensor_save  # type: ignore[attr-defined]


def exit_save_patch() -> None:
    global _save_users
    with _lock:
        _save_users -= 1
        if _save_users == 0 and "save" in torch.Tensor.__dict__:
            del torch.Tensor.save  # type: ignore[attr-defined]


def enter_backward_patch() -> None:
    """Install the ``Tensor.backward`` wrapper.  Only traces whose bodies
    mention ``backward`` do: each patch of the Tensor class costs every tensor
    attribute lookup a cache refill."""
    global _backward_users
    with _lock:
        _backward_users += 1
        if _backward_users == 1:
            torch.Tensor.backward = _backward  # type: ignore[method-assign]


def exit_backward_patch() -> None:
    global _backward_users
    with _lock:
        _backward_users -= 1
        if _backward_users == 0:
            torch.Tensor.backward = _original_backward  # type: ignore[method-assign]


def _backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.backward`` while traces run: inside a trace body and used as
    ``with loss.backward():``, a context that pauses at each gradient; anywhere
    else, the ordinary backward pass."""
    task = current_task()
    if task is not None:
        from .backward import BackwardContext, used_in_with

        if used_in_with():
            return BackwardContext(task, self, args, kwargs)
    return _original_backward(self, *args, **kwargs)


_MISSING = object()


class ForwardSkip:
    """Wraps one module's ``forward`` for one trace so that a body can skip it."""

    __slots__ = ("module", "_previous", "_thread", "replacement", "rows_value")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._previous = module.__dict__.get("forward", _MISSING)
        self._thread = threading.get_ident()
        self.replacement: Callable[[Callable, tuple, dict], Any] | None = None
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            replacement = self.replacement
            if replacement is None or threading.get_ident() != self._thread:
                return original(*args, **kwargs)
            self.replacement = None  # one call only
            return replacement(original, args, kwargs)

        module.forward = forward  # type: ignore[method-assign]

    def restore(self) -> None:
        if self._previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._previous  # type: ignore[method-assign]
        self.replacement = None
