"""Submitted requests ("jobs"): their state, their event log, their result.

A :class:`Job` records everything a client can ask about its request: the
status (queued, running, completed, error), every server-sent event in order
(so a late subscriber replays them from the start), the packed answer, and
who may read it (the digest of the API key that submitted it).

The :class:`JobStore` is shared by the API's event loop (which creates jobs and
streams their events) and the dispatcher threads (which run them): every
change happens under one lock, and waiting event streams are woken through
their own event loop.  Printed lines are capped per job; finished jobs are
forgotten after ``ttl`` seconds, and one past its age is never served (a read
checks the age itself, not waiting for the next sweep).  No job is forgotten
before its time to make room: past ``max_jobs`` stored requests in all, new
submissions are refused instead.

A job can be cancelled (:meth:`JobStore.cancel`): it is forgotten at once
(its quota freed), and ``job.stop`` tells the dispatcher running it to kill
its request process.  ``job.stop`` is also set when the lines a request
prints pass its key's byte quota: the request is stopped with an error
naming the limit.

Request bodies and results live on disk, not in the API process's memory: a
private spool folder (``--spool-dir``, or a fresh temporary folder removed at
shutdown) holds one file per request body until it runs and one per result
until it is read back or expires.  Each API key has a quota of stored bytes
(bodies, results and printed lines together) and of stored jobs
(``--max-stored-bytes-per-key``, ``--max-jobs-per-key``): a submission past it
is refused (:class:`QuotaExceeded`, HTTP 429), a result that would pass it
is replaced by an error that says so, and printed lines that would pass it
stop the request.  Events, printed lines among them, are spooled too
(:mod:`.eventlog`): the API process keeps one integer per event.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import wire
from ..protocol import error_answer
from .eventlog import EventLog
from .framing import log_cut_notice

__all__ = ["Job", "JobStore", "QuotaExceeded", "TERMINAL", "server_error"]

TERMINAL = ("completed", "error")
DEFAULT_MAX_JOBS = 10_000  # requests the whole server stores (queued, running, finished)
DEFAULT_MAX_STORED_BYTES_PER_KEY = 2 * 1024**3
DEFAULT_MAX_JOBS_PER_KEY = 200


def server_error(kind: str, message: str, module: str = "seethrough.remote.server", filename: str = "") -> dict:
    """An error answer made by the server itself (the protocol's one shape)."""
    return error_answer(kind, message, module=module, filename=filename)


class QuotaExceeded(Exception):
    """A submission refused because its key stores too much already (HTTP 429)."""


@dataclass(eq=False)
class Job:
    """One submitted request."""

    id: str
    owner: str | None  # digest of the submitting API key (None on an open server)
    model: str
    filename: str
    spool: Path  # where the body (<id>.request) and the result (<id>.result) are kept
    created: float = field(default_factory=time.time)
    status: str = "queued"
    position: int | None = None
    events: EventLog = field(init=False)
    result_size: int | None = None  # set once the result is stored
    payload_size: int = 0
    error: dict | None = None
    started: float | None = None
    finished: float | None = None
    log_lines: int = 0
    log_bytes: int = 0
    log_truncated: bool = False
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    stop: dict | None = None  # set: the dispatcher must stop the request (cancelled, or over the quota)
    final: tuple[str, dict] | None = None  # the last event of a cancelled job (its files are gone)

    def __post_init__(self) -> None:
        self.events = EventLog(self.spool / f"{self.id}.events")

    @property
    def payload(self) -> bytes | None:
        """The request's wire bytes (read from the spool), None once it has run."""
        try:
            return self.request_path.read_bytes()
        except FileNotFoundError:
            return None

    @property
    def request_path(self) -> Path:
        return self.spool / f"{self.id}.request"

    @property
    def result_path(self) -> Path:
        return self.spool / f"{self.id}.result"

    @property
    def result(self) -> bytes | None:
        """The stored answer (read from the spool), None until the request finishes."""
        if self.result_size is None:
            return None
        try:
            return self.result_path.read_bytes()
        except FileNotFoundError:
            return None

    def stored_bytes(self) -> int:
        return self.payload_size + (self.result_size or 0) + self.log_bytes

    def public(self) -> dict:
        """What ``GET /v1/requests/{id}`` shows."""
        out: dict[str, Any] = {"id": self.id, "status": self.status, "model": self.model, "created": self.created}
        if self.status == "queued" and self.position is not None:
            out["position"] = self.position
        if self.started is not None:
            out["started"] = self.started
        if self.finished is not None:
            out["finished"] = self.finished
        if self.error is not None:
            out["error"] = self.error
        return out


class JobStore:
    """All jobs of the server, by id (see the module docs)."""

    def __init__(self, ttl: float, max_log_lines: int, max_log_bytes: int, *, spool_dir: str | None = None,
                 max_stored_bytes_per_key: int = DEFAULT_MAX_STORED_BYTES_PER_KEY,
                 max_jobs_per_key: int = DEFAULT_MAX_JOBS_PER_KEY, max_jobs: int = DEFAULT_MAX_JOBS) -> None:
        self.ttl = ttl
        self.max_log_lines = max_log_lines
        self.max_log_bytes = max_log_bytes
        self.max_stored_bytes_per_key = max_stored_bytes_per_key
        self.max_jobs_per_key = max_jobs_per_key
        self.max_jobs = max_jobs
        self.scrub: Any = None  # (str, keep=...) -> str: server paths out of errors and logs (set by the runtime)
        self._own_spool = spool_dir is None
        self.spool = Path(tempfile.mkdtemp(prefix="seethrough-spool-") if spool_dir is None else spool_dir)
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._stored: dict[str | None, int] = {}  # bytes each key stores
        self._counts: dict[str | None, int] = {}  # jobs each key has (queued, running or kept)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        """Forget every job; remove the spool folder if this store made it."""
        with self._lock:
            for job in list(self._jobs.values()):
                self._remove(job)
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)

    # -- creation and lookup ----------------------------------------------------------
    def create(self, owner: str | None, model: str, filename: str, payload: bytes | Path) -> Job:
        """A new queued job holding ``payload``; raises :class:`QuotaExceeded` past the key's quota.

        ``payload`` is the body's bytes, or a file in the spool holding them
        (an upload streamed to disk: it is moved into place, never read)."""
        size = payload.stat().st_size if isinstance(payload, Path) else len(payload)
        job = Job(id=secrets.token_urlsafe(18), owner=owner, model=model, filename=filename, spool=self.spool,
                  payload_size=size)
        with self._lock:
            count, stored = self._counts.get(owner, 0), self._stored.get(owner, 0)
            if len(self._jobs) >= self.max_jobs:
                raise QuotaExceeded(
                    f"this server already holds {len(self._jobs):,} requests, its limit (queued, running, and "
                    f"finished ones kept for {self.ttl:g} s); try again in a while")
            if count >= self.max_jobs_per_key:
                raise QuotaExceeded(
                    f"this API key already has {count:,} requests on the server (the limit is "
                    f"{self.max_jobs_per_key:,}, queued and finished ones kept for {self.ttl:g} s); fetch the results "
                    "you need and delete them (DELETE /v1/requests/{id}, or job.delete()), or wait")
            if stored + size > self.max_stored_bytes_per_key:
                raise QuotaExceeded(
                    f"this API key stores {stored:,} bytes on the server and this request adds {size:,}, over "
                    f"the limit of {self.max_stored_bytes_per_key:,} bytes; fetch and delete finished results "
                    "(DELETE /v1/requests/{id}), or wait for them to expire")
            if isinstance(payload, Path):
                os.replace(payload, job.request_path)
            else:
                self._write(job.request_path, payload)
            self._jobs[job.id] = job
            self._counts[owner] = count + 1
            self._stored[owner] = stored + size
        return job

    def stored(self, owner: str | None) -> int:
        """Bytes ``owner`` stores now (bodies, results, printed lines)."""
        with self._lock:
            return self._stored.get(owner, 0)

    def get(self, job_id: str, now: float | None = None) -> Job | None:
        """The job ``job_id``; None if there is none or it finished more than ``ttl`` seconds ago."""
        now = time.time() if now is None else now
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.finished is not None and now - job.finished > self.ttl:
                self._remove(job)
                return None
            return job

    def cancel(self, job: Job, reason: str) -> str | None:
        """Forget ``job`` at once, whatever its state (its quota is freed now); return the
        state it had (None: it was gone already).  A queued or running job gets
        ``job.stop``: its dispatcher kills the request process (see :mod:`.service`)."""
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return None
            was = job.status
            if job.finished is None:
                job.stop = server_error("RequestCancelledError", reason, filename=job.filename)
                job.final = ("error", job.stop)
                job.status, job.position, job.finished = "cancelled", None, time.time()
                self._publish(job, *job.final)
            self._remove(job)
            return was

    def discard(self, job: Job) -> None:
        """Forget ``job`` and its files (a refused submission, or a finished job its owner deleted)."""
        with self._lock:
            if self._jobs.get(job.id) is job:
                self._remove(job)

    def usage(self, owner: str | None) -> dict[str, int]:
        """What ``owner`` stores: jobs and bytes, with the limits."""
        with self._lock:
            return {"jobs": self._counts.get(owner, 0), "max_jobs": self.max_jobs_per_key,
                    "bytes": self._stored.get(owner, 0), "max_bytes": self.max_stored_bytes_per_key}

    def forgotten(self, job: Job) -> bool:
        """Whether ``job`` is no longer in the store (deleted, cancelled or expired)."""
        with self._lock:
            return self._jobs.get(job.id) is not job

    def _remove(self, job: Job) -> None:
        del self._jobs[job.id]
        self._counts[job.owner] = self._counts.get(job.owner, 1) - 1
        self._stored[job.owner] = self._stored.get(job.owner, 0) - job.stored_bytes()
        if self._counts[job.owner] <= 0:
            self._counts.pop(job.owner, None)
            self._stored.pop(job.owner, None)
        for path in (job.request_path, job.result_path):
            path.unlink(missing_ok=True)
        job.events.remove()

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)

    # -- state changes (any thread) ---------------------------------------------------
    def queued(self, job: Job, position: int) -> None:
        with self._lock:
            if job.status != "queued" or job.position == position or self._jobs.get(job.id) is not job:
                return
            job.position = position
            self._publish(job, "status", {"status": "queued", "position": position})

    def running(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return
            job.status, job.position, job.started = "running", None, time.time()
            self._publish(job, "status", {"status": "running"})

    def step(self, job: Job, step: int) -> None:
        """A running generation's step count (a ``status`` event the client shows)."""
        with self._lock:
            if job.status == "running" and self._jobs.get(job.id) is job:
                self._publish(job, "status", {"status": "running", "step": step})

    def log(self, job: Job, text: str) -> None:
        """Keep one printed line (in the spool); past the key's byte quota, set ``job.stop``."""
        with self._lock:
            if job.finished is not None or job.log_truncated or job.stop is not None or self._jobs.get(job.id) is not job:
                return
            if self.scrub is not None:
                text = self.scrub(text, names=False, keep=(job.filename,))  # the body's own words stay
            size = len(text.encode("utf-8", "replace")) + 1
            if job.log_lines >= self.max_log_lines or job.log_bytes + size > self.max_log_bytes:
                job.log_truncated = True
                text = log_cut_notice(self.max_log_lines, self.max_log_bytes)
                size = len(text.encode("utf-8", "replace")) + 1
            stored = self._stored.get(job.owner, 0)
            if stored + size > self.max_stored_bytes_per_key:
                job.stop = server_error("QuotaExceededError", (
                    f"the lines this request printed pass this API key's storage quota of "
                    f"{self.max_stored_bytes_per_key:,} bytes (--max-stored-bytes-per-key: request bodies, results "
                    f"and printed lines kept on the server; {stored:,} stored), so the request was stopped. Print "
                    "less, or fetch and delete finished results first (DELETE /v1/requests/{id}, job.delete())"),
                    filename=job.filename)
                return
            job.log_lines += 1
            job.log_bytes += size
            self._stored[job.owner] = self._stored.get(job.owner, 0) + size
            self._publish(job, "log", {"text": text})

    def finish(self, job: Job, result: bytes, error: dict | None) -> None:
        """Store the answer and send the last event (``completed`` or ``error``)."""
        with self._lock:
            if job.finished is not None or self._jobs.get(job.id) is not job:
                return
            job.request_path.unlink(missing_ok=True)
            stored = self._stored.get(job.owner, 0) - job.payload_size
            job.payload_size = 0
            if error is not None and self.scrub is not None:
                error, result = self._scrubbed(error, result, job.filename)
            if stored + len(result) > self.max_stored_bytes_per_key and error is None:
                error = server_error("ResultTooLargeError", (
                    f"the result is {len(result):,} bytes, and this API key already stores {stored:,} bytes on the "
                    f"server (the limit is {self.max_stored_bytes_per_key:,}); save less (fewer or smaller "
                    "tensors), or fetch and delete earlier results first (DELETE /v1/requests/{id})"),
                    filename=job.filename)
                result = wire.pack({"error": error}, max_bytes=1 << 20)
            self._write(job.result_path, result)
            self._stored[job.owner] = stored + len(result)
            job.result_size = len(result)
            job.error = error
            job.status = "error" if error is not None else "completed"
            job.position = None
            job.finished = time.time()
            self._publish(job, "error" if error is not None else "completed", error if error is not None else {})

    def _scrubbed(self, error: dict, result: bytes, filename: str) -> tuple[dict, bytes]:
        """The error and the packed error answer, without server paths in their text
        (the request's own file name stays)."""
        scrub = self.scrub

        def clean(value: Any, key: str = "message") -> Any:
            # A message loses paths and the user and host names; a traceback (lines of
            # the caller's own code among them) loses paths only; names, types and the
            # caller's code and file name stay as they are.
            if isinstance(value, str):
                if key in ("message", "traceback"):
                    return scrub(value, names=key == "message", keep=(filename,))
                return value
            if isinstance(value, dict):
                return {name: clean(item, name) for name, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(item, key) for item in value]
            return value

        try:
            answer = wire.unpack(result, max_bytes=max(len(result), 1))
        except wire.WireError:
            answer = {"error": error}
        full = answer.get("error") if isinstance(answer, dict) and isinstance(answer.get("error"), dict) else error
        return clean(error), wire.pack({"error": clean(full)}, max_bytes=max(4 * len(result), 1 << 20))

    def _publish(self, job: Job, name: str, data: dict) -> None:
        if self._jobs.get(job.id) is job:
            job.events.append(name, data)
        for loop, event in job.waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its stream is gone
                pass

    # -- streaming (event loop) -------------------------------------------------------
    def snapshot(self, job: Job, start: int) -> tuple[list[tuple[str, dict]], bool]:
        """Events from ``start`` on (a bounded batch), and whether the job has finished."""
        with self._lock:
            if self._jobs.get(job.id) is not job:  # cancelled or forgotten: its last word, if any
                return ([job.final] if job.final is not None and start <= len(job.events) else []), True
            return job.events.read(start), job.finished is not None

    def wait_handle(self, job: Job, start: int) -> asyncio.Event | None:
        """An event set when ``job`` gets events past ``start`` (None: there already are)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if len(job.events) > start or job.finished is not None:
                return None
            event = asyncio.Event()
            job.waiters.append((loop, event))
            return event

    def forget_handle(self, job: Job, event: asyncio.Event) -> None:
        with self._lock:
            job.waiters = [(loop, other) for loop, other in job.waiters if other is not event]

    # -- expiry -------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Forget finished jobs older than ``ttl``; return how many (none is forgotten earlier)."""
        now = time.time() if now is None else now
        with self._lock:
            old = [job for job in self._jobs.values() if job.finished is not None and now - job.finished > self.ttl]
            for job in old:
                self._remove(job)
            return len(old)

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = {"queued": 0, "running": 0, "completed": 0, "error": 0}
            for job in self._jobs.values():
                counts[job.status] = counts.get(job.status, 0) + 1
            return counts
