"""The switch: ``import seethrough.stand_in`` makes seethrough stand in for nnsight.

.. code-block:: python

    import seethrough.stand_in          # from here on, `import nnsight` gives seethrough
    from nnterp import StandardizedTransformer   # a library built on nnsight, unchanged

    model = StandardizedTransformer("gpt2")
    ...
    seethrough.stand_in.undo()          # `import nnsight` finds the real package again

Importing this module switches the stand-in on (it is the only thing that
does, besides ``seethrough.stand_in_for_nnsight()``, which returns a handle
that also works as a ``with`` block).  After :func:`undo`, switch it on again
with :func:`activate` (re-importing this module does nothing: Python imports a
module once).  What resolves to what, and what happens to a real nnsight
imported earlier: :mod:`seethrough._stand_in`.
"""

from ._stand_in import COUNTERPARTS, StandIn, activate, counterpart, is_active, undo

__all__ = ["COUNTERPARTS", "StandIn", "activate", "counterpart", "is_active", "undo"]

activate()
