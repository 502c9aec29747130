"""What may travel between client and server: stated once, here.

A value is *portable* when it is

* an atom: ``None``, ``bool``, ``int`` (one that fits in 64 bits:
  ``-2**63 <= n < 2**64``), ``float``, ``complex``, ``str``, ``bytes`` (a
  subclass, such as a str ``Enum``, travels as its plain value),
  ``torch.Tensor``, ``torch.Size``, ``torch.dtype``, ``torch.device``, or
  ``Ellipsis``;
* a ``slice`` whose start, stop and step are portable;
* a ``list``, ``tuple`` (named tuples and ``torch.return_types`` too),
  ``set`` or ``frozenset`` of portable items;
* a ``dict`` (subclasses too, e.g. a HuggingFace ``ModelOutput``) whose keys
  are of type ``str``, ``int`` or ``bool`` exactly and whose values are portable;

nested at most :data:`MAX_DEPTH` levels (each container or slice inside
another is one level, counted from the value).  Everything else stays where
it is: functions, modules, envoys, tracers, objects of other classes.

Three places apply this, all through :func:`kind` and :func:`key_ok`:

* the client, before a request leaves (:func:`problem`:
  :mod:`seethrough.remote.client.collect` refuses a body's value, a trace's
  inputs or generation settings that cannot travel, naming where);
* the server, before an answer leaves (:func:`carry`:
  :mod:`seethrough.remote.server.execute` leaves out of the answer what cannot
  travel: a name bound to a function is not sent back, an item of a list that
  is not portable is left out of it);
* the wire format (:mod:`seethrough.remote.wire`), which encodes by
  :func:`kind` and refuses what it is not.

A wire *message* carries values inside the protocol's own structure (a
request's ``variables`` dict, an answer's ``values``), so the wire allows
:data:`MESSAGE_DEPTH` levels from the top of a message: room for the
structure around any portable value, and a bound for what a decoder reads.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

__all__ = ["DROP", "MAX_DEPTH", "MESSAGE_DEPTH", "carry", "items", "key_ok", "kind", "problem", "why_not"]

MAX_DEPTH = 32  # how deep a portable value may nest (containers in containers)
MESSAGE_DEPTH = 2 * MAX_DEPTH  # how deep a wire message may nest: a value, and the protocol around it

_INT_RANGE = (-(2**63), 2**64)
# Exact types that are atoms (the fast path); their subclasses are atoms too.
_ATOM_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.Size, torch.dtype, torch.device)
_EXACT_ATOMS = frozenset(_ATOM_TYPES)
_KEY_TYPES = frozenset({str, int, bool})

ATOM, SLICE, LIST, TUPLE, SET, FROZENSET, DICT = "atom", "slice", "list", "tuple", "set", "frozenset", "dict"
_CONTAINERS = ((slice, SLICE), (list, LIST), (tuple, TUPLE), (dict, DICT), (frozenset, FROZENSET), (set, SET))


def kind(value: Any) -> str | None:
    """What ``value`` is as a portable value — ``"atom"``, ``"slice"``,
    ``"list"``, ``"tuple"``, ``"set"``, ``"frozenset"`` or ``"dict"`` — or None
    if it cannot travel.  A container's items are not looked at (see :func:`items`)."""
    cls = type(value)
    if cls in _EXACT_ATOMS or isinstance(value, _ATOM_TYPES):
        if isinstance(value, int) and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
            return None
        return ATOM
    if value is Ellipsis:
        return ATOM
    for base, what in _CONTAINERS:
        if isinstance(value, base):
            return what
    return None


def key_ok(key: Any) -> bool:
    """True for a dict key that may travel: a ``str``, ``int`` (in 64 bits) or ``bool``, not a subclass."""
    return type(key) in _KEY_TYPES and (type(key) is not int or _INT_RANGE[0] <= key < _INT_RANGE[1])


def items(value: Any, what: str) -> Iterator[tuple[str, Any]]:
    """The parts of a container or slice of kind ``what``, each with its label
    (``[0]``, ``['key']``, ``.start``, ``{item}``); a dict's values only (its
    keys: :func:`key_ok`)."""
    if what == SLICE:
        yield from ((".start", value.start), (".stop", value.stop), (".step", value.step))
    elif what == DICT:
        yield from ((f"[{key!r}]", item) for key, item in value.items())
    elif what in (SET, FROZENSET):
        yield from ((f"{{{item!r}}}", item) for item in value)
    else:
        yield from ((f"[{index}]", item) for index, item in enumerate(value))


def why_not(value: Any) -> str:
    """Why a value :func:`kind` refused cannot travel (a phrase)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"an integer of {int(value).bit_length()} bits does not fit in 64 bits; send it as a string or a tensor"
    cls = type(value)
    named = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__qualname__} (from {cls.__module__})"
    return f"an object of type {named} cannot travel"


def problem(value: Any, path: str = "the value") -> str | None:
    """None if ``value`` may travel; else where (``path`` and the labels of
    :func:`items`) and why not, for the first part that may not."""
    return _problem(value, path, 0)


def _problem(value: Any, path: str, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"{path}: nested deeper than {MAX_DEPTH} levels (does the value contain itself?)"
    what = kind(value)
    if what is None:
        return f"{path}: {why_not(value)}"
    if what == ATOM:
        return None
    if what == DICT:
        for key in value:
            if not key_ok(key):
                return f"{path}: the dict key {key!r} of type {type(key).__name__} cannot travel (keys are strings or integers)"
    for label, item in items(value, what):
        found = _problem(item, path + label, depth + 1)
        if found is not None:
            return found
    return None


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()  # what :func:`carry` gives for a value that cannot travel at all


def carry(value: Any, substitute: Callable[[Any], Any] | None = None) -> Any:
    """``value`` as it can travel: what cannot is left out of its container,
    and :data:`DROP` stands for a value that cannot travel at all.  A named
    tuple becomes a plain tuple; a dict subclass keyed by strings is rebuilt
    as its class from what is kept (a ``ModelOutput`` without its cache), else
    it becomes a plain dict.  ``substitute(v)`` may replace any part first (it
    returns ``DROP`` to leave the part as it is)."""
    return _carry(value, substitute, 0)


def _carry(value: Any, substitute: Callable[[Any], Any] | None, depth: int) -> Any:
    if substitute is not None:
        replaced = substitute(value)
        if replaced is not DROP:
            return replaced
    if depth > MAX_DEPTH:
        return DROP
    what = kind(value)
    if what is None:
        return DROP
    if what == ATOM:
        return value
    if what == SLICE:
        return value if all(_problem(part, "", depth + 1) is None for _, part in items(value, SLICE)) else DROP
    if what == DICT:
        kept = {}
        for key, item in value.items():
            if key_ok(key):
                carried = _carry(item, substitute, depth + 1)
                if carried is not DROP:
                    kept[key] = carried
        if type(value) is not dict and all(isinstance(key, str) for key in kept):
            try:
                return type(value)(**kept)  # e.g. a HuggingFace ModelOutput, minus what cannot travel
            except TypeError:
                return kept
        return kept
    carried = [_carry(item, substitute, depth + 1) for item in value]
    carried = [item for item in carried if item is not DROP]
    if what == LIST:
        return carried
    if what == TUPLE:
        return tuple(carried)
    return frozenset(carried) if what == FROZENSET else set(carried)
