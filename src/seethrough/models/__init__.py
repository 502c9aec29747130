"""Wrappers: :class:`Model` for any ``torch.nn.Module``, :class:`LanguageModel`
for HuggingFace language models; :mod:`.offline` finds the bundled offline models."""

from .language import LanguageModel
from .model import Model

__all__ = ["LanguageModel", "Model"]
