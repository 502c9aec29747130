"""``seethrough.intervention.envoy``: nnsight's path to :class:`~seethrough.envoy.Envoy`.

``from seethrough.intervention.envoy import Envoy`` gives seethrough's own
envoy class (the same object as ``seethrough.Envoy``), to subclass for custom
envoys given to a wrapper with ``envoys=``.
"""

from ..envoy import Envoy

__all__ = ["Envoy"]
