"""Request checks off the API's event loop: a small pool of checker processes.

Every submitted body is checked (:func:`.intake.check_request`: decode with
caps, protocol, sandbox validation of the code) before it is queued.  A body
comes from a stranger and checking it costs CPU (parsing code) and memory
(the decoded structure), so it never runs in the API process:

* each check runs in one of ``--check-workers`` long-lived processes, each
  with an address-space limit, so a bomb can cost at most that process;
* each check has a wall-clock deadline (``--check-timeout``); past it the
  checker is killed and replaced, and the request is refused with 400;
* at most ``--check-workers`` checks run at once and a bounded number wait;
  past that the API answers 503 at once rather than queueing without bound;
* the event loop only awaits a thread that moves bytes over a pipe, so health,
  status and other users' requests keep their latency whatever a check costs.

Pipe messages use :mod:`.framing` (JSON headers and raw bytes, never pickle):
API -> checker ``check`` (payload: the request's wire bytes; ``models``: each
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
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import framing
from .intake import IntakeError, check_request
from .worker import _limit_memory

__all__ = ["CheckedRequest", "CheckerPool"]

logger = logging.getLogger("seethrough.server")

# Waiting checks per checker process before new submissions get 503.
_WAITING_PER_CHECKER = 16


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
            request = check_request(message.payload, max_bytes=limits.max_bytes,
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
    """``size`` checker processes, used by the API's event loop (see the module docs)."""

    def __init__(self, context: Any, limits: CheckLimits, size: int, timeout: float) -> None:
        self._timeout = timeout
        self._idle = [_Checker(context, limits) for _ in range(size)]
        self._all = list(self._idle)
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._max_waiting = _WAITING_PER_CHECKER * size
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="seethrough-check")

    def start(self) -> None:
        for checker in self._all:
            checker.start()

    def stop(self) -> None:
        for checker in self._all:
            checker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        return [checker.process.pid for checker in self._all if checker.process is not None]

    async def check(self, body: bytes, module_paths: dict[str, list[str]],
                    aliases: dict[str, str] | None = None) -> CheckedRequest:
        """Check ``body`` in a checker process; raises :class:`IntakeError` to refuse it.

        ``module_paths``: each served model's module paths; ``aliases``: the
        other names a model answers to, mapped to its served name."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(len(self._all))
        if self._waiting >= self._max_waiting:
            raise IntakeError(503, "the server is busy checking other requests; submit again in a few seconds")
        self._waiting += 1
        try:
            async with self._slots:
                with self._lock:
                    checker = self._idle.pop()
                try:
                    message = framing.encode("check", body, models=module_paths, aliases=aliases or {})
                    loop = asyncio.get_running_loop()
                    reply = await loop.run_in_executor(self._threads, checker.exchange, message, self._timeout)
                finally:
                    with self._lock:
                        self._idle.append(checker)
        finally:
            self._waiting -= 1
        if reply.type == "checked":
            return CheckedRequest(str(reply.fields.get("model")), str(reply.fields.get("filename")))
        status = reply.fields.get("status")
        raise IntakeError(status if isinstance(status, int) and 400 <= status < 600 else 400,
                          str(reply.fields.get("detail") or "the request was refused"))


def default_size() -> int:
    """Checker processes when ``--check-workers`` is not given: one per two cores, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))
