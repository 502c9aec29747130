"""``nnsight.modeling.language``: :class:`~seethrough.models.language.LanguageModel`."""

from ..models.language import LanguageModel

__all__ = ["LanguageModel"]
