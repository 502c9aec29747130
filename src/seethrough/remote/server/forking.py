"""One process per request, forked from the loaded model process (copy-on-write).

The worker loads its model once; for each request :class:`RequestForker`
forks a *request process* that shares the loaded model's memory
copy-on-write (nothing is reloaded) and runs the request there.  Whatever
the body changes — modules, configs, the tokenizer, class attributes,
caches, the RNG, the private ``/tmp`` — changes only in that process, and
dies with it: the model process itself never runs strangers' code.

The request process sends its messages (printed lines, then the answer) to
the model process over a pipe of its own; the model process relays each
*whole* message to the API process.  So a request process that is killed
halfway through a message leaves the API's pipe intact, and the model
process can say what happened:

* an answer                       -> ``answered``;
* the process ended without one   -> ``crashed`` (how: exit status or signal);
* past the wall-clock limit       -> ``timeout`` (SIGKILL first);
* the API process cancelled it    -> ``cancelled`` (SIGKILL first; the
  model process watches the API's pipe beside the request's).

After each request nothing of it remains: the request process runs in its
own process group and is reaped; the model process is a *child subreaper*,
so anything the request started that escaped the group (``setsid``, double
forks) is re-parented to it, killed and reaped too; the private ``/tmp``
is emptied.  The request process also dies with the model process
(``PR_SET_PDEATHSIG``).  Its address space is capped at its size at fork
plus the per-request budget (``RLIMIT_AS``).

Speed: the next request process is forked as soon as the previous one is
gone and waits for its payload, so a fork is not on a request's path; the
model process's private memory (the read-only weights, the heap) is backed
by huge pages where the kernel allows (``MADV_HUGEPAGE``/``MADV_COLLAPSE``),
so a fork copies few page-table entries; ``gc.freeze()`` keeps a request's
garbage collector from touching (and so copying) the loaded objects.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import resource
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable

__all__ = ["Outcome", "RequestForker", "address_space", "limit_address_space"]

logger = logging.getLogger("seethrough.server.worker")

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_LENGTH = struct.Struct("<I")
_SWEEP_ROUNDS = 50


@dataclass
class Outcome:
    """How a request process ended."""

    kind: str  # "answered", "crashed", "timeout", or what ``control`` answered (e.g. "cancelled")
    how: str = ""  # for "crashed": the exit status or signal, in words
    pid: int = 0
    reaped: bool = False  # the request process has been waited for already


def address_space() -> int | None:
    """This process's address space in bytes (None where /proc cannot tell)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def limit_address_space(budget: int | None) -> int | None:
    """Cap the address space at its current size plus ``budget``; return the limit."""
    if budget is None:
        return None
    current = address_space()
    if current is None:
        return None
    limit = current + budget
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < limit:
        limit = hard
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _message_type(data: bytes) -> str | None:
    """The type of a framed message, reading only its header (the payload may be large)."""
    if len(data) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(data)
    try:
        header = json.loads(bytes(memoryview(data)[_LENGTH.size:_LENGTH.size + length]))
    except (ValueError, UnicodeDecodeError):
        return None
    return header.get("type") if isinstance(header, dict) else None


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"it was killed by {name}"
    if os.WIFEXITED(status):
        return f"it exited with status {os.WEXITSTATUS(status)} without an answer"
    return "it ended without an answer"


