"""Request checks off the API's event loop: a small pool of checker processes.

Every submitted body is checked (:func:`.intake.check_request`: decode with
caps, protocol, sandbox validation of the code) before it is queued.  A body
comes from a stranger and checking it costs CPU (parsing code) and memory
(the decoded structure), so it never runs in the API process:

* each check runs in one of ``--check-workers`` long-lived processes, each
  with an address-space limit, so a bomb can cost at most that process;
* each check has a wall-clock deadline (``--check-timeout``); past it the
  checker is killed and replaced, and the request is refused with 400;
* checker time is shared between keys (the API key, or the client's address
  on an open server): waiting checks are served round-robin across keys, one
  key may use at most ``--max-checks-per-key`` checkers at once (by default
  half of them), so another key always finds one free, and at most
  ``--max-waiting-checks-per-key`` of its bodies may wait (past it: 429);
* a key whose bodies keep being refused is slowed down while others wait:
  its checks get a checker only when no other key's check waits, and, while
  the checkers are all busy or others wait, after ``n`` refusals in a row its
  next check first sits out ``0.25 * 2**(n-1)`` s (at most 30 s); one
  accepted body, or a minute without refusals, resets it (a key alone on an
  idle server is not slowed down);
* at most ``16 * --check-workers`` checks wait in all; past that the API
  answers 503 at once rather than queueing without bound;
* the event loop only awaits a thread that moves bytes over a pipe, so health,
  status and other users' requests keep their latency whatever a check costs.

Pipe messages use :mod:`.framing` (JSON headers and raw bytes, never pickle):
API -> checker ``check`` (``path``: the spool file holding the request's wire
bytes, which the checker reads itself, or the bytes as payload; ``models``: each
served model's module paths; ``aliases``: other names -> served names); checker -> API ``checked`` (``model``,
``filename``) or ``refused`` (``status``, ``detail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

from . import framing
from .intake import IntakeError, check_request
from .worker import _limit_memory

__all__ = ["CheckedRequest", "CheckerPool"]

logger = logging.getLogger("seethrough.server")

# Waiting checks per checker process before new submissions get 503.
_WAITING_PER_CHECKER = 16
_PENALTY_BASE_S = 0.25  # a key's wait before its next check after one refusal; doubles with each more
_PENALTY_MAX_S = 30.0
_PENALTY_MEMORY_S = 60.0  # refusals older than this are forgotten


@dataclass(frozen=True)
class CheckedRequest:
    """What the API process needs of a request that passed its checks."""

    model: str
    filename: str


@dataclass(frozen=True)
class CheckLimits:
    """The caps a checker process applies (from the server's settings)."""

    max_bytes: int
    max_unpacked_bytes: int
    max_source_bytes: int
    memory: int | None  # address space a check may add to the checker process


def _serve(conn: Any, limits: CheckLimits) -> None:
    """Entry point of a checker process: answer ``check`` messages until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's business
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _limit_memory(limits.memory, False)
    while True:
        try:
            message = framing.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if message.type != "check":
            continue
        models, aliases = message.fields.get("models"), message.fields.get("aliases")
        models = models if isinstance(models, dict) else {}
        aliases = aliases if isinstance(aliases, dict) else {}
        try:
            payload = message.payload
            if not payload and isinstance(message.fields.get("path"), str):
                payload = _read_spooled(message.fields["path"], limits.max_bytes)
            request = check_request(payload, max_bytes=limits.max_bytes,
                                    max_unpacked_bytes=limits.max_unpacked_bytes,
                                    max_source_bytes=limits.max_source_bytes,
                                    models={name: {"modules": paths} for name, paths in models.items()},
                                    aliases=aliases)
            reply = framing.encode("checked", model=request.model, filename=request.filename)
        except IntakeError as error:
            reply = framing.encode("refused", status=error.status, detail=error.detail)
        except MemoryError:
            reply = framing.encode("refused", status=413, detail=(
                "the request needs more memory to check than this server allows; send smaller values"))
        except Exception as error:  # noqa: BLE001 - any other failure refuses this request only
            reply = framing.encode("refused", status=400, detail=(
                f"the request cannot be checked ({type(error).__name__}); send the request made by the "
                "seethrough client"))
        try:
            conn.send_bytes(reply)
        except (EOFError, OSError):
            return


def _read_spooled(path: str, limit: int) -> bytes:
    """A body the API streamed to the spool (no more than ``limit`` + 1 bytes of it)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    except OSError as error:
        raise IntakeError(400, f"the request body could not be read back ({error.strerror}); submit it again") from None


class _Checker:
    """One checker process and the API process's end of its pipe."""

    def __init__(self, context: Any, limits: CheckLimits) -> None:
        self._context = context
        self._limits = limits
        self.process: Any = None
        self.conn: Any = None

    def start(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        self.process = self._context.Process(target=_serve, args=(child, self._limits), daemon=True,
                                             name="seethrough-checker")
        self.process.start()
        child.close()
        self.conn = parent

    def stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        if self.conn is not None:
            self.conn.close()

    def exchange(self, message: bytes, timeout: float) -> framing.Message:
        """Send one check and wait for its answer; on a timeout or death, replace the process."""
        if self.process is None or not self.process.is_alive():
            self.stop()
            self.start()
        try:
            self.conn.send_bytes(message)
            if self.conn.poll(timeout):
                return framing.decode(self.conn.recv_bytes(framing.MAX_HEADER_BYTES + 4096))
            problem = IntakeError(400, f"the request took longer than {timeout:g} s to check (its code is too large "
                                       "or too deeply nested); simplify it")
        except (EOFError, OSError, framing.FramingError):
            problem = IntakeError(413, "checking the request needed more memory than this server allows; send "
                                       "smaller values (or fewer of them)")
        self.stop()
        self.start()
        raise problem


class CheckerPool:
    """``size`` checker processes, shared fairly between keys (see the module docs)."""

    def __init__(self, context: Any, limits: CheckLimits, size: int, timeout: float, *,
                 max_running_per_key: int | None = None, max_waiting_per_key: int = 4) -> None:
        self._timeout = timeout
        self._free = [_Checker(context, limits) for _ in range(size)]
        self._all = list(self._free)
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="seethrough-check")
        self.max_running_per_key = max_running_per_key or max(1, size // 2)
        self.max_waiting_per_key = max_waiting_per_key
        self._max_waiting = _WAITING_PER_CHECKER * size
        self._lines: dict[Hashable, deque[asyncio.Future]] = {}  # waiting checks per key, oldest first
        self._turns: deque[Hashable] = deque()  # keys with waiting checks, in the order they are served
        self._waiting: dict[Hashable, int] = {}  # per key: waiting in line or sitting out a slow-down
        self._running: dict[Hashable, int] = {}
        self._refusals: dict[Hashable, tuple[int, float]] = {}  # per key: refusals in a row, when the last was

    def start(self) -> None:
        for checker in self._all:
            checker.start()

    def stop(self) -> None:
        for checker in self._all:
            checker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        return [checker.process.pid for checker in self._all if checker.process is not None]

    def refusals(self, key: Hashable) -> int:
        """``key``'s refused bodies in a row (forgotten a minute after the last)."""
        count, last = self._refusals.get(key, (0, 0.0))
        if count and time.monotonic() - last > _PENALTY_MEMORY_S:
            self._refusals.pop(key, None)
            return 0
        return count

    def _refused(self, key: Hashable) -> None:
        self._refusals[key] = (self.refusals(key) + 1, time.monotonic())

    def slowdown(self, key: Hashable) -> float:
        """Seconds ``key``'s next check sits out before it queues (0 unless its bodies keep being
        refused while the checkers are contended)."""
        refusals = self.refusals(key)
        contended = not self._free or any(other != key for other in self._waiting)
        if refusals == 0 or not contended:
            return 0.0
        return min(_PENALTY_MAX_S, _PENALTY_BASE_S * 2 ** (refusals - 1))

    async def check(self, body: bytes | Path, module_paths: dict[str, list[str]],
                    aliases: dict[str, str] | None = None, key: Hashable = None) -> CheckedRequest:
        """Check ``body`` (its bytes, or the spool file holding them) in a checker process.

        Raises :class:`IntakeError` to refuse it.  ``module_paths``: each served
        model's module paths; ``aliases``: the other names a model answers to,
        mapped to its served name; ``key``: whose turn this is (the API key's
        digest, or the client's address)."""
        waiting = self._waiting.get(key, 0)
        delay = self.slowdown(key)
        if waiting >= self.max_waiting_per_key:
            raise IntakeError(429, f"this API key already has {waiting} requests waiting to be checked (the limit is "
                                   f"{self.max_waiting_per_key}); wait for their answers, then submit again",
                              retry_after=max(1.0, delay))
        if sum(self._waiting.values()) >= self._max_waiting:
            raise IntakeError(503, "the server is busy checking other requests; submit again in a few seconds",
                              retry_after=2.0)
        self._waiting[key] = waiting + 1
        try:
            if delay:
                await asyncio.sleep(delay)
            checker = await self._acquire(key)
        finally:
            left = self._waiting.get(key, 1) - 1
            if left > 0:
                self._waiting[key] = left
            else:
                self._waiting.pop(key, None)
        try:
            if isinstance(body, Path):
                message = framing.encode("check", b"", path=str(body), models=module_paths, aliases=aliases or {})
            else:
                message = framing.encode("check", body, models=module_paths, aliases=aliases or {})
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(self._threads, checker.exchange, message, self._timeout)
        except IntakeError:
            self._refused(key)
            raise
        finally:
            self._release(key, checker)
        if reply.type == "checked":
            self._refusals.pop(key, None)
            return CheckedRequest(str(reply.fields.get("model")), str(reply.fields.get("filename")))
        self._refused(key)
        status = reply.fields.get("status")
        raise IntakeError(status if isinstance(status, int) and 400 <= status < 600 else 400,
                          str(reply.fields.get("detail") or "the request was refused"))

    # -- turns ------------------------------------------------------------------------------
    async def _acquire(self, key: Hashable) -> _Checker:
        ticket: asyncio.Future = asyncio.get_running_loop().create_future()
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
            self._turns.append(key)
        line.append(ticket)
        self._dispatch()
        try:
            return await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._release(key, ticket.result())
            else:
                self._leave(key, ticket)
            raise

    def _leave(self, key: Hashable, ticket: asyncio.Future) -> None:
        line = self._lines.get(key)
        if line is not None and ticket in line:
            line.remove(ticket)
            if not line:
                del self._lines[key]
                self._turns.remove(key)

    def _release(self, key: Hashable, checker: _Checker) -> None:
        left = self._running.get(key, 1) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)
        self._free.append(checker)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free checkers to waiting checks: keys in turn, each under its cap, keys whose
        bodies keep being refused only when no other key waits."""
        while self._free:
            eligible = [key for key in self._turns if self._running.get(key, 0) < self.max_running_per_key]
            if not eligible:
                return  # nobody waits, or every waiting key uses all it may
            clean = [key for key in eligible if not self.refusals(key)]
            key = (clean or eligible)[0]
            self._turns.remove(key)
            self._turns.append(key)
            line = self._lines[key]
            ticket = line.popleft()
            if not line:
                del self._lines[key]
                self._turns.remove(key)
            if ticket.cancelled():
                continue
            self._running[key] = self._running.get(key, 0) + 1
            ticket.set_result(self._free.pop())


def default_size() -> int:
    """Checker processes when ``--check-workers`` is not given: one per two cores, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))
