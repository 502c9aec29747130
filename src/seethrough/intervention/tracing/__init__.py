"""nnsight's ``tracing`` paths: ``nnsight.intervention.tracing`` (0.5 to 0.7)
and ``nnsight.tracing`` (0.8), for code (and libraries, through
:mod:`seethrough.stand_in`) that import from them.

* :mod:`.globals` — ``save`` and ``Object`` (nnsight 0.5–0.7 import them from
  ``nnsight.intervention.tracing.globals``; 0.8 from ``nnsight.tracing.globals``);
* :mod:`.hint` — ``Object``, the type of a value read in a trace, for hints
  (nnsight 0.8's ``nnsight.tracing.hint``).
"""

from .globals import Object, save

__all__ = ["Object", "save"]
