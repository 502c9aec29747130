"""Values seen by an invoke: narrowing to its rows, splicing edits back, ``.save()``.

All invokes of a trace share one batched forward pass.  Each invoke sees only
its own rows: tensors whose first dimension is the batch are narrowed to a view
of those rows (so in-place edits reach the running forward), and structures
(tuples, lists, dicts, HuggingFace ``ModelOutput``) are narrowed element by
element.  Assigning a new value for an invoke splices it into its rows of the
batched value, after checking that the shapes agree.

When autograd is on, the views handed to invokes are put back on the path of
the forward pass (:func:`rejoin`): the batched value the forward continues
with is rebuilt from them, so gradients reach each invoke's own tensor
(``h.grad``, ``h.retain_grad()``, ``h.requires_grad_()`` behave as on an
unbatched forward).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..errors import AssignTypeError, ShapeMismatchError
from .runtime import ours


# id(batched tensor) -> (batched tensor, [(rows, view handed out), ...])
Handed = dict[int, tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]]


def narrow(value: Any, rows: slice | None, batch_size: int, handed: Handed | None = None) -> Any:
    """``value`` restricted to ``rows`` of the batch (views, not copies).

    With ``handed``, each view made is noted there (for :func:`rejoin`)."""
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch_size:
            view = value[rows]
            if handed is not None:
                entry = handed.get(id(value))
                if entry is None:
                    handed[id(value)] = (value, [(rows, view)])
                else:
                    entry[1].append((rows, view))
            return view
        return value
    if isinstance(value, (tuple, list)):
        items = [narrow(v, rows, batch_size, handed) for v in value]
        return _rebuild_sequence(value, items)
    if isinstance(value, dict):
        return _rebuild_mapping(value, {k: narrow(v, rows, batch_size, handed) for k, v in value.items()})
    return value


def rejoin(value: Any, handed: Handed) -> Any:
    """``value`` with each batched tensor of which invokes hold views (that
    take part in autograd) rebuilt from those views.

    An invoke's view ``full[rows]`` is not itself on the gradient path of the
    forward pass, which goes on with ``full``: rebuilding ``full`` as the
    concatenation of the views (and of the rows no invoke holds) puts every
    view on it, with the same numbers.  In-place edits made through the views
    so far are part of the result (views share storage with ``full``)."""
    if isinstance(value, torch.Tensor):
        entry = handed.get(id(value))
        if entry is None or entry[0] is not value:
            return value
        views = entry[1]
        if not any(view.requires_grad for _, view in views):
            return value
        if any(view.shape[1:] != value.shape[1:] or view.shape[0] != rows.stop - rows.start for rows, view in views):
            return value  # reshaped in place by a body: no longer rows of this value
        parts: list[torch.Tensor] = []
        done = 0
        for rows, view in sorted(views, key=lambda item: item[0].start):
            if rows.start < done:
                continue  # the same rows handed twice: the first view carries them
            if rows.start > done:
                parts.append(value[done : rows.start])
            parts.append(view)
            done = rows.stop
        if done < value.shape[0]:
            parts.append(value[done:])
        return torch.cat(parts, dim=0)
    if isinstance(value, (tuple, list)):
        items = [rejoin(v, handed) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return _rebuild_sequence(value, items)
    if isinstance(value, dict):
        items = {k: rejoin(v, handed) for k, v in value.items()}
        if all(items[k] is value[k] for k in value):
            return value
        return _rebuild_mapping(value, items)
    return value


def splice(full: Any, rows: slice | None, new: Any, batch_size: int, what: str) -> Any:
    """The batched value ``full`` with ``rows`` replaced by ``new``.

    ``rows=None`` replaces the whole value.  Tensors must have (or broadcast
    to) the shape of what they replace; structures must match element by
    element."""
    if rows is None:
        return _replace(full, new, what)
    if isinstance(full, torch.Tensor):
        if full.dim() == 0 or full.shape[0] != batch_size:
            return _replace(full, new, what)  # not batched: shared by all rows
        target = full[rows]
        new_rows = _conform(target, new, what)
        if new_rows is target:
            return full
        return torch.cat([full[: rows.start], new_rows.to(full.dtype), full[rows.stop :]], dim=0)
    if isinstance(full, (tuple, list)):
        _check_same_length(full, new, what)
        items = [splice(f, rows, n, batch_size, f"{what}[{i}]") for i, (f, n) in enumerate(zip(full, new))]
        return _rebuild_sequence(full, items)
    if isinstance(full, dict):
        _check_same_keys(full, new, what)
        return _rebuild_mapping(
            full, {k: splice(full[k], rows, new[k], batch_size, f"{what}[{k!r}]") for k in full}
        )
    return new


def _replace(old: Any, new: Any, what: str) -> Any:
    if isinstance(old, torch.Tensor):
        return _conform(old, new, what)
    if isinstance(old, (tuple, list)):
        _check_same_length(old, new, what)
        items = [_replace(o, n, f"{what}[{i}]") for i, (o, n) in enumerate(zip(old, new))]
        return _rebuild_sequence(new if type(new) is not type(old) else old, items)
    return new


def _conform(target: torch.Tensor, new: Any, what: str) -> torch.Tensor:
    """``new`` as a tensor of ``target``'s shape (broadcasting numbers and
    smaller tensors), or a :class:`ShapeMismatchError`."""
    if new is target:
        return target
    if not isinstance(new, torch.Tensor):
        if isinstance(new, (int, float, bool)):
            return torch.full_like(target, new)
        raise AssignTypeError(
            f"cannot assign a {type(new).__name__} to {what}, which is a tensor of shape "
            f"{tuple(target.shape)}: assign a tensor (or a number)."
        )
    if new.shape == target.shape:
        return new.to(device=target.device) if new.device != target.device else new
    try:
        expanded = torch.broadcast_to(new, target.shape)
    except RuntimeError:
        raise ShapeMismatchError(
            f"cannot assign a tensor of shape {tuple(new.shape)} to {what}, which has shape "
            f"{tuple(target.shape)}: the new value must have that shape (or broadcast to it)."
        ) from None
    return expanded.to(device=target.device).clone()


def _check_same_length(full: Any, new: Any, what: str) -> None:
    if not isinstance(new, (tuple, list)) or len(new) != len(full):
        got = f"a {type(new).__name__} of length {len(new)}" if isinstance(new, (tuple, list)) else f"a {type(new).__name__}"
        raise ShapeMismatchError(
            f"cannot assign {got} to {what}, which is a {type(full).__name__} of length "
            f"{len(full)}: assign the same structure (or edit one element, e.g. `{what}[0][:] = ...`)."
        )


def _check_same_keys(full: dict, new: Any, what: str) -> None:
    if not isinstance(new, dict) or set(new) != set(full):
        raise ShapeMismatchError(
            f"cannot assign {type(new).__name__} to {what}, a mapping with keys {sorted(map(str, full))}: "
            "assign a mapping with the same keys."
        )


def _rebuild_sequence(original: Any, items: list) -> Any:
    if isinstance(original, list):
        return items
    kind = type(original)
    if kind is tuple or kind is SavableTuple:
        return tuple(items)
    if hasattr(original, "_fields"):  # namedtuple
        return kind(*items)
    try:
        return kind(items)
    except TypeError:
        return tuple(items)


def _rebuild_mapping(original: dict, items: dict) -> Any:
    kind = type(original)
    if kind is dict:
        return items
    if kind is OrderedDict:
        return OrderedDict(items)
    try:  # HuggingFace ModelOutput and other dataclass-like mappings
        return kind(**items)
    except TypeError:
        return dict(items)


class SavableTuple(tuple):
    """A tuple (e.g. a module output) that can be ``.save()``-d inside a trace."""

    __slots__ = ()

    @ours
    def save(self) -> "SavableTuple":
        from .runtime import save

        return save(self)


def savable(value: Any) -> Any:
    """``value`` as handed to the user: with a ``.save()`` method where possible.

    Tensors get theirs from a patch that lives only while a trace runs; plain
    tuples become :class:`SavableTuple`; mapping outputs (HuggingFace
    ``ModelOutput``) get an instance attribute removed when the trace ends."""
    if isinstance(value, torch.Tensor):
        return value
    if type(value) is tuple:
        return SavableTuple(value)
    return value
