"""Wrappers: :class:`Model` for any ``torch.nn.Module``, :class:`LanguageModel`
for HuggingFace language models (``LanguageModel.from_server`` / :func:`remote_model`:
one a server serves); :mod:`.offline` finds the bundled offline models."""

from .language import LanguageModel, remote_model
from .model import Model

__all__ = ["LanguageModel", "Model", "remote_model"]
