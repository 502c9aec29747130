"""The wire format of remote requests and results: data only, never pickle.

Every request and response between a seethrough client and server is one
*frame* made by :func:`pack` and read back by :func:`unpack`.  A frame carries
a tree of plain values; nothing in it can name code to import or run, so a
server can read frames from strangers.

Layout of a frame::

    magic  b"STWF"               4 bytes
    format version               uint16, little-endian (FORMAT_VERSION)
    flags                        uint8  (bit 0: body is zlib-compressed)
    length of sender's version   uint8
    sender's seethrough version  ASCII, that many bytes (for error messages)
    body                         zlib stream (or raw, without the flag) of:
        length of structure      uint64, little-endian
        structure                msgpack
        tensors                  ONE safetensors blob ("0", "1", ... by index)

The *structure* is msgpack of plain scalars (None, bool, int up to 64 bits,
float, str, bytes) and of tagged arrays ``[TAG, ...]`` for everything else —
lists, tuples, dicts (any insertion order, str/int keys), sets, complex
numbers, slices, Ellipsis, ``torch.Size``/``dtype``/``device``, references to
tensors in the blob, ``torch.return_types`` tuples and HuggingFace
``ModelOutput`` objects.  msgpack maps are never used, so a dict keeps its
key order and its int keys.

Decoding trusts nothing: the compressed size is checked before any work, the
decompressed size while decompressing (a zip bomb stops at the cap), msgpack
runs with length limits (and the non-tensor structure has its own cap,
:data:`MAX_STRUCTURE_BYTES`), the safetensors header is checked against the bytes
that follow it, nesting is capped at :data:`~.portable.MESSAGE_DEPTH`, and every problem is
a :class:`WireError` (a ``SeethroughError`` and a ``ValueError``) saying what
was wrong.  Class names in the frame are looked up only among
``transformers``' ``ModelOutput`` subclasses and ``torch.return_types``;
nothing else is ever imported or constructed from the wire.

Subclasses of the plain types travel as those types (a namedtuple comes back
as a tuple, an OrderedDict as a dict, an IntEnum as an int); other objects,
and tensors without plain data (meta, sparse, quantized), raise a
:class:`WireError` naming their path inside the value.

Tensors come back on the CPU, contiguous, detached (``requires_grad`` is not
sent), with their dtype and shape; several references to the same tensor
object come back as one object.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from typing import Any

import msgpack
import safetensors.torch
import torch

from .._version import __version__
from ..errors import SeethroughError
from . import portable
from .portable import MESSAGE_DEPTH

__all__ = [
    "FORMAT_VERSION", "WireError", "WireSizeError", "WireVersionError", "inspect", "pack", "payload_stats",
    "unpack",
]

MAGIC = b"STWF"
FORMAT_VERSION = 1
FLAG_ZLIB = 0x01
KNOWN_FLAGS = FLAG_ZLIB
# Level 1 is several times faster than the default and loses little on tensors,
# which compress poorly whatever the level.
COMPRESSION_LEVEL = 1
# With max_unpacked_bytes=None a frame may expand to this many times max_bytes.
DEFAULT_EXPANSION = 32
# Python objects cost ~50x their msgpack bytes, so the structure has its own cap;
# bulk data belongs in tensors, which cost what they weigh.
MAX_STRUCTURE_BYTES = 8 * 1024 * 1024

_HEADER = struct.Struct("<4sHBB")
_LENGTH = struct.Struct("<Q")

# Tags of the structure's tagged arrays.  The numbers are the format: append, never
# reorder.  TAG_COMPLEX_TENSOR: a complex dtype safetensors lacks, sent via view_as_real.
(TAG_LIST, TAG_TUPLE, TAG_DICT, TAG_SET, TAG_FROZENSET, TAG_COMPLEX, TAG_SLICE, TAG_ELLIPSIS, TAG_TENSOR,
 TAG_COMPLEX_TENSOR, TAG_SIZE, TAG_DTYPE, TAG_DEVICE, TAG_MODEL_OUTPUT, TAG_RETURN_TYPE) = range(15)

_SUPPORTED_HINT = "send tensors, numbers, strings, lists, tuples and dicts"


class WireError(SeethroughError, ValueError):
    """A value cannot be packed, or a frame cannot be read back."""


class WireSizeError(WireError):
    """A frame is over the size limit (compressed or decompressed)."""


class WireVersionError(WireError):
    """The frame was written by a different version of the wire format."""


# -- dtypes -----------------------------------------------------------------------

# safetensors' names for the dtypes it stores: the core set, plus the newer ones
# that this safetensors version knows (it lists them in a private table).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_KNOWN_TO_SAFETENSORS = getattr(safetensors.torch, "_TYPES", {})
for _name, _attr in {"C64": "complex64", "U16": "uint16", "U32": "uint32", "U64": "uint64",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.items():
    if _KNOWN_TO_SAFETENSORS.get(_name) is getattr(torch, _attr, None) is not None:
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
del _name, _attr
_STORABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
# Complex dtypes safetensors cannot store go as their real view (a last dim of 2).
_COMPLEX_VIA_REAL = {
    dtype: real
    for dtype, real in ((torch.complex128, torch.float64), (torch.complex64, torch.float32),
                        (torch.complex32, torch.float16))
    if dtype not in _STORABLE_DTYPES
}
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- encoding ---------------------------------------------------------------------


def _model_output_class() -> type | None:
    """transformers' ModelOutput, only if transformers is already loaded (no import)."""
    generic = sys.modules.get("transformers.utils.generic")
    return getattr(generic, "ModelOutput", None) if generic is not None else None


