"""The wire format (seethrough.remote.wire): exact roundtrips, size caps, and a
clear WireError for every kind of malformed frame.

Malformed frames are built by hand from the documented layout (header, zlib
body, uint64 structure length, msgpack structure, safetensors blob), so these
tests check the format independently of the encoder.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zlib
from dataclasses import dataclass

import msgpack
import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from seethrough.errors import SeethroughError
from seethrough.remote import wire
from seethrough.remote.wire import WireError, WireSizeError, WireVersionError, pack, payload_stats, unpack

LIMIT = 50_000_000


def roundtrip(value):
    return unpack(pack(value, max_bytes=LIMIT), max_bytes=LIMIT)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Exact content of a tensor (bit patterns, so NaNs and float8 compare too)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(sent, received, path="value"):
    assert type(received) is type(sent), f"{path}: {type(received)} is not {type(sent)}"
    if isinstance(sent, torch.Tensor):
        assert received.dtype == sent.dtype and received.shape == sent.shape, path
        assert tensor_bytes(received) == tensor_bytes(sent), path
        assert not received.requires_grad and received.device.type == "cpu"
    elif isinstance(sent, float) and math.isnan(sent):
        assert math.isnan(received)
    elif isinstance(sent, float):
        assert received == sent and math.copysign(1, received) == math.copysign(1, sent), path
    elif isinstance(sent, dict):
        assert list(received) == list(sent), path  # same keys, same order
        for key in sent:
            assert_same(sent[key], received[key], f"{path}[{key!r}]")
    elif isinstance(sent, (list, tuple)):
        assert len(received) == len(sent), path
        for i, (a, b) in enumerate(zip(sent, received)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert received == sent, path


# -- roundtrips ----------------------------------------------------------------------

SCALARS = [
    None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -0.0, 1.5, float("inf"), float("-inf"),
    float("nan"), 1e-300, 3 + 4j, complex(float("inf"), -0.0), "", "héllo ✓ 日本", b"", b"\x00\xff" * 10,
    Ellipsis, slice(None), slice(1, 10, 2), slice(-3, None), torch.Size([]), torch.Size([2, 0, 5]),
    torch.device("cpu"), torch.device("cuda", 1), torch.device("meta"),
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_roundtrip_exactly(value):
    assert_same(value, roundtrip(value))


@pytest.mark.parametrize("dtype", sorted(wire._DTYPES_BY_NAME.values(), key=str), ids=str)
def test_every_dtype_object_roundtrips(dtype):
    assert roundtrip(dtype) is dtype


def test_containers_keep_their_types_and_order():
    value = {
        "list": [1, [2, (3, 4)], ()],
        "tuple": (1, "a", [None]),
        "empty": ([], (), {}, set(), frozenset()),
        3: "int key", "z": 1, "a": 2, -7: {"nested": {"deeper": [1.5, {2: (3,)}]}},
        "set": {3, 1, 2}, "frozen": frozenset({"x", "y"}), "mixed_set": {1, "a", (2, 3)},
    }
    received = roundtrip(value)
    assert_same(value, received)
    assert list(received) == ["list", "tuple", "empty", 3, "z", "a", -7, "set", "frozen", "mixed_set"]
    assert type(received[-7]["nested"]["deeper"][1][2]) is tuple


def make_tensor(dtype: torch.dtype, shape=(3, 4)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).mul(100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, shape, dtype=torch.int64).to(dtype)


TENSOR_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4), (), (0,), (2, 0, 3)], ids=str)
def test_tensors_of_every_dtype_and_shape_roundtrip(dtype, shape):
    tensor = make_tensor(dtype, shape)
    assert_same(tensor, roundtrip(tensor))


def test_tensor_special_values_and_layouts():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    value = {
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "view": base[1:3],
        "expanded": torch.ones(1, 3).expand(4, 3),
        "whole": base,
        "same_storage": base.view(24),
        "grad": torch.randn(3, requires_grad=True) * 2,
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
    }
    received = roundtrip(value)
    for key in ("special", "transposed", "strided", "view", "expanded", "whole", "same_storage"):
        assert_same(value[key], received[key], key)
    assert received["grad"].requires_grad is False
    assert torch.equal(received["grad"], value["grad"].detach())
    assert type(received["parameter"]) is torch.Tensor
    assert torch.equal(received["parameter"], value["parameter"].detach())


def test_the_same_tensor_twice_is_sent_once_and_comes_back_as_one_object():
    big = torch.randn(1000)
    value = [big, big, {"again": big}]
    frame = pack(value, max_bytes=LIMIT, level=0)
    assert len(frame) < big.nbytes * 1.2
    received = unpack(frame, max_bytes=LIMIT)
    assert received[0] is received[1] is received[2]["again"]
    assert torch.equal(received[0], big)


def test_causal_lm_output_comes_back_as_the_same_class():
    output = CausalLMOutputWithPast(
        loss=torch.tensor(2.5), logits=torch.randn(2, 5, 11),
        hidden_states=tuple(torch.randn(2, 5, 8) for _ in range(3)),
    )
    received = roundtrip({"out": output})["out"]
    assert type(received) is CausalLMOutputWithPast
    assert list(received.keys()) == list(output.keys())
    assert torch.equal(received.logits, output.logits) and torch.equal(received.loss, output.loss)
    assert isinstance(received.hidden_states, tuple) and len(received.hidden_states) == 3
    assert torch.equal(received[0], output[0])  # ModelOutput indexing still works
    assert received.attentions is None


@dataclass
class PrivateOutput(ModelOutput):
    """A ModelOutput that transformers does not export: must come back as a dict."""

    score: torch.Tensor | None = None


def test_model_output_classes_not_exported_by_transformers_come_back_as_dicts():
    received = roundtrip(PrivateOutput(score=torch.ones(2)))
    assert type(received) is dict and list(received) == ["score"]


def test_torch_return_types_keep_their_fields():
    result = torch.topk(torch.randn(4, 5), 2)
    received = roundtrip(result)
    assert type(received) is type(result)
    assert torch.equal(received.values, result.values) and torch.equal(received.indices, result.indices)


def test_int_and_str_subclasses_travel_as_plain_values():
    import enum

    class Color(enum.IntEnum):
        RED = 1

    assert_same([1, "x"], roundtrip([Color.RED, type("S", (str,), {})("x")]))


def test_packing_is_deterministic():
    value = {"s": {"pear", "apple", "fig"}, "t": torch.arange(10), "f": frozenset({"b", "a"})}
    assert pack(value, max_bytes=LIMIT) == pack(dict(value), max_bytes=LIMIT)
    assert pack({"s": {"fig", "apple", "pear"}}, max_bytes=LIMIT) == pack({"s": {"pear", "fig", "apple"}}, max_bytes=LIMIT)


def test_payload_stats_counts_tensor_bytes_once_per_tensor():
    a, b = torch.zeros(10, dtype=torch.float32), torch.zeros(3, dtype=torch.int8)
    assert payload_stats({"a": a, "again": [a, (b, slice(a))], "n": 3}) == {"tensors": 2, "tensor_bytes": 43}


def test_frame_is_not_larger_than_a_pickle_of_the_same_tensors():
    value = {f"layer{i}": torch.randn(4, 16, 64) for i in range(6)}
    frame = pack(value, max_bytes=LIMIT)
    pickled = pickle.dumps(value)
    assert len(frame) <= len(pickled) * 1.05, (len(frame), len(pickled))
    zeros = {"z": torch.zeros(256, 1024)}
    assert len(pack(zeros, max_bytes=LIMIT)) < len(pickle.dumps(zeros)) / 20  # compression pays off


# -- values that cannot be sent -----------------------------------------------------


class Foo:
    pass


@pytest.mark.parametrize(
    "value, path, what",
    [
        ({"h": [1, 2, Foo()]}, "value['h'][2]", "Foo"),
        ([lambda: 1], "value[0]", "function"),
        ({"m": torch.nn.Linear(2, 2)}, "value['m']", "Linear"),
        ((1, {2: bytearray(b"x")}), "value[1][2]", "bytearray"),
        ({"big": 2**64}, "value['big']", "64 bits"),
        ({"small": -(2**63) - 1}, "value['small']", "64 bits"),
        ({(1, 2): "tuple key"}, "value", "dict key"),
        ({"meta": torch.empty(2, device="meta")}, "value['meta']", "meta tensor"),
        ({"sparse": torch.eye(3).to_sparse()}, "value['sparse']", "sparse"),
    ],
)
def test_unsupported_values_name_the_type_and_path(value, path, what):
    with pytest.raises(WireError) as info:
        pack(value, max_bytes=LIMIT)
    message = str(info.value)
    assert message.startswith(f"{path}:") and what in message, message


def test_unsupported_object_message_says_what_to_send():
    with pytest.raises(WireError, match=r"value\['h'\]\[2\]: cannot send an object of type Foo .*; send tensors"):
        pack({"h": [1, 2, Foo()]}, max_bytes=LIMIT)


def test_a_value_that_contains_itself_is_refused_clearly():
    loop: list = []
    loop.append(loop)
    with pytest.raises(WireError, match="nested deeper than 64"):
        pack(loop, max_bytes=LIMIT)


def test_wire_error_is_a_seethrough_error_and_a_value_error():
    assert issubclass(WireError, SeethroughError) and issubclass(WireError, ValueError)
    assert issubclass(WireSizeError, WireError) and issubclass(WireVersionError, WireError)


# -- size caps ------------------------------------------------------------------------


def test_pack_refuses_frames_over_max_bytes():
    with pytest.raises(WireSizeError, match=r"over the limit of 1,000 bytes"):
        pack(torch.randn(1000), max_bytes=1000)


def test_unpack_checks_max_bytes_before_anything_else():
    frame = pack(torch.randn(100), max_bytes=LIMIT)
    with pytest.raises(WireSizeError, match="over the limit of 100 bytes"):
        unpack(frame, max_bytes=100)
    with pytest.raises(WireSizeError):  # garbage too: the size is checked before the magic
        unpack(b"garbage" * 100, max_bytes=100)


def test_a_compressible_payload_over_the_unpacked_limit_is_refused():
    frame = pack(torch.zeros(4_000_000), max_bytes=LIMIT)  # 16 MB of zeros, tiny on the wire
    assert len(frame) < 100_000
    with pytest.raises(WireSizeError, match="decompresses to more than the limit of 1,000,000 bytes"):
        unpack(frame, max_bytes=LIMIT, max_unpacked_bytes=1_000_000)
    assert unpack(frame, max_bytes=LIMIT, max_unpacked_bytes=17_000_000).shape == (4_000_000,)


def test_bulk_python_lists_are_refused_with_advice():
    with pytest.raises(WireSizeError, match="send bulk numbers as tensors"):
        pack(["x" * 1000] * 9000, max_bytes=LIMIT)
    structure = msgpack.packb([wire.TAG_LIST] + ["x" * 1000] * 9000)
    with pytest.raises(WireSizeError, match="non-tensor part of the message"):
        unpack(frame_of(structure), max_bytes=LIMIT)


def test_a_zip_bomb_stops_at_the_cap():
    bomb = zlib.compress(b"\0" * 64_000_000, 1)  # 64 MB in a few hundred KB
    frame = header() + bomb
    with pytest.raises(WireSizeError, match="decompresses to more than"):
        unpack(frame, max_bytes=1_000_000, max_unpacked_bytes=5_000_000)
    with pytest.raises(WireSizeError):  # default cap: 32 x max_bytes
        unpack(frame, max_bytes=1_000_000)


# -- malformed frames -------------------------------------------------------------------


def header(version: int = wire.FORMAT_VERSION, flags: int = wire.FLAG_ZLIB, sender: bytes = b"0.1.0",
           magic: bytes = b"STWF") -> bytes:
    return struct.pack("<4sHBB", magic, version, flags, len(sender)) + sender


def frame_of(structure: bytes, blob: bytes = b"", **header_args) -> bytes:
    payload = struct.pack("<Q", len(structure)) + structure + blob
    return header(**header_args) + zlib.compress(payload)


def safetensors_blob(header_json: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header_json).encode()
    return struct.pack("<Q", len(text)) + text + data


def nested(depth: int):
    node: list = [wire.TAG_LIST]
    for _ in range(depth):
        node = [wire.TAG_LIST, node]
    return node


GOOD = pack({"x": torch.arange(6.0), "y": [1, 2]}, max_bytes=LIMIT)
REF0 = msgpack.packb([wire.TAG_TENSOR, 0])
F32_BLOB = safetensors_blob({"0": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)

MALFORMED = {
    "empty": (b"", "truncated"),
    "shorter than header": (b"STW", "shorter than the 8-byte header"),
    "wrong magic": (b"PK\x03\x04" + GOOD[4:], "not a seethrough wire frame"),
    "random garbage": (bytes(range(256)) * 4, "not a seethrough wire frame"),
    "pickle instead": (pickle.dumps({"a": 1}), "not a seethrough wire frame"),
    "unknown flags": (header(flags=0x81) + GOOD[13:], "unknown flags 0x81"),
    "header cut in sender version": (header(sender=b"0.1.0")[:10], "truncated inside its header"),
    "truncated body": (GOOD[: len(GOOD) // 2], "truncated"),
    "body is not zlib": (header() + b"this is not zlib", "not valid compressed data"),
    "trailing bytes": (GOOD + b"extra", "unexpected bytes after its compressed body"),
    "body shorter than layout": (header() + zlib.compress(b"abc"), "too short to hold its layout"),
    "structure length too big": (header() + zlib.compress(struct.pack("<Q", 10**12) + b"\x90"), "claims 1,000,000,000,000 bytes"),
    "bad msgpack": (frame_of(b"\xc1"), "malformed structure"),
    "truncated msgpack": (frame_of(b"\x93\x01"), "malformed structure"),
    "msgpack trailing data": (frame_of(b"\x01\x02"), "malformed structure"),
    "msgpack map": (frame_of(msgpack.packb({"a": 1})), "malformed structure"),
    "msgpack ext": (frame_of(msgpack.packb(msgpack.ExtType(5, b"x"))), "malformed structure"),
    "invalid utf-8": (frame_of(b"\xa2\xff\xfe"), "malformed structure"),
    "unknown tag": (frame_of(msgpack.packb([99, 1])), "unknown tag 99"),
    "tag not int": (frame_of(msgpack.packb(["list", 1])), "malformed structure"),
    "empty array": (frame_of(msgpack.packb([])), "malformed structure"),
    "too deep": (frame_of(msgpack.packb(nested(100))), "nested deeper than 64"),
    "reference out of range": (frame_of(msgpack.packb([wire.TAG_TENSOR, 3])), "tensor reference 3 is out of range"),
    "negative reference": (frame_of(msgpack.packb([wire.TAG_TENSOR, -1])), "out of range"),
    "reference without blob": (frame_of(REF0), "out of range (the message holds 0 tensors)"),
    "dict key without value": (frame_of(msgpack.packb([wire.TAG_DICT, "a"])), "key without a value"),
    "duplicate dict key": (frame_of(msgpack.packb([wire.TAG_DICT, "a", 1, "a", 2])), "appears twice"),
    "dict key list": (frame_of(msgpack.packb([wire.TAG_DICT, [wire.TAG_LIST], 1])), "dict key of type list"),
    "unhashable set element": (frame_of(msgpack.packb([wire.TAG_SET, [wire.TAG_LIST]])), "unhashable"),
    "unknown dtype name": (frame_of(msgpack.packb([wire.TAG_DTYPE, "os.system"])), "unknown torch dtype"),
    "bad device": (frame_of(msgpack.packb([wire.TAG_DEVICE, "toaster:9"])), "is not a torch device"),
    "bad size": (frame_of(msgpack.packb([wire.TAG_SIZE, -1])), "torch.Size"),
    "bad complex": (frame_of(msgpack.packb([wire.TAG_COMPLEX, "a", "b"])), "complex number"),
    "bad slice": (frame_of(msgpack.packb([wire.TAG_SLICE, 1])), "a slice needs"),
    "safetensors header not json": (frame_of(REF0, struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
    "safetensors header huge": (frame_of(REF0, struct.pack("<Q", 2**62) + b"{}"), "header claims"),
    "safetensors blob too short": (frame_of(REF0, b"\x01\x02"), "too short for a safetensors header"),
    "safetensors huge shape": (
        frame_of(REF0, safetensors_blob({"0": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8)),
        "claims shape",
    ),
    "safetensors offsets past end": (
        frame_of(REF0, safetensors_blob({"0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)),
        "but the data holds only 8 bytes",
    ),
    "safetensors unknown dtype": (
        frame_of(REF0, safetensors_blob({"0": {"dtype": "PYOBJ", "shape": [1], "data_offsets": [0, 1]}}, b"\0")),
        "unsupported dtype 'PYOBJ'",
    ),
    "safetensors odd name": (
        frame_of(REF0, safetensors_blob({"evil": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")),
        "unexpected name",
    ),
    "safetensors header not object": (frame_of(REF0, safetensors_blob([1, 2])), "not a JSON object"),  # type: ignore[arg-type]
    "complex tensor from ints": (frame_of(msgpack.packb([wire.TAG_COMPLEX_TENSOR, 0]), F32_BLOB), "cannot be read as complex"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_raise_a_clear_wire_error(name):
    data, expected = MALFORMED[name]
    with pytest.raises(WireError) as info:
        unpack(data, max_bytes=LIMIT)
    assert expected in str(info.value), str(info.value)


def test_well_formed_handmade_frame_reads_back():
    """The hand-built helpers above do follow the format (so the failures are real)."""
    assert torch.equal(unpack(frame_of(REF0, F32_BLOB), max_bytes=LIMIT), torch.zeros(2))


def test_every_single_byte_truncation_is_a_wire_error():
    for cut in range(len(GOOD)):
        with pytest.raises(WireError):
            unpack(GOOD[:cut], max_bytes=LIMIT)


def test_version_mismatch_names_both_versions():
    newer = header(version=wire.FORMAT_VERSION + 1, sender=b"9.9.9") + GOOD[13:]
    with pytest.raises(WireVersionError) as info:
        unpack(newer, max_bytes=LIMIT)
    message = str(info.value)
    assert f"version {wire.FORMAT_VERSION + 1}" in message and f"version {wire.FORMAT_VERSION}" in message
    assert "seethrough 9.9.9" in message and "seethrough 0.1.0" in message


def test_unpack_refuses_non_bytes():
    with pytest.raises(WireError, match="must be bytes, not str"):
        unpack("STWF", max_bytes=LIMIT)  # type: ignore[arg-type]


def test_uncompressed_frames_read_back():
    value = {"x": torch.randn(3), "s": "text"}
    frame = pack(value, max_bytes=LIMIT, level=0)
    assert frame[6] & wire.FLAG_ZLIB == 0
    assert_same(value, unpack(frame, max_bytes=LIMIT))
