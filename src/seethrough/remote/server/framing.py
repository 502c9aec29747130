"""Messages between the API process and its worker processes.

Workers and the API process talk over a ``multiprocessing`` pipe, but only
with ``send_bytes``/``recv_bytes``: nothing on the pipe is ever unpickled.  A
message is::

    length of the header   uint32, little-endian
    header                 JSON object with a "type" (and small fields)
    payload                raw bytes (a wire frame), possibly empty

The API process reads worker messages as untrusted input (a worker runs
strangers' code): :func:`decode` checks sizes and types and raises
:class:`FramingError` for anything malformed.

Message types
-------------
API -> worker: ``run`` (payload: the request's wire bytes), ``stop``,
``cancel`` (kill the running request's process; a forking worker answers
``cancelled`` and serves the next request).
Worker -> API: ``ready`` (payload: JSON description of the model), ``failed``
(``message``: why the model could not load), ``log`` (``text``: one printed
line), ``answer`` (payload: the wire-packed answer; ``replace``: true when the
worker found the served model changed and must be replaced, ``reason``),
``progress`` (``step``: forward passes so far of a running generation),
``cancelled`` (the running request's process was killed, as asked).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FramingError", "Message", "MAX_HEADER_BYTES", "decode", "encode"]

MAX_HEADER_BYTES = 1024 * 1024
_LENGTH = struct.Struct("<I")


class FramingError(ValueError):
    """A pipe message that does not have the expected shape."""


@dataclass
class Message:
    """One decoded pipe message."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode(kind: str, payload: bytes = b"", **fields: Any) -> bytes:
    """One message of type ``kind`` with small JSON ``fields`` and a raw ``payload``."""
    header = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise FramingError(f"message header of {len(header):,} bytes is over {MAX_HEADER_BYTES:,}")
    return b"".join((_LENGTH.pack(len(header)), header, payload))


def decode(data: bytes) -> Message:
    """Read a message made by :func:`encode`, trusting nothing in it."""
    if len(data) < _LENGTH.size:
        raise FramingError(f"pipe message of {len(data)} bytes is too short for its header length")
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_HEADER_BYTES or length > len(data) - _LENGTH.size:
        raise FramingError(f"pipe message claims a header of {length:,} bytes")
    try:
        header = json.loads(data[_LENGTH.size:_LENGTH.size + length])
    except (ValueError, UnicodeDecodeError) as error:
        raise FramingError(f"pipe message header is not JSON ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FramingError("pipe message header is not an object with a type")
    kind = header.pop("type")
    return Message(kind, header, bytes(data[_LENGTH.size + length:]))


def log_cut_notice(max_lines: int, max_bytes: int) -> str:
    """The line that replaces a request's printed output past its limits
    (the worker cuts it, and the API process again, not trusting the worker)."""
    return (f"[seethrough server: output cut here; a request may print at most {max_lines:,} "
            f"lines and {max_bytes:,} bytes]")
