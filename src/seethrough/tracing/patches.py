"""Patches that exist only while a trace runs, and are always taken back.

* ``torch.Tensor.save`` (so that ``.save()`` works on a real tensor in code
  a body calls, where it is not rewritten) is installed when the first trace
  that may need it starts (see :mod:`.save_reach`) and removed when the last
  such trace ends; ``torch.Tensor.backward`` and
  ``Tensor.grad`` (see :mod:`.backward`) likewise, for the traces that need
  them.  All three are :class:`ClassPatch` objects: reference-counted,
  thread-safe, and restored exactly.
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

from .runtime import tensor_save
from .sentinels import MISSING


class ClassPatch:
    """One attribute of a class, replaced while at least one user needs it.

    Users are counted (thread-safe): the first :meth:`enter` installs
    ``value``, the last :meth:`exit` puts back what the class had before —
    its own attribute, or none (then the inherited one shows again).  Every
    ``enter`` must be matched by one ``exit``, also when a trace fails."""

    __slots__ = ("owner", "name", "value", "_users", "_before", "_lock")

    def __init__(self, owner: type, name: str, value: Any) -> None:
        self.owner = owner
        self.name = name
        self.value = value
        self._users = 0
        self._before: Any = MISSING
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._before = self.owner.__dict__.get(self.name, MISSING)
                setattr(self.owner, self.name, self.value)

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                before = self._before  # (replaced at the next first `enter`)
                if before is not MISSING:
                    setattr(self.owner, self.name, before)
                elif self.name in self.owner.__dict__:
                    delattr(self.owner, self.name)

    @property
    def users(self) -> int:
        """How many users hold the patch now (0: the class is as it was)."""
        return self._users


# `h = module.output.save()` on the real tensor, while a trace runs.
SAVE_PATCH = ClassPatch(torch.Tensor, "save", tensor_save)


class ForwardSkip:
    """Wraps one module's ``forward`` for one trace so that a body can skip it."""

    __slots__ = ("module", "_previous", "_thread", "replacement", "rows_value")

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._previous = module.__dict__.get("forward", MISSING)
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
        if self._previous is MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._previous  # type: ignore[method-assign]
        self.replacement = None
