"""nnsight's ``nnsight.modeling`` paths, for code that imports the wrappers from
there (``from nnsight.modeling.language import LanguageModel``).

Every name is seethrough's own class (see :mod:`seethrough.models`):

* :mod:`.base` — ``NNsight`` (= :class:`seethrough.Model`);
* :mod:`.language` — ``LanguageModel``;
* :mod:`.transformers` — ``TransformersModel`` (= ``LanguageModel``).
"""

from .base import NNsight
from .language import LanguageModel
from .transformers import TransformersModel

__all__ = ["LanguageModel", "NNsight", "TransformersModel"]
