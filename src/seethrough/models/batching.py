"""Turning the inputs of several invokes into one batch (generic models).

Each invoke's ``(args, kwargs)`` is prepared on its own (moved to the model's
device, its number of rows counted); then tensors at the same position are
concatenated along the first dimension.  Anything that is not a tensor must be
the same in every invoke.  Language models override these steps (tokenizing
and padding text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BatchError


@dataclass
class PreparedInput:
    """One invoke's inputs, ready to batch."""

    args: tuple
    kwargs: dict
    rows: int


def count_rows(args: tuple, kwargs: dict) -> int:
    """The batch size of the first tensor found in the inputs (1 if none)."""
    for value in (*args, *kwargs.values()):
        rows = _first_rows(value)
        if rows is not None:
            return rows
    return 1


def _first_rows(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else 1
    if isinstance(value, (list, tuple)):
        for item in value:
            rows = _first_rows(item)
            if rows is not None:
                return rows
    if isinstance(value, dict):
        for item in value.values():
            rows = _first_rows(item)
            if rows is not None:
                return rows
    return None


def to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device) if value.device != device else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def concat_inputs(prepared: list[PreparedInput]) -> tuple[tuple, dict]:
    """One ``(args, kwargs)`` for the whole batch."""
    first = prepared[0]
    for item in prepared[1:]:
        if len(item.args) != len(first.args) or set(item.kwargs) != set(first.kwargs):
            raise BatchError(
                "invokes must pass the same arguments to be batched: one has "
                f"{len(first.args)} positional and {sorted(first.kwargs)} keyword arguments, "
                f"another {len(item.args)} and {sorted(item.kwargs)}."
            )
    args = tuple(
        _concat([item.args[i] for item in prepared], f"positional argument {i}")
        for i in range(len(first.args))
    )
    kwargs = {key: _concat([item.kwargs[key] for item in prepared], f"argument `{key}`") for key in first.kwargs}
    return args, kwargs


def _concat(values: list[Any], what: str) -> Any:
    head = values[0]
    if isinstance(head, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise BatchError(f"{what} is a tensor in one invoke and not in another; pass the same kinds of input.")
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1 or any(v.dim() == 0 for v in values):
            raise BatchError(
                f"{what} cannot be batched: invokes pass tensors of shapes "
                f"{[tuple(v.shape) for v in values]}, which differ after the first (batch) dimension. "
                "Pad them to one shape, or run them in separate traces."
            )
        return torch.cat(values, dim=0)
    if isinstance(head, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in head):
        return type(head)(_concat([v[i] for v in values], f"{what}[{i}]") for i in range(len(head)))
    if isinstance(head, dict) and any(isinstance(v, torch.Tensor) for v in head.values()):
        return {k: _concat([v[k] for v in values], f"{what}[{k!r}]") for k in head}
    for other in values[1:]:
        if other is not head and other != head:
            raise BatchError(
                f"{what} differs between invokes ({head!r} vs {other!r}); only tensors can differ "
                "between invokes of one trace. Use separate traces for different settings."
            )
    return head
