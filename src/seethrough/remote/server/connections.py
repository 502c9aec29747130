"""Connection limits in front of the API: head deadline, per-address and total caps.

uvicorn (with h11) parses HTTP; this module only decides which connections
it keeps.  :func:`guarded_protocol` returns a subclass of uvicorn's
``H11Protocol`` that shares one :class:`ConnectionGuard`:

* **head deadline** (``--header-timeout``): a connection that is not serving
  a request — just opened, or done with its last response — must deliver a
  complete request head within the deadline, or it is closed.  A client that
  opens sockets and never writes, or writes a head one byte at a time, holds
  nothing for long.  Idle keep-alive connections that send no byte at all are
  closed sooner, after ``--keep-alive`` seconds (uvicorn's own timer).
* **per-address cap** (``--max-connections-per-address``): past it, a new
  connection from that address gets an immediate ``503`` with
  ``Retry-After`` and is closed.
* **total cap** (``--max-connections``, by default set from the process's
  open-file limit with room left for the spool, the worker pipes and one
  burst of accepts): when it is reached, the oldest connection that is only
  waiting (no request in progress) from the address that holds the most
  connections is closed to make room, so health, status and result requests
  from anyone else still get in; when every connection is
  serving a request, the new one gets an immediate ``503``.  A refusal is
  written and the socket closed at once: nothing waits, and the process never
  runs out of file descriptors (which would stop it accepting anyone).

* **head size**: a request head (request line and headers, cookies
  included) over 16 KiB gets ``431`` and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard", "ConnectionLimits", "deepen_listen_queues", "guarded_protocol", "plan_connections"]

logger = logging.getLogger("seethrough.server")

_RESERVED_FILES = 128  # spool files, worker and checker pipes, logs, imports
_ACCEPT_BURST = 64  # sockets asyncio accepts in one go (uvicorn's backlog), before any is refused
LISTEN_QUEUE = 4096  # connections the kernel holds for accept (Linux's default somaxconn)
_DEFAULT_MAX_CONNECTIONS = 8192
_RETRY_AFTER_S = 2
MAX_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    """The front door's connection limits (from the server's settings)."""

    max_connections: int
    max_per_address: int
    header_timeout: float
    backlog: int  # uvicorn's backlog: how many sockets asyncio accepts in one go


def plan_connections(requested: int | None, per_address: int, header_timeout: float) -> ConnectionLimits:
    """Raise the open-file limit as far as allowed and fit the connection cap under it.

    ``requested`` is ``--max-connections`` (None: as many as the file limit
    allows, up to 8192).  Room is left for one burst of accepts (asyncio
    accepts up to uvicorn's ``backlog`` sockets in one go, before any is
    refused) and for the server's own files; a request above what fits is
    lowered, with a warning.  The kernel's listen queue is deepened separately
    (:func:`deepen_listen_queues`), so a burst of connects never drops the
    SYN of someone else's connection (a dropped SYN costs its sender 1 s)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    target = min(target, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    files = soft if soft != resource.RLIM_INFINITY else 1 << 20
    backlog = min(_ACCEPT_BURST, max(16, files // 16))
    # a few bursts may be accepted before the sockets of refused and closed connections are released
    fits = max(16, files - 4 * backlog - _RESERVED_FILES)
    cap = min(fits, _DEFAULT_MAX_CONNECTIONS) if requested is None else requested
    if cap > fits:
        logger.warning("--max-connections %d does not fit under the open-file limit of %d; using %d", cap, files, fits)
        cap = fits
    return ConnectionLimits(max_connections=cap, max_per_address=min(per_address, cap),
                            header_timeout=header_timeout, backlog=backlog)


def deepen_listen_queues(servers: list[Any]) -> None:
    """Give each listening socket of ``servers`` (asyncio servers) a deep kernel queue."""
    for server in servers:
        for sock in getattr(server, "sockets", ()) or ():  # asyncio's wrappers: listen on a duplicate
            try:
                with socket.fromfd(sock.fileno(), sock.family, sock.type) as duplicate:
                    duplicate.listen(LISTEN_QUEUE)
            except OSError:
                pass


def _refusal(detail: str, status: bytes = b"503 Service Unavailable") -> bytes:
    body = json.dumps({"detail": detail}).encode("utf-8")
    retry = b"retry-after: %d\r\n" % _RETRY_AFTER_S if status.startswith(b"503") else b""
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n%sconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, retry, len(body), body))