class RequestForker:
    """Forks, watches and cleans up after request processes (see the module docs).

    ``handler(payload, connection)`` runs in each request process.  The next
    request process is forked as soon as the previous one is gone and waits
    for its payload, so the fork is not on a request's path; ``prepare(arrived)``
    runs in it while it waits (a warm-up forward: the pages a forward writes
    are copied then, not during the request).  ``arrived()`` is true once the
    payload is waiting: a warm-up must stop then, since under steady load the
    next request is sent while the warm-up still runs.
    """

    def __init__(self, handler: Callable[[bytes, Connection], None], timeout: float, memory_budget: int | None,
                 max_message: int, private_tmp: str | None = None,
                 prepare: Callable[[Callable[[], bool]], None] | None = None) -> None:
        self.handler = handler
        self.prepare = prepare
        self.timeout = timeout
        self.memory_budget = memory_budget
        self.max_message = max_message
        self.private_tmp = private_tmp
        self._libc = _libc()
        self._libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        # Orphans of a request (a daemonised grandchild) come to this process, not to init.
        self.subreaper = self._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        gc.freeze()  # the loaded model's objects: not scanned, so not copied, by a request's collector
        self.huge_bytes = _use_huge_pages(self._libc)
        self._ready: tuple[int, Connection, Connection] | None = None
        self._finished: int | None = None  # the last request process, killed but not yet reaped
        self._prefork()

    def run(self, payload: bytes, relay: Callable[[bytes], None], control: Any = None,
            on_control: Callable[[bytes], str | None] | None = None) -> Outcome:
        """Run the handler on ``payload`` in a request process; hand each message it sends to ``relay``.

        ``control`` (a connection) is watched meanwhile: each message on it goes to
        ``on_control``, and a kind it returns (e.g. ``"cancelled"``) kills the request
        process and ends the request with that outcome.

        The request process is killed as soon as it has answered; reaping it and
        whatever it left happens in :meth:`finish`, which the next ``run`` calls
        before it hands over its payload (so the exiting process's teardown
        overlaps the time between requests)."""
        self.finish()
        ready, self._ready = self._ready, None
        if ready is not None and os.waitpid(ready[0], os.WNOHANG)[0] != 0:  # killed while it waited (reaped now)
            ready[1].close()
            ready[2].close()
            ready = None
        pid, sender, reader = ready if ready is not None else self._fork()
        outcome: Outcome | None = None
        try:
            try:
                sender.send_bytes(payload)
            except OSError:  # the waiting process is gone (killed from outside): fork another
                self._discard(pid, sender, reader)
                pid, sender, reader = self._fork()
                sender.send_bytes(payload)
            outcome = self._watch(pid, reader, relay, control, on_control)
        finally:
            sender.close()
            reader.close()
            self._kill(pid, group_only=outcome is not None and outcome.reaped)
            self._finished = pid
        self._prefork()
        return outcome

    def finish(self) -> int:
        """Reap the last request process, kill and reap what it left, empty the private
        /tmp; return how many processes it had left behind."""
        pid, self._finished = self._finished, None
        return 0 if pid is None else self._clean_up(pid)

    def close(self) -> None:
        """Stop the waiting request process (and reap the last one)."""
        self.finish()
        ready, self._ready = self._ready, None
        if ready is not None:
            self._discard(*ready)

    # -- the request process ------------------------------------------------------------------
    def _fork(self) -> tuple[int, Connection, Connection]:
        job_reader, job_writer = os.pipe()
        answer_reader, answer_writer = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                os.close(job_writer)
                os.close(answer_reader)
                self._enter_child(parent)
                job = Connection(job_reader, writable=False)
                if self.prepare is not None and not job.poll():
                    try:
                        self.prepare(job.poll)  # `poll()` returns at once: is the payload there?
                    except Exception:  # noqa: BLE001 - only a speed-up: the request still runs without it
                        logger.debug("warm-up in a waiting request process failed", exc_info=True)
                try:
                    payload = job.recv_bytes()
                except EOFError:  # the model process stopped, or discarded this process
                    os._exit(0)
                self.handler(payload, Connection(answer_writer, readable=False))
                status = 0
            except BaseException:  # noqa: BLE001 - nothing may escape a forked child
                logger.exception("request process failed outside the request")
            finally:
                os._exit(status)
        os.close(job_reader)
        os.close(answer_writer)
        return pid, Connection(job_writer, readable=False), Connection(answer_reader, writable=False)

    def _prefork(self) -> None:
        try:
            self._ready = self._fork()
        except OSError as error:  # e.g. the process limit: fork at the next request instead
            logger.warning("could not fork the next request process ahead of time: %s", error)
            self._ready = None

    def _enter_child(self, parent: int) -> None:
        os.setpgid(0, 0)  # its own process group: one kill reaches whatever it starts
        self._libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the model process died between fork and prctl
            os._exit(1)
        limit_address_space(self.memory_budget)

    def _discard(self, pid: int, sender: Connection, reader: Connection) -> None:
        sender.close()
        reader.close()
        self._kill(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    # -- the model process --------------------------------------------------------------------
    def _watch(self, pid: int, reader: Connection, relay: Callable[[bytes], None], control: Any = None,
               on_control: Callable[[bytes], str | None] | None = None) -> Outcome:
        deadline = time.monotonic() + self.timeout
        watched = [reader] if control is None else [reader, control]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill(pid)
                return Outcome("timeout", pid=pid)
            try:
                ready = wait(watched, min(remaining, 1.0))
                if control is not None and control in ready and reader not in ready:
                    kind = on_control(control.recv_bytes()) if on_control is not None else None
                    if kind is not None:
                        self._kill(pid)
                        return Outcome(kind, pid=pid)
                    continue
                if reader not in ready:
                    continue
                data = reader.recv_bytes(self.max_message)
            except EOFError:
                break
            except OSError as error:  # a message over the size limit
                self._kill(pid)
                return Outcome("crashed", f"it sent a message the server cannot take ({error})", pid=pid)
            relay(data)
            if _message_type(data) == "answer":
                return Outcome("answered", pid=pid)
        _, status = os.waitpid(pid, 0)
        return Outcome("crashed", _describe_status(status), pid=pid, reaped=True)

    def _kill(self, pid: int, group_only: bool = False) -> None:
        """SIGKILL the process group ``pid`` leads, then the process if it left the group
        (not once it is reaped: its pid may belong to another process by then)."""
        for target in (-pid,) if group_only else (-pid, pid):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _clean_up(self, pid: int) -> int:
        """Reap the request process; kill and reap anything it left; empty the private /tmp."""
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reaped already (a crash)
        leftovers = 0
        waiting = self._ready[0] if self._ready is not None else None
        for _ in range(_SWEEP_ROUNDS):
            children = [child for child in _children() if child != waiting]
            if not children:
                break
            for child in children:
                leftovers += 1
                for target in (-child, child):
                    try:
                        os.kill(target, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            for child in children:
                try:
                    os.waitpid(child, 0)
                except ChildProcessError:
                    pass
        if leftovers:
            logger.warning("request process %d left %d process(es) behind; killed", pid, leftovers)
        if self.private_tmp:
            _empty(self.private_tmp)
        return leftovers


_HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25


def _use_huge_pages(libc: ctypes.CDLL) -> int:
    """Back this process's private writable memory with huge pages where the kernel can
    (``MADV_COLLAPSE``, Linux 6.1+): a fork then copies one page-table entry per 2 MiB
    instead of 512.  Returns the bytes collapsed (0 where the kernel cannot)."""
    collapsed = 0
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
            regions = handle.read().splitlines()
    except OSError:
        return 0
    for line in regions:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "rw-p" or (len(parts) > 5 and parts[5] != "[heap]"):
            continue
        low, high = (int(text, 16) for text in parts[0].split("-"))
        start, end = (low + _HUGE - 1) // _HUGE * _HUGE, high // _HUGE * _HUGE
        if end <= start:
            continue
        libc.madvise(start, end - start, MADV_HUGEPAGE)
        if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
            collapsed += end - start
    return collapsed


def _children() -> list[int]:
    """The live (or zombie) children of this process, over all of its threads."""
    found: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(pid) for pid in Path(f"/proc/self/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def _empty(folder: str) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if os.path.ismount(entry.path):
            continue  # a read-only folder the worker needs (see isolation): not the request's
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
