"""``Object``: the type of a value read inside a trace, for type hints.

In a seethrough trace body ``model.layer.output`` *is* the activation: a real
``torch.Tensor`` (or the tuple, model output, ... the module returned).
nnsight names such values ``Object`` in annotations, e.g. nnterp's
``TraceTensor = Union[torch.Tensor, Object]``.  Here ``Object`` is a
``torch.Tensor`` subclass with nnsight's ``save`` method, so annotations that
use it read as "a tensor you may ``.save()``", and ``isinstance(x, Object)``
is true of nothing but such subclass instances (it is never made by
seethrough: values stay plain tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from ...tracing.runtime import save as _save

__all__ = ["Object"]


class Object(torch.Tensor):
    """A value read during a trace, as a type hint (tensor-like, with ``save``)."""

    def save(self, _: Any = 0) -> "Object":
        """Keep this value after the trace (``seethrough.save``); returns it."""
        return _save(self)
