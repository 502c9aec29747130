"""nnsight's ``tracing.globals`` path: ``save`` and ``Object``.

``save`` is :func:`seethrough.save`; ``Object`` is the type hint of
:mod:`.hint`.  (nnsight's ``Globals`` bookkeeping has no counterpart: a
seethrough trace keeps its state on the running trace, not in globals.)
"""

from ...tracing.runtime import save
from .hint import Object

__all__ = ["Object", "save"]
