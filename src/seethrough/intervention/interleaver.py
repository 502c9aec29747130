"""``seethrough.intervention.interleaver``: nnsight's path to the interleaver's names.

* ``OutOfOrderError`` — a value asked for after its module had run (also
  raised, as :class:`~seethrough.errors.ModuleNotCalledError`, for a module
  the model never called, as nnsight 0.8.1 does);
* ``MissedProviderError`` — a value the model never provided (an
  ``OutOfOrderError`` is one);
* ``Mediator`` — nnsight's name for the body of one invoke, seethrough's
  :class:`~seethrough.tracing.interleaver.Task`; ``Mediator.OutOfOrderError``
  and ``Mediator.MissedProviderError`` are the two errors above;
* ``Interleaver`` — seethrough's interleaver.

All are seethrough's own classes, not copies.
"""

from ..errors import MissedProviderError, OutOfOrderError
from ..tracing.interleaver import Interleaver
from ..tracing.tasks import Task as Mediator

__all__ = ["Interleaver", "Mediator", "MissedProviderError", "OutOfOrderError"]
