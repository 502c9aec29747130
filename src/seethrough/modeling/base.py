"""``nnsight.modeling.base``: ``NNsight``, seethrough's :class:`~seethrough.models.model.Model`."""

from ..models.model import Model as NNsight

__all__ = ["NNsight"]
