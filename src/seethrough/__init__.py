"""seethrough: transparent access to the internals of any PyTorch model.

.. code-block:: python

    import seethrough

    model = seethrough.Model(my_module)          # any torch.nn.Module
    with model.trace(x) as tracer:
        h = model.layers[3].output.save()         # a real tensor once the trace ends
        model.layers[5].output[:] = 0             # edits change the running forward pass
    print(h.shape)

See the README for the tour: invokes (batching), generation, gradients,
caches, edits, sessions, and the nnsight-compatible names.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .config import CONFIG
from .envoy import Envoy
from .errors import (
    AssignTypeError,
    BatchError,
    CrossInvokeError,
    EnvoyClassError,
    InputTypeError,
    InvokeError,
    MissedProviderError,
    ModuleNotCalledError,
    ModulePathError,
    NotInTraceError,
    NotSavedError,
    OutOfOrderError,
    SeethroughError,
    ShapeMismatchError,
    SourceError,
    TraceSourceError,
    UsageAttributeError,
    UsageIndexError,
    UsageKeyError,
    UsageTypeError,
    UsageValueError,
    WeightsModifiedError,
)
from .harvest import HarvestStore, HarvestStoreError, load
from .models import LanguageModel, Model
from .models.language import LanguageModelError
from .remote.client.registry import register
from .tracing.cache import Cache, CacheKeyError
from .tracing.runtime import save
from .tracing.tracer import Invoker, Tracer

if TYPE_CHECKING:
    from ._stand_in import StandIn


# nnsight-compatible names: code written for nnsight runs after changing its import.
NNsight = Model
TransformersModel = LanguageModel


def stand_in_for_nnsight() -> "StandIn":
    """Make ``import nnsight`` (and ``nnsight.<x>``) give seethrough's modules in
    this process, so libraries built on nnsight run unchanged; returns a handle
    whose ``undo()`` (or the end of a ``with`` block) switches it off.  Same as
    ``import seethrough.stand_in``; see :mod:`seethrough.stand_in`."""
    from ._stand_in import activate

    return activate()

__all__ = [
    "CONFIG",
    "Cache",
    "Envoy",
    "HarvestStore",
    "HarvestStoreError",
    "Invoker",
    "LanguageModel",
    "Model",
    "NNsight",
    "TransformersModel",
    "Tracer",
    "load",
    "register",
    "save",
    "AssignTypeError",
    "stand_in_for_nnsight",
    "BatchError",
    "CacheKeyError",
    "CrossInvokeError",
    "EnvoyClassError",
    "InputTypeError",
    "InvokeError",
    "LanguageModelError",
    "MissedProviderError",
    "ModuleNotCalledError",
    "ModulePathError",
    "NotInTraceError",
    "NotSavedError",
    "OutOfOrderError",
    "SeethroughError",
    "ShapeMismatchError",
    "SourceError",
    "TraceSourceError",
    "UsageAttributeError",
    "UsageIndexError",
    "UsageKeyError",
    "UsageTypeError",
    "UsageValueError",
    "WeightsModifiedError",
    "__version__",
]
