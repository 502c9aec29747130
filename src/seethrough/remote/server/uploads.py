"""Request bodies streamed to the spool as they arrive, never held in memory.

:func:`receive_body` writes a submission's body to a private file in the
spool chunk by chunk (uvicorn hands over at most 64 KiB at a time and stops
reading the socket until that is taken; each write runs in a thread, since a
write blocks while the kernel flushes dirty pages), so the API process's memory does
not grow with the size or the number of uploads.  Before any byte is read,
and again as a body without ``Content-Length`` (chunked) grows, its size is
checked against ``--max-request-bytes`` (413) and against what the key may
still store (``--max-stored-bytes-per-key`` minus what it stores and what its
other uploads in flight have announced: 429).

:class:`UploadGate` counts the uploads each key has in flight
(``--max-uploads-per-key``; past it: 429 with ``Retry-After``).  A client
that sends no byte for ``--body-timeout`` seconds, or has not finished its
body within ``--upload-timeout``, gets 408 and the connection is closed; a
client that disconnects is simply dropped.  Either way the partial file is
removed.  A body refused before it is complete (413, 429) is answered at once
and the rest of it is read and thrown away, so the client sees the answer
rather than a reset; the connection's head deadline (:mod:`.connections`)
bounds how long that goes on.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastapi import HTTPException

__all__ = ["ClientGone", "Upload", "UploadGate", "receive_body"]

_CLOSE = {"Connection": "close"}


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


class UploadGate:
    """Uploads in flight per key, and the bytes each announced (for the quota)."""

    def __init__(self, max_per_key: int, max_stored: int, stored: Callable[[Any], int]) -> None:
        self.max_per_key = max_per_key
        self.max_stored = max_stored
        self._stored = stored
        self._count: dict[Any, int] = {}
        self._reserved: dict[Any, int] = {}

    def open(self, key: Any, owner: Any) -> "Upload":
        """Start an upload for ``key`` (whose turn), stored under ``owner`` (whose quota); 429 past the cap."""
        count = self._count.get(key, 0)
        if count >= self.max_per_key:
            raise HTTPException(429, f"this API key is already sending {count} request bodies (the limit is "
                                     f"{self.max_per_key}); wait for them to finish, then submit again.",
                                headers={"Retry-After": "2"})
        self._count[key] = count + 1
        return Upload(self, key, owner)

    def in_flight(self, key: Any) -> int:
        return self._count.get(key, 0)

    def _grow(self, upload: "Upload", size: int) -> None:
        extra = size - upload.reserved
        if extra <= 0:
            return
        stored, reserved = self._stored(upload.owner), self._reserved.get(upload.owner, 0)
        if stored + reserved + extra > self.max_stored:
            raise HTTPException(429, (
                f"this request body is {size:,} bytes or more; this API key stores {stored:,} bytes on the server "
                f"and its other uploads in flight announce {reserved - upload.reserved:,} more, over the limit of "
                f"{self.max_stored:,} bytes; fetch and delete finished results (DELETE /v1/requests/{{id}}), or wait "
                "for them to expire"), headers={"Retry-After": "10"})
        self._reserved[upload.owner] = reserved + extra
        upload.reserved = size

    def _close(self, upload: "Upload") -> None:
        left = self._count.get(upload.key, 1) - 1
        if left > 0:
            self._count[upload.key] = left
        else:
            self._count.pop(upload.key, None)
        reserved = self._reserved.get(upload.owner, 0) - upload.reserved
        if reserved > 0:
            self._reserved[upload.owner] = reserved
        else:
            self._reserved.pop(upload.owner, None)
        upload.reserved = 0


@dataclass(eq=False)
class Upload:
    """One body being received (a context manager: leaving it releases the slot)."""

    gate: UploadGate
    key: Any  # whose uploads in flight it counts against
    owner: Any  # whose stored-bytes quota it counts against
    reserved: int = 0

    def grow(self, size: int) -> None:
        """The body is at least ``size`` bytes: reserve them against the key's quota (429 past it)."""
        self.gate._grow(self, size)

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gate._close(self)


def _too_large(size: int | None, limit: int) -> HTTPException:
    said = f"is {size:,} bytes" if size is not None else "is"
    return HTTPException(413, f"the request {said} over this server's limit of {limit:,} bytes; send smaller "
                              "tensors, or ask the operator to raise --max-request-bytes.")


async def receive_body(request: Any, upload: Upload, folder: Path, *, limit: int, body_timeout: float,
                       upload_timeout: float) -> tuple[Path, int]:
    """Stream ``request``'s body into a new file in ``folder``; return its path and size.

    Raises HTTPException (400, 408, 413, 429) or :class:`ClientGone`; the file
    is removed on any failure."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"the Content-Length header {declared!r} is not a number") from None
        if size > limit:
            raise _too_large(size, limit)
        upload.grow(size)
    path = folder / f"upload-{secrets.token_hex(12)}.part"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    total = 0
    deadline = time.monotonic() + upload_timeout
    loop = asyncio.get_running_loop()
    try:
        with os.fdopen(descriptor, "wb", buffering=0) as handle:
            while True:
                left = deadline - time.monotonic()
                try:
                    message = await asyncio.wait_for(request.receive(), min(body_timeout, max(left, 0.0)))
                except asyncio.TimeoutError:
                    if left <= body_timeout:
                        detail = (f"the request body was not complete within {upload_timeout:g} s (--upload-timeout); "
                                  "send it faster, or send less")
                    else:
                        detail = (f"no part of the request body arrived for {body_timeout:g} s (--body-timeout); the "
                                  "upload was cut off, submit it again")
                    raise HTTPException(408, detail, headers=_CLOSE) from None
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                if chunk:
                    total += len(chunk)
                    if total > limit:
                        raise _too_large(None, limit)
                    if declared is None:
                        upload.grow(total)
                    # in a thread: a write can block while the kernel flushes dirty pages to disk
                    await loop.run_in_executor(None, handle.write, chunk)
                if not message.get("more_body", False):
                    break
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, total
