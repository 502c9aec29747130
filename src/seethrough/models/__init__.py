"""Wrappers: :class:`Model` for any ``torch.nn.Module``."""

from .model import Model

__all__ = ["Model"]
