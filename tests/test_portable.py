"""What may travel (``seethrough.remote.portable``): one statement, three users.

The client's check (:func:`portable.problem`), the server's answer
(:func:`portable.carry`) and the wire format (``wire.pack``) agree on every
value below: what the check accepts packs and comes back equal, and carry
keeps it whole; what it refuses the wire refuses too, and carry leaves out.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, namedtuple

import pytest
import torch

from seethrough.remote import portable, wire
from seethrough.remote.wire import WireError

MAX = 1 << 20
Point = namedtuple("Point", "x y")


class Colour(enum.IntEnum):
    RED = 1


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


PORTABLE = {
    "atoms": [None, True, 3, -(2**63), 2**64 - 1, 1.5, 2j, "s", b"b", Ellipsis, torch.float16, torch.device("cpu"),
              torch.Size([2, 3])],
    "tensor": torch.arange(6).reshape(2, 3),
    "containers": {"a": [1, (2, 3)], 4: {5, 6}, True: frozenset({"x"})},
    "slice": slice(1, None, 2),
    "enum value": Colour.RED,
    "ordered dict": OrderedDict(a=1),
    "at the depth limit": nested(portable.MAX_DEPTH),
}

NOT_PORTABLE = {
    "an object": object(),
    "a function": len,
    "a big int": 2**64,
    "a slice of an object": slice(0, object()),
    "a list holding an object": [1, object()],
    "an enum key": {Colour.RED: 1},
    "a tuple key": {(1, 2): 3},
}


@pytest.mark.parametrize("name", sorted(PORTABLE))
def test_what_the_check_accepts_travels_whole(name):
    value = PORTABLE[name]
    assert portable.problem(value) is None
    back = wire.unpack(wire.pack({"v": value}, max_bytes=MAX), max_bytes=MAX)["v"]
    carried = portable.carry(value)
    for other in (back, carried):
        if isinstance(value, torch.Tensor):
            assert torch.equal(other, value)
        else:
            assert other == value


@pytest.mark.parametrize("name", sorted(NOT_PORTABLE))
def test_what_the_check_refuses_the_wire_refuses_and_carry_leaves_out(name):
    value = NOT_PORTABLE[name]
    assert portable.problem(value, "x") is not None
    with pytest.raises(WireError):
        wire.pack({"v": value}, max_bytes=MAX)
    carried = portable.carry(value)
    assert carried is portable.DROP or portable.problem(carried) is None


def test_the_one_depth_limit():
    assert portable.problem(nested(portable.MAX_DEPTH)) is None
    assert "nested deeper than 32" in portable.problem(nested(portable.MAX_DEPTH + 1), "x")
    # A message carries the value inside the protocol's own structure: the wire allows room for it.
    assert portable.MESSAGE_DEPTH > portable.MAX_DEPTH + 2
    wire.pack({"values": {"x": nested(portable.MAX_DEPTH)}}, max_bytes=MAX)
    with pytest.raises(WireError, match=f"nested deeper than {portable.MESSAGE_DEPTH}"):
        wire.pack(nested(portable.MESSAGE_DEPTH + 1), max_bytes=MAX)


def test_carry_keeps_what_can_travel_and_names_where_the_rest_was():
    value = {"keep": [1, object(), 2], "drop": object(), Colour.RED: 1, "point": Point(1, object())}
    assert portable.carry(value) == {"keep": [1, 2], "point": (1,)}
    assert portable.problem({"keep": [1, object()]}, "saved") == "saved['keep'][1]: an object of type object cannot travel"
    # A substitute replaces parts first (the server sends an unsaved part back as None).
    assert portable.carry([1, "x"], lambda v: None if v == "x" else portable.DROP) == [1, None]
