"""``MISSING``: the one marker for "no value here" in the tracing package.

``None`` is a value a module, a cache or a class attribute can really hold,
so absence needs a marker of its own.  Every place that needs one uses this
object and compares with ``is``.
"""

from __future__ import annotations


class _Missing:
    """The type of :data:`MISSING` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()