def _is_return_type(value: Any) -> bool:
    return type(value).__module__ == "torch.return_types" and isinstance(value, tuple)


def _type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__qualname__} (from {module})"


def _key_path(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


class _Encoder:
    """Turns a value into the tagged structure, collecting its tensors."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self._index_by_id: dict[int, int] = {}
        self._originals: list[torch.Tensor] = []  # keeps ids stable while packing
        self._storages: set[int] = set()
        self._tags: list[int] = []

    def encode(self, value: Any, path: str, depth: int) -> Any:
        if depth > MESSAGE_DEPTH:
            raise WireError(f"{path}: nested deeper than {MESSAGE_DEPTH} levels (does the value contain itself?); "
                            "send a flatter structure")
        if value is None or type(value) in (bool, str, bytes, float):
            return value
        what = portable.kind(value)  # what may travel: seethrough.remote.portable
        if what is None:
            if isinstance(value, int) and not isinstance(value, bool):
                raise WireError(f"{path}: {portable.why_not(value)}")
            raise WireError(f"{path}: cannot send an object of type {_type_name(value)}; {_SUPPORTED_HINT}")
        if what == portable.ATOM:
            return self._atom(value, path)
        if what == portable.SLICE:
            return [TAG_SLICE, *(self.encode(part, path + label, depth + 1)
                                 for label, part in portable.items(value, what))]
        if what == portable.DICT:
            model_output = _model_output_class()
            if model_output is not None and isinstance(value, model_output):
                fields = [TAG_MODEL_OUTPUT, type(value).__name__]
                for key, item in value.items():
                    fields += [key, self.encode(item, _key_path(path, key), depth + 1)]
                return fields
            return self._dict(value, path, depth)
        if what == portable.TUPLE and _is_return_type(value):
            return [TAG_RETURN_TYPE, type(value).__name__,
                    *(self.encode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))]
        if what in (portable.LIST, portable.TUPLE):
            tag = TAG_LIST if what == portable.LIST else TAG_TUPLE
            return [tag, *(self.encode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))]
        tag = TAG_SET if what == portable.SET else TAG_FROZENSET
        return [tag, *(self.encode(item, f"{path}{{{item!r}}}", depth + 1) for item in _stable_order(value))]

    def _atom(self, value: Any, path: str) -> Any:
        # Subclasses (a str Enum, an IntEnum, ...) travel as their plain value.
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, bytes):
            return bytes(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, complex):
            return [TAG_COMPLEX, value.real, value.imag]
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, torch.Size):
            return [TAG_SIZE, *(int(dim) for dim in value)]
        if isinstance(value, torch.dtype):
            return [TAG_DTYPE, _dtype_name(value)]
        if isinstance(value, torch.device):
            return [TAG_DEVICE, str(value)]
        return [TAG_ELLIPSIS]

    def _dict(self, value: dict, path: str, depth: int) -> list:
        fields: list[Any] = [TAG_DICT]
        for key, item in value.items():
            if not portable.key_ok(key):
                raise WireError(f"{path}: dict key {key!r} of type {_type_name(key)} cannot be sent; "
                                "dict keys must be strings or integers")
            fields += [self.encode(key, path, depth + 1), self.encode(item, _key_path(path, key), depth + 1)]
        return fields

    def _tensor(self, tensor: torch.Tensor, path: str) -> list:
        known = self._index_by_id.get(id(tensor))
        if known is not None:
            return [self._tags[known], known]
        if tensor.layout != torch.strided:
            raise WireError(f"{path}: cannot send a {tensor.layout} tensor; convert it with .to_dense() first")
        if tensor.device.type == "meta" or tensor.is_quantized:
            kind = "meta" if tensor.device.type == "meta" else "quantized"
            raise WireError(f"{path}: cannot send a {kind} tensor: it has no plain data to send")
        tag = TAG_COMPLEX_TENSOR if tensor.dtype in _COMPLEX_VIA_REAL else TAG_TENSOR
        if tensor.dtype not in _STORABLE_DTYPES and tag != TAG_COMPLEX_TENSOR:
            raise WireError(f"{path}: cannot send a tensor of dtype {tensor.dtype}; cast it to a standard dtype first")
        try:
            data = self._plain_cpu_copy(tensor, complex_as_real=tag == TAG_COMPLEX_TENSOR)
        except RuntimeError as error:  # exotic subclasses (fake, functional...) have no data to read
            raise WireError(f"{path}: cannot read this tensor's data ({error})") from None
        index = len(self.tensors)
        self.tensors.append(data)
        self._originals.append(tensor)
        self._tags.append(tag)
        self._index_by_id[id(tensor)] = index
        return [tag, index]


    def _plain_cpu_copy(self, tensor: torch.Tensor, *, complex_as_real: bool) -> torch.Tensor:
        """A detached, contiguous CPU tensor sharing memory with no tensor packed before."""
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        if complex_as_real:
            data = torch.view_as_real(data)
        data = data.contiguous()
        if data.nbytes:
            # safetensors refuses two tensors that share memory: copy the later ones.
            storage = data.untyped_storage().data_ptr()
            if storage in self._storages:
                data = data.clone()
                storage = data.untyped_storage().data_ptr()
            self._storages.add(storage)
        return data if type(data) is torch.Tensor else data.as_subclass(torch.Tensor)


def _stable_order(items: set | frozenset) -> list:
    """Set elements in a deterministic order (string hashing varies per process)."""
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=lambda item: (type(item).__name__, repr(item)))


# -- frame ------------------------------------------------------------------------


def _library_version() -> str:
    return __version__


def pack(value: Any, *, max_bytes: int, level: int = COMPRESSION_LEVEL) -> bytes:
    """Encode ``value`` into one frame of at most ``max_bytes`` bytes.

    ``level`` is the zlib level (0 stores the body uncompressed).  Raises
    :class:`WireError` naming the path of an unsupported value inside
    ``value``, and :class:`WireSizeError` when the frame is over ``max_bytes``.
    """
    encoder = _Encoder()
    structure_tree = encoder.encode(value, "value", 0)
    try:
        structure = msgpack.packb(structure_tree, use_bin_type=True)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError) as error:
        raise WireError(f"value: cannot encode the structure ({error}); {_SUPPORTED_HINT}") from None
    if len(structure) > MAX_STRUCTURE_BYTES:
        raise WireSizeError(_structure_too_big(len(structure)))
    blob = b""
    if encoder.tensors:
        try:
            blob = safetensors.torch.save({str(i): t for i, t in enumerate(encoder.tensors)})
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            raise WireError(f"value: cannot store its tensors ({error})") from None
    pieces = (_LENGTH.pack(len(structure)), structure, blob)
    flags = 0
    if level:
        compressor = zlib.compressobj(level)
        body = b"".join([*(compressor.compress(piece) for piece in pieces), compressor.flush()])
        flags |= FLAG_ZLIB
    else:
        body = b"".join(pieces)
    version = _library_version().encode("ascii", "replace")[:255]
    frame = b"".join((_HEADER.pack(MAGIC, FORMAT_VERSION, flags, len(version)), version, body))
    if len(frame) > max_bytes:
        raise WireSizeError(
            f"the value packs to {len(frame):,} bytes, over the limit of {max_bytes:,} bytes; "
            "send less (e.g. slice tensors before saving them, or save fewer of them)"
        )
    return frame


def _structure_too_big(length: int) -> str:
    return (f"the non-tensor part of the message is {length:,} bytes, over the limit of {MAX_STRUCTURE_BYTES:,}; "
            "send bulk numbers as tensors rather than Python lists")


def unpack(data: bytes, *, max_bytes: int, max_unpacked_bytes: int | None = None) -> Any:
    """Decode a frame made by :func:`pack`, trusting nothing in it.

    ``max_bytes`` caps the frame itself (checked first); ``max_unpacked_bytes``
    caps its decompressed size (default: ``DEFAULT_EXPANSION * max_bytes``).
    Every malformed or oversized input raises :class:`WireError`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame must be bytes, not {_type_name(data)}")
    if len(data) > max_bytes:
        raise WireSizeError(f"the message is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    data = bytes(data)
    limit = DEFAULT_EXPANSION * max_bytes if max_unpacked_bytes is None else max_unpacked_bytes
    flags, body = _read_header(data)
    payload = _decompress(body, limit) if flags & FLAG_ZLIB else body
    if len(payload) > limit:
        raise WireSizeError(f"the message body is {len(payload):,} bytes, over the limit of {limit:,} bytes")
    if len(payload) < _LENGTH.size:
        raise WireError(f"the message body is truncated: {len(payload)} bytes, too short to hold its layout")
    (structure_length,) = _LENGTH.unpack_from(payload)
    if structure_length > len(payload) - _LENGTH.size:
        raise WireError(
            f"the message body is truncated: its structure claims {structure_length:,} bytes "
            f"but only {len(payload) - _LENGTH.size:,} follow"
        )
    if structure_length > MAX_STRUCTURE_BYTES:
        raise WireSizeError(_structure_too_big(structure_length))
    structure_end = _LENGTH.size + structure_length
    tree = _read_structure(payload[_LENGTH.size:structure_end])
    tensors = _read_tensors(payload[structure_end:])
    return _Decoder(tensors).decode(tree, 0)


def inspect(data: bytes, *, max_bytes: int, max_unpacked_bytes: int | None = None) -> Any:
    """Check a frame as :func:`unpack` does, without holding its tensor data.

    The body is decompressed a chunk at a time: the structure and the
    safetensors header are kept (each under its own cap), the tensor bytes are
    only counted.  Tensors come back as ``meta`` tensors with the frame's dtypes
    and shapes, so a server can validate a request from a stranger in bounded
    memory, however far it would inflate.  Raises :class:`WireError` for
    everything :func:`unpack` refuses.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a frame must be bytes, not {_type_name(data)}")
    if len(data) > max_bytes:
        raise WireSizeError(f"the message is {len(data):,} bytes, over the limit of {max_bytes:,} bytes")
    limit = DEFAULT_EXPANSION * max_bytes if max_unpacked_bytes is None else max_unpacked_bytes
    flags, body = _read_header(bytes(data))
    reader = _StreamingBody(limit)
    if flags & FLAG_ZLIB:
        _decompress_into(body, limit, reader.feed)
    else:
        reader.feed(body)
    tree, header, data_length = reader.finish()
    for name, entry in header.items():
        _check_tensor_entry(name, entry, data_length, len(header))
    shapes = {name: torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]], device="meta")
              for name, entry in header.items()}
    return _Decoder(shapes).decode(tree, 0)


_CHUNK = 1 << 20


def _decompress_into(body: bytes, limit: int, sink: Any) -> None:
    """Decompress ``body`` a chunk at a time into ``sink``, stopping past ``limit`` bytes."""
    decompressor = zlib.decompressobj()
    total = 0
    pending = body
    try:
        while True:
            chunk = decompressor.decompress(pending, _CHUNK)
            pending = decompressor.unconsumed_tail
            total += len(chunk)
            if total > limit:
                raise WireSizeError(f"the message decompresses to more than the limit of {limit:,} bytes")
            if chunk:
                sink(chunk)
            if decompressor.eof or (not chunk and not pending):
                break
    except zlib.error as error:
        raise WireError(f"the message body is not valid compressed data ({error})") from None
    if not decompressor.eof:
        raise WireError("the message is truncated: its compressed body ends early")
    if decompressor.unused_data:
        raise WireError(f"the message has {len(decompressor.unused_data)} unexpected bytes after its compressed body")


class _StreamingBody:
    """Reads a frame body chunk by chunk: keeps the structure and the tensor
    header (each capped), counts the tensor bytes without keeping them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept = bytearray()  # the structure length, structure and tensor header, as they arrive
        self._total = 0
        self._structure_end: int | None = None
        self._header_end: int | None = None
        self._oversized_header: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._total += len(chunk)
        if self._total > self._limit:
            raise WireSizeError(f"the message body is {self._total:,} bytes, over the limit of {self._limit:,} bytes")
        if self._header_end is not None:
            return  # tensor data: counted, not kept
        self._kept += chunk
        self._find_ends()
        if self._header_end is not None:
            del self._kept[self._header_end:]

    def _find_ends(self) -> None:
        kept = self._kept
        if self._structure_end is None and len(kept) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(kept)
            if length > MAX_STRUCTURE_BYTES:
                raise WireSizeError(_structure_too_big(length))
            self._structure_end = _LENGTH.size + length
        start = self._structure_end
        if start is not None and self._header_end is None and len(kept) >= start + _LENGTH.size:
            (length,) = _LENGTH.unpack_from(kept, start)
            if length > MAX_STRUCTURE_BYTES:
                # Keep nothing more; finish() tells a lie about the length from a header too big.
                self._oversized_header = length
                self._header_end = start + _LENGTH.size
            elif len(kept) >= start + _LENGTH.size + length:
                self._header_end = start + _LENGTH.size + length

    def finish(self) -> tuple[Any, dict, int]:
        """The structure, the tensor header (without metadata) and the length of the tensor data."""
        kept = self._kept
        if len(kept) < _LENGTH.size:
            raise WireError(f"the message body is truncated: {len(kept)} bytes, too short to hold its layout")
        if self._structure_end is None or self._structure_end > len(kept):
            raise WireError("the message body is truncated: its structure claims more bytes than follow")
        tree = _read_structure(bytes(kept[_LENGTH.size:self._structure_end]))
        if self._total == self._structure_end:
            return tree, {}, 0
        if self._header_end is None:
            raise WireError("malformed tensor data: the safetensors header is truncated")
        if self._oversized_header is not None:
            follow = self._total - self._header_end
            if self._oversized_header > follow:
                raise WireError(f"malformed tensor data: the safetensors header claims {self._oversized_header:,} "
                                f"bytes but only {follow:,} follow")
            raise WireSizeError(f"the tensor header is {self._oversized_header:,} bytes, over the limit of "
                                f"{MAX_STRUCTURE_BYTES:,}; send fewer, larger tensors")
        raw = bytes(kept[self._structure_end + _LENGTH.size:self._header_end])
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise WireError(f"malformed tensor data: the safetensors header is not valid JSON ({error})") from None
        if not isinstance(header, dict):
            raise WireError("malformed tensor data: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        return tree, header, self._total - self._header_end


def _read_header(data: bytes) -> tuple[int, bytes]:
    """Check the header; return the flags and the body after it."""
    if len(data) < _HEADER.size:
        raise WireError(
            f"the message is truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte "
            "header of a seethrough wire frame"
        )
    magic, version, flags, version_length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(
            f"not a seethrough wire frame: it starts with {data[:4]!r} instead of {MAGIC!r} "
            "(was it sent by a seethrough client or server?)"
        )
    sender = data[_HEADER.size:_HEADER.size + version_length].decode("ascii", "replace") or "unknown"
    if version != FORMAT_VERSION:
        raise WireVersionError(
            f"wire format version mismatch: the message uses version {version} (sent by seethrough "
            f"{sender}) but this side (seethrough {_library_version()}) reads version {FORMAT_VERSION}; "
            "install the same seethrough version on the client and the server"
        )
    if flags & ~KNOWN_FLAGS:
        raise WireError(f"the frame header has unknown flags 0x{flags:02x}; it is corrupt or from a newer seethrough")
    if len(data) < _HEADER.size + version_length:
        raise WireError("the message is truncated inside its header")
    return flags, data[_HEADER.size + version_length:]


def _decompress(body: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        payload = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise WireError(f"the message body is not valid compressed data ({error})") from None
    if len(payload) > limit or decompressor.unconsumed_tail:
        raise WireSizeError(f"the message decompresses to more than the limit of {limit:,} bytes")
    if not decompressor.eof:
        raise WireError("the message is truncated: its compressed body ends early")
    if decompressor.unused_data:
        raise WireError(f"the message has {len(decompressor.unused_data)} unexpected bytes after its compressed body")
    return payload


def _read_structure(raw: bytes) -> Any:
    size = max(len(raw), 1)
    try:
        return msgpack.unpackb(
            raw, raw=False, use_list=True, strict_map_key=True,
            max_str_len=size, max_bin_len=size, max_array_len=size, max_map_len=0, max_ext_len=0,
        )
    except msgpack.exceptions.StackError:
        raise WireError(f"malformed structure: nested deeper than {MESSAGE_DEPTH} levels") from None
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as error:
        detail = str(error) or type(error).__name__
        raise WireError(f"malformed structure in the message (msgpack: {detail})") from None


def _read_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    if not blob:
        return {}
    if len(blob) < _LENGTH.size:
        raise WireError(f"malformed tensor data: {len(blob)} bytes, too short for a safetensors header")
    (header_length,) = _LENGTH.unpack_from(blob)
    if header_length > len(blob) - _LENGTH.size:
        raise WireError(f"malformed tensor data: the safetensors header claims {header_length:,} bytes "
                        f"but only {len(blob) - _LENGTH.size:,} follow")
    try:
        header = json.loads(blob[_LENGTH.size:_LENGTH.size + header_length])
    except (ValueError, UnicodeDecodeError) as error:
        raise WireError(f"malformed tensor data: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise WireError("malformed tensor data: the safetensors header is not a JSON object")
    data_length = len(blob) - _LENGTH.size - header_length
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_tensor_entry(name, entry, data_length, len(header))
    try:
        return safetensors.torch.load(blob)
    except Exception as error:  # safetensors raises its own untyped errors; none may escape raw
        raise WireError(f"malformed tensor data: safetensors could not read it ({error})") from None


def _check_tensor_entry(name: str, entry: Any, data_length: int, count: int) -> None:
    where = f"malformed tensor data: tensor {name!r}"
    if not (name.isdigit() and int(name) < count):
        raise WireError(f"{where} has an unexpected name (expected 0..{count - 1})")
    if not isinstance(entry, dict):
        raise WireError(f"{where} has no description")
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise WireError(f"{where} has an unsupported dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise WireError(f"{where} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise WireError(f"{where} has invalid data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_length:
        raise WireError(f"{where} claims bytes {begin:,}..{end:,} but the data holds only {data_length:,} bytes")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != end - begin:
        raise WireError(f"{where} claims shape {shape} ({claimed:,} bytes) but spans {end - begin:,} bytes")


# -- decoding ---------------------------------------------------------------------


def _model_output_by_name(name: str) -> type | None:
    """A ModelOutput subclass exported by transformers, or None (never other classes)."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    try:
        import transformers
        import transformers.modeling_outputs
        from transformers.utils import ModelOutput
    except ImportError:
        return None
    for namespace in (transformers.modeling_outputs, transformers):
        try:
            cls = getattr(namespace, name, None)
        except Exception:  # transformers' lazy module may fail to import the model file
            cls = None
        if isinstance(cls, type) and issubclass(cls, ModelOutput):
            return cls
    return None


def _return_type_by_name(name: str) -> type | None:
    import torch.return_types as return_types

    if not name.isidentifier() or name.startswith("_"):
        return None
    cls = getattr(return_types, name, None)
    if isinstance(cls, type) and issubclass(cls, tuple) and cls.__module__ == "torch.return_types":
        return cls
    return None


class _Decoder:
    """Rebuilds a value from the tagged structure, checking every node."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._complex: dict[int, torch.Tensor] = {}

    def decode(self, node: Any, depth: int) -> Any:
        if depth > MESSAGE_DEPTH:
            raise WireError(f"malformed structure: nested deeper than {MESSAGE_DEPTH} levels")
        if node is None or type(node) in (bool, int, float, str, bytes):
            return node
        if type(node) is not list or not node or type(node[0]) is not int:
            raise WireError(f"malformed structure: unexpected {type(node).__name__} where a value was expected")
        tag, fields = node[0], node[1:]
        if tag in (TAG_LIST, TAG_TUPLE, TAG_SET, TAG_FROZENSET):
            items = [self.decode(field, depth + 1) for field in fields]
            if tag == TAG_LIST:
                return items
            if tag == TAG_TUPLE:
                return tuple(items)
            try:
                return set(items) if tag == TAG_SET else frozenset(items)
            except TypeError:
                raise WireError("malformed structure: a set holds an unhashable element") from None
        if tag == TAG_DICT:
            return self._dict(fields, depth)
        if tag in (TAG_TENSOR, TAG_COMPLEX_TENSOR):
            return self._tensor(tag, fields)
        if tag == TAG_MODEL_OUTPUT:
            return self._model_output(fields, depth)
        if tag == TAG_RETURN_TYPE:
            return self._return_type(fields, depth)
        return self._simple(tag, fields, depth)

    def _simple(self, tag: int, fields: list, depth: int) -> Any:
        if tag == TAG_COMPLEX:
            if len(fields) != 2 or not all(type(part) is float for part in fields):
                raise WireError("malformed structure: a complex number needs two floats")
            return complex(*fields)
        if tag == TAG_SLICE:
            if len(fields) != 3:
                raise WireError("malformed structure: a slice needs start, stop and step")
            return slice(*(self.decode(field, depth + 1) for field in fields))
        if tag == TAG_ELLIPSIS:
            if fields:
                raise WireError("malformed structure: Ellipsis takes no fields")
            return Ellipsis
        if tag == TAG_SIZE:
            if not all(type(dim) is int and 0 <= dim < 2**63 for dim in fields):
                raise WireError("malformed structure: a torch.Size holds something other than dimensions")
            return torch.Size(fields)
        if tag == TAG_DTYPE:
            dtype = _DTYPES_BY_NAME.get(fields[0]) if len(fields) == 1 and type(fields[0]) is str else None
            if dtype is None:
                raise WireError(f"malformed structure: unknown torch dtype {fields[:1]!r}")
            return dtype
        if tag == TAG_DEVICE:
            if len(fields) != 1 or type(fields[0]) is not str or len(fields[0]) > 64:
                raise WireError("malformed structure: a torch.device needs its name")
            try:
                return torch.device(fields[0])
            except (RuntimeError, ValueError):
                raise WireError(f"malformed structure: {fields[0]!r} is not a torch device") from None
        raise WireError(f"malformed structure: unknown tag {tag} (is the message from a newer seethrough?)")

    def _dict(self, fields: list, depth: int) -> dict:
        if len(fields) % 2:
            raise WireError("malformed structure: a dict has a key without a value")
        result: dict[Any, Any] = {}
        for i in range(0, len(fields), 2):
            key = fields[i]
            if type(key) not in (str, int, bool):
                raise WireError(f"malformed structure: a dict key of type {type(key).__name__} (keys are strings or integers)")
            if key in result:
                raise WireError(f"malformed structure: the dict key {key!r} appears twice")
            result[key] = self.decode(fields[i + 1], depth + 1)
        return result

    def _tensor(self, tag: int, fields: list) -> torch.Tensor:
        if len(fields) != 1 or type(fields[0]) is not int:
            raise WireError("malformed structure: a tensor reference needs one index")
        index = fields[0]
        tensor = self._tensors.get(str(index)) if 0 <= index else None
        if tensor is None:
            raise WireError(
                f"malformed structure: tensor reference {index} is out of range "
                f"(the message holds {len(self._tensors)} tensors)"
            )
        if tag == TAG_TENSOR:
            return tensor
        if index not in self._complex:
            if tensor.dtype not in _COMPLEX_VIA_REAL.values() or tensor.dim() == 0 or tensor.shape[-1] != 2:
                raise WireError(f"malformed structure: tensor {index} cannot be read as complex numbers")
            self._complex[index] = torch.view_as_complex(tensor)
        return self._complex[index]

    def _model_output(self, fields: list, depth: int) -> Any:
        if not fields or type(fields[0]) is not str or len(fields) % 2 != 1:
            raise WireError("malformed structure: a model output needs its class name and fields")
        items = self._dict(fields[1:], depth)
        cls = _model_output_by_name(fields[0])
        if cls is None or not all(type(key) is str for key in items):
            return items
        try:
            return cls(**items)
        except (TypeError, ValueError):
            return items  # fields that this transformers version's class lacks: keep the data

    def _return_type(self, fields: list, depth: int) -> Any:
        if not fields or type(fields[0]) is not str:
            raise WireError("malformed structure: a torch.return_types value needs its name")
        items = tuple(self.decode(field, depth + 1) for field in fields[1:])
        cls = _return_type_by_name(fields[0])
        if cls is None:
            return items
        try:
            return cls(items)
        except (TypeError, ValueError):
            return items


# -- statistics -------------------------------------------------------------------


def payload_stats(value: Any) -> dict[str, int]:
    """Count the tensors in ``value`` and their bytes (each tensor object once).

    Returns ``{"tensors": count, "tensor_bytes": total}``; compare with
    ``len(pack(value, ...))`` to see the overhead of the wire format.
    """
    seen: set[int] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MESSAGE_DEPTH:
            continue
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, slice):
            stack.extend((child, depth + 1) for child in (item.start, item.stop, item.step))
    return {"tensors": len(seen), "tensor_bytes": total}
