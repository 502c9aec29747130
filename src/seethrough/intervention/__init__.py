"""nnsight's import paths, for code ported from nnsight.

Research code imports from ``nnsight.intervention...``; after changing the
import to ``seethrough.intervention...`` the same names are there.  Every name
is seethrough's own class under nnsight's path, not a second implementation:

* ``seethrough.intervention.envoy.Envoy`` — :class:`seethrough.Envoy`
  (subclass it for custom envoys; see ``envoys=`` on the wrappers);
* ``seethrough.intervention.interleaver.OutOfOrderError`` /
  ``MissedProviderError`` — the errors of :mod:`seethrough.errors`;
* ``seethrough.intervention.interleaver.Mediator`` — the body of one invoke
  (nnsight's mediator), carrying ``Mediator.OutOfOrderError`` and
  ``Mediator.MissedProviderError`` for ``except`` clauses;
* ``seethrough.intervention.interleaver.Interleaver``.
"""

from .envoy import Envoy
from .interleaver import Interleaver, Mediator, MissedProviderError, OutOfOrderError

__all__ = ["Envoy", "Interleaver", "Mediator", "MissedProviderError", "OutOfOrderError"]