_HEAD_TOO_LARGE = _refusal(f"the request head (request line and headers, cookies included) is over "
                           f"{MAX_HEAD_BYTES:,} bytes; send fewer or shorter headers",
                           b"431 Request Header Fields Too Large")


class ConnectionGuard:
    """Counts of open connections (total and per address) and the ones only waiting."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_address: dict[str, int] = {}
        self.waiting: OrderedDict[Any, None] = OrderedDict()  # oldest first
        self.waiting_by_address: dict[str, OrderedDict[Any, None]] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0

    def admit(self, connection: Any, address: str) -> str | None:
        """Count ``connection`` in, or say why it is refused."""
        if self.by_address.get(address, 0) >= self.limits.max_per_address:
            self.refused += 1
            return (f"too many connections from your address (the limit is {self.limits.max_per_address}); "
                    "close idle connections or reuse one (keep-alive), then retry")
        if self.total >= self.limits.max_connections:
            victim = self._victim()
            if victim is None:
                self.refused += 1
                return (f"the server has as many connections as it accepts ({self.limits.max_connections}), all "
                        "busy; retry in a few seconds")
            self.evicted += 1
            victim.drop()
        self.total += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return None

    def _victim(self) -> Any:
        """The oldest waiting connection of the address that holds the most connections."""
        if not self.waiting_by_address:
            return None
        heaviest = max(self.waiting_by_address, key=lambda address: self.by_address.get(address, 0))
        return next(iter(self.waiting_by_address[heaviest]))

    def wait(self, connection: Any) -> None:
        """``connection`` now waits for a request head (newest last)."""
        self.unwait(connection)
        self.waiting[connection] = None
        self.waiting_by_address.setdefault(connection._address, OrderedDict())[connection] = None

    def unwait(self, connection: Any) -> None:
        if self.waiting.pop(connection, 0) is None:
            line = self.waiting_by_address[connection._address]
            del line[connection]
            if not line:
                del self.waiting_by_address[connection._address]

    def release(self, connection: Any, address: str) -> None:
        self.unwait(connection)
        self.total -= 1
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)

    def describe(self) -> dict[str, int]:
        return {"open": self.total, "max": self.limits.max_connections, "refused": self.refused,
                "closed_waiting": self.evicted, "head_timeouts": self.timed_out}


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's h11 protocol with ``guard``'s limits (pass it as ``uvicorn.Config(http=...)``)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._address = self.client[0] if self.client else "?"
            self._head_timer: asyncio.TimerHandle | None = None
            refusal = guard.admit(self, self._address)
            self._admitted = refusal is None
            if refusal is not None:
                transport.write(_refusal(refusal))
                transport.close()
                return
            self._waiting()

        def connection_lost(self, exc: Exception | None) -> None:
            if getattr(self, "_admitted", False):
                self._admitted = False
                guard.release(self, self._address)
                self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not getattr(self, "_admitted", False):
                return  # refused: the answer is written, the socket is closing
            if self.conn.their_state is h11.IDLE:  # a head is being read: cap it, however it arrives
                pending = self.conn.trailing_data[0] + data
                if len(pending) > MAX_HEAD_BYTES and b"\r\n\r\n" not in pending[:MAX_HEAD_BYTES + 4]:
                    self._admitted = False
                    guard.release(self, self._address)
                    self._cancel_head_timer()
                    self.transport.write(_HEAD_TOO_LARGE)
                    self.transport.close()
                    return
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self._serving():
                guard.unwait(self)
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._admitted and not self.transport.is_closing() and not self._serving():
                self._waiting()

        # -- the head deadline ------------------------------------------------------
        def _serving(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _waiting(self) -> None:
            guard.wait(self)
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(guard.limits.header_timeout, self._head_deadline)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self._serving() or self.transport.is_closing():
                return
            guard.timed_out += 1
            self.drop()

        def drop(self) -> None:
            """Close a connection that is only waiting (no request in progress)."""
            guard.unwait(self)
            if not self.transport.is_closing():
                if self.conn.our_state is not h11.ERROR:
                    try:
                        self.conn.send(h11.ConnectionClosed())
                    except h11.LocalProtocolError:
                        pass
                self.transport.close()

    return GuardedH11Protocol
