"""What survives a trace: the save registry and the hand-back of names.

Inside a trace, ``.save()`` marks values to keep.  When the trace ends, each
name the body assigned is handed back to the caller's scope as follows:

* saved values, and lists / tuples / dicts holding them, come back as they are:
  a saved tensor is the live tensor the forward (or the body) produced, the
  same object, autograd graph included when grad is enabled (as a plain
  forward gives), so ``lg.sum().backward()`` after the trace trains the
  parameters.  Being the live tensor, it shows later in-place edits of that
  value (``.clone().save()`` keeps a snapshot).  ``keep_graph=False`` on the
  trace (or on one ``save``) detaches saved tensors when the trace ends, which
  frees the graph at once;
* plain data (numbers, strings, ``None``, containers of those, functions and
  other non-tensor objects) comes back as is;
* a tensor (or model output) that was not saved comes back as a
  :class:`NotSaved` placeholder that says how to fix the trace when used.

This is also exactly what a remote run can send back, so local and remote
runs of the same code leave the same names behind.

The library itself keeps nothing of a trace alive: once the trace has ended,
the graph behind a saved tensor lives exactly as long as the user's reference
to that tensor (no cycles, no registry, no hooks left on it).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import NotSavedError
from .runtime import ours
from .values import SavableTuple

_MAX_WALK = 10_000  # elements inspected per container before giving up on precision


class SaveRegistry:
    """The values saved in one trace (strong references until the trace ends)."""

    __slots__ = ("_saved", "keep_graph", "_detach", "_decorated")

    def __init__(self, keep_graph: bool = True) -> None:
        self._saved: dict[int, Any] = {}
        self._detach: set[int] = set()  # ids of saved values to detach at the end
        self._decorated: list[Any] = []
        self.keep_graph = keep_graph

    def add(self, value: Any, keep_graph: bool | None = None) -> Any:
        """Keep ``value``; ``keep_graph`` (default: the trace's) says whether a
        tensor in it keeps its autograd graph after the trace."""
        self._saved[id(value)] = value
        keep = self.keep_graph if keep_graph is None else keep_graph
        if keep:
            self._detach.discard(id(value))
        elif type(value) is not torch.Tensor or value.grad_fn is not None:
            self._detach.add(id(value))  # finish() has something to detach
        return value

    def __contains__(self, value: Any) -> bool:
        return id(value) in self._saved

    def __len__(self) -> int:
        return len(self._saved)

    def values(self) -> list[Any]:
        return list(self._saved.values())

    def decorate(self, value: Any) -> Any:
        """Give a mapping output (e.g. a HuggingFace ``ModelOutput``) a ``.save()``
        for the duration of the trace."""
        if isinstance(value, dict) and hasattr(value, "__dict__") and not hasattr(value, "save"):
            registry = self

            @ours
            def save_output() -> Any:
                return registry.add(value)

            try:
                object.__setattr__(value, "save", save_output)
            except (AttributeError, TypeError):
                return value
            self._decorated.append(value)
        return value

    def release(self) -> None:
        for value in self._decorated:
            value.__dict__.pop("save", None)
        self._decorated.clear()
        self._saved.clear()
        self._detach.clear()

    # -- end of trace -----------------------------------------------------
    def finish(self) -> dict[int, Any]:
        """Detach the saved values that were saved with ``keep_graph=False``.

        Returns a map from the id of each saved object that had to be replaced
        (views cannot be detached in place) to its replacement."""
        replaced: dict[int, Any] = {}
        if not self._detach:
            return replaced
        for key in list(self._detach):
            value = self._saved[key]
            new = _detached(value)
            if new is not value:
                replaced[key] = new
                self._saved[id(new)] = new
        return replaced


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.grad_fn is None:
            return value  # leaves (weights, inputs) are not ours to change
        if value._base is None and not value.is_inference():
            value.detach_()
            return value
        return value.detach()
    if isinstance(value, dict):
        for key, item in list(value.items()):
            new = _detached(item)
            if new is not item:
                value[key] = new
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            new = _detached(item)
            if new is not item:
                value[index] = new
        return value
    if isinstance(value, tuple):
        items = [_detached(item) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return tuple(value) if type(value) is SavableTuple else value
        if hasattr(value, "_fields"):
            return type(value)(*items)
        return tuple(items)
    return value


class LazyText:
    """Text computed on first use (locations for messages that are rarely shown)."""

    __slots__ = ("_make", "_text")

    def __init__(self, make: Any) -> None:
        self._make = make
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._make()
            self._make = None
        return self._text

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


class NotSaved:
    """Stands in for a value that was computed in a trace but not saved.

    Any use raises :class:`NotSavedError` with the fix; ``repr`` says the same
    without raising, so printing it in a notebook explains itself."""

    __slots__ = ("_name", "_where", "_line")

    def __init__(self, name: str, where: Any, line: int | None = None) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_line", line)  # where the body assigned it, when known

    def _error(self) -> NotSavedError:
        assigned = f" (assigned on line {self._line})" if self._line is not None else ""
        return NotSavedError(
            f"`{self._name}` was computed inside the trace {self._where}{assigned} but not saved, so it "
            "was not kept. To use it after the trace, save it inside the trace: add `.save()` "
            f"where it is computed{' (line ' + str(self._line) + ')' if self._line is not None else ''}, "
            f"or call `seethrough.save({self._name})`."
        )

    def save(self) -> Any:  # `x.save()` on it must not pass the placeholder on quietly
        raise self._error()

    def __repr__(self) -> str:
        assigned = f", line {self._line}" if self._line is not None else ""
        return f"<not saved: `{self._name}` from the trace {self._where}{assigned}; use .save() inside the trace>"

    def __getattr__(self, name: str) -> Any:
        raise self._error()

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._error()

    def __bool__(self) -> bool:
        raise self._error()

    def __len__(self) -> int:
        raise self._error()

    def __iter__(self) -> Any:
        raise self._error()

    def __getitem__(self, key: Any) -> Any:
        raise self._error()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise self._error()


def _raiser(name: str) -> Any:
    def method(self: NotSaved, *args: Any) -> Any:
        raise self._error()

    method.__name__ = name
    return method


for _op in (
    "add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv matmul rmatmul mod pow "
    "neg pos abs lt le gt ge float int index"
).split():
    setattr(NotSaved, f"__{_op}__", _raiser(f"__{_op}__"))


def hand_back(
    name: str, value: Any, saves: SaveRegistry, replaced: dict[int, Any], where: Any,
    line: int | None = None, in_session: list[str] | None = None,
) -> Any:
    """The value a name gets in the caller's scope after the trace (see module
    doc).  ``in_session`` (a trace inside a local ``model.session()``): unsaved
    values come back as they are, for the session's later traces, and their
    names are appended to the list (the session drops them when it ends)."""
    if id(value) in replaced:
        return replaced[id(value)]
    verdict = _scan(value, saves, [_MAX_WALK])
    if in_session is not None and verdict in ("unsaved", "mixed"):
        in_session.append(name)
        return _substitute(value, replaced) if replaced else value
    if verdict == "unsaved":
        return NotSaved(name, where, line)
    if verdict == "mixed":
        return _replace_unsaved(value, saves, replaced, name, where, line)
    if verdict == "saved" and replaced:
        value = _substitute(value, replaced)
    if type(value) is SavableTuple:
        return tuple(value)
    return value


def _substitute(value: Any, replaced: dict[int, Any]) -> Any:
    """Swap replaced (detached) saved values inside a container, in place where
    the container is mutable."""
    if id(value) in replaced:
        return replaced[id(value)]
    if isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = _substitute(item, replaced)
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            value[key] = _substitute(item, replaced)
    elif type(value) in (tuple, SavableTuple):
        items = tuple(_substitute(item, replaced) for item in value)
        if any(a is not b for a, b in zip(items, value)):
            return items
    return value


def _scan(value: Any, saves: SaveRegistry | None, budget: list[int]) -> str:
    """'plain' (no tensors), 'saved' (all tensors saved), 'unsaved' or 'mixed'."""
    budget[0] -= 1
    if type(value) is torch.Tensor:  # the common case first
        return "saved" if saves is not None and id(value) in saves._saved else "unsaved"
    if budget[0] < 0:
        return "plain"
    if saves is not None and value in saves:
        return "saved"
    if isinstance(value, torch.Tensor):
        return "unsaved"
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None))):
        return "plain"
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        return "plain"
    seen: set[str] = set()
    for item in items:
        seen.add(_scan(item, saves, budget))
        if "mixed" in seen or ("unsaved" in seen and "saved" in seen):
            return "mixed"
    if "unsaved" in seen:
        # A dict that is itself a model output left unsaved counts as unsaved.
        return "unsaved" if "saved" not in seen else "mixed"
    return "saved" if "saved" in seen else "plain"


def _replace_unsaved(value: Any, saves: SaveRegistry, replaced: dict[int, Any], name: str, where: Any,
                     line: int | None = None) -> Any:
    """A copy of a container in which unsaved tensors became placeholders."""
    if id(value) in replaced:
        return replaced[id(value)]
    if value in saves:
        return value
    if isinstance(value, torch.Tensor):
        return NotSaved(f"{name}[...]", where, line)
    if isinstance(value, dict):
        return {k: _replace_unsaved(v, saves, replaced, f"{name}[{k!r}]", where, line) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_replace_unsaved(v, saves, replaced, f"{name}[{i}]", where, line) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value
