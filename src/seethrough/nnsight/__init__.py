"""The ``nnsight`` package as seethrough stands in for it.

With the stand-in switched on (``import seethrough.stand_in``, see
:mod:`seethrough.stand_in`), ``import nnsight`` gives this module: nnsight
0.8's top-level names, each seethrough's own object.

* ``LanguageModel``, ``NNsight`` (= :class:`seethrough.Model`),
  ``TransformersModel`` (= ``LanguageModel``), ``Envoy``;
* ``save`` (:func:`seethrough.save`), ``Object`` (the type hint of a traced
  value), ``CONFIG`` (:data:`seethrough.CONFIG`);
* ``register`` (:func:`seethrough.register`: a local module whose functions
  and classes travel to the server with remote requests);
* ``__version__``: ``"0.8.1+seethrough.<seethrough version>"``, the nnsight
  release whose behaviour seethrough follows, marked as seethrough's (a valid
  version: libraries that compare it with ``packaging`` see 0.8.1).

Any other name raises ``AttributeError`` saying the stand-in lacks it.  The
module can also be imported directly, without the switch:
``import seethrough.nnsight as nnsight``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .._version import __version__ as _seethrough_version
from ..config import CONFIG
from ..envoy import Envoy
from ..intervention.tracing.hint import Object
from ..models.language import LanguageModel
from ..models.model import Model as NNsight
from ..remote.client.registry import register
from ..tracing.runtime import save

NNSIGHT_VERSION = "0.8.1"  # the nnsight release whose public behaviour seethrough follows
__version__ = f"{NNSIGHT_VERSION}+seethrough.{_seethrough_version.replace('+', '.').replace('-', '.')}"
TransformersModel = LanguageModel

__all__ = ["CONFIG", "Envoy", "LanguageModel", "NNsight", "Object", "TransformersModel", "register", "save"]


# nnsight's subpackages, reachable as attributes as after `import nnsight` (seethrough's counterparts).
_SUBMODULES = {"intervention": "seethrough.intervention", "tracing": "seethrough.intervention.tracing",
               "modeling": "seethrough.modeling", "ndif": "seethrough.ndif"}


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(
        f"module 'nnsight' has no attribute {name!r}: seethrough stands in for nnsight here "
        f"(seethrough.stand_in) and provides {', '.join(__all__)}, plus the modules nnsight.intervention, "
        "nnsight.tracing, nnsight.modeling and nnsight.ndif. Use the seethrough equivalent, or undo the switch "
        "(seethrough.stand_in.undo()) before importing code that needs the real nnsight."
    )
