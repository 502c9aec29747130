"""``nnsight.modeling.transformers``: ``TransformersModel``, seethrough's
:class:`~seethrough.models.language.LanguageModel` (which takes ``task=`` /
``automodel=`` for models other than causal LMs)."""

from ..models.language import LanguageModel as TransformersModel

__all__ = ["TransformersModel"]
