"""Submitted requests ("jobs"): their state, their event log, their result.

A :class:`Job` records everything a client can ask about its request: the
status (queued, running, completed, error), every server-sent event in order
(so a late subscriber replays them from the start), the packed answer, and
who may read it (the digest of the API key that submitted it).

The :class:`JobStore` is shared by the API's event loop (which creates jobs and
streams their events) and the dispatcher threads (which run them): every
change happens under one lock, and waiting event streams are woken through
their own event loop.  Printed lines are capped per job; finished jobs are
forgotten after ``ttl`` seconds (and the oldest first when there are too many),
so memory does not grow with the server's age.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .framing import log_cut_notice

__all__ = ["Job", "JobStore", "TERMINAL"]

TERMINAL = ("completed", "error")
MAX_FINISHED_JOBS = 10_000


@dataclass(eq=False)
class Job:
    """One submitted request."""

    id: str
    owner: str | None  # digest of the submitting API key (None on an open server)
    model: str
    filename: str
    payload: bytes | None  # the request's wire bytes, dropped once it runs
    created: float = field(default_factory=time.time)
    status: str = "queued"
    position: int | None = None
    events: list[tuple[str, dict]] = field(default_factory=list)
    result: bytes | None = None
    error: dict | None = None
    started: float | None = None
    finished: float | None = None
    log_lines: int = 0
    log_bytes: int = 0
    log_truncated: bool = False
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

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

    def __init__(self, ttl: float, max_log_lines: int, max_log_bytes: int) -> None:
        self.ttl = ttl
        self.max_log_lines = max_log_lines
        self.max_log_bytes = max_log_bytes
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._jobs)

    # -- creation and lookup ----------------------------------------------------------
    def create(self, owner: str | None, model: str, filename: str, payload: bytes) -> Job:
        job = Job(id=secrets.token_urlsafe(18), owner=owner, model=model, filename=filename, payload=payload)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def discard(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    # -- state changes (any thread) ---------------------------------------------------
    def queued(self, job: Job, position: int) -> None:
        with self._lock:
            if job.status != "queued" or job.position == position:
                return
            job.position = position
            self._publish(job, "status", {"status": "queued", "position": position})

    def running(self, job: Job) -> None:
        with self._lock:
            job.status, job.position, job.started = "running", None, time.time()
            self._publish(job, "status", {"status": "running"})

    def log(self, job: Job, text: str) -> None:
        with self._lock:
            if job.finished is not None or job.log_truncated:
                return
            size = len(text.encode("utf-8", "replace")) + 1
            if job.log_lines >= self.max_log_lines or job.log_bytes + size > self.max_log_bytes:
                job.log_truncated = True
                text = log_cut_notice(self.max_log_lines, self.max_log_bytes)
            job.log_lines += 1
            job.log_bytes += size
            self._publish(job, "log", {"text": text})

    def finish(self, job: Job, result: bytes, error: dict | None) -> None:
        """Store the answer and send the last event (``completed`` or ``error``)."""
        with self._lock:
            if job.finished is not None:
                return
            job.payload = None
            job.result = result
            job.error = error
            job.status = "error" if error is not None else "completed"
            job.position = None
            job.finished = time.time()
            self._publish(job, "error" if error is not None else "completed", error if error is not None else {})

    def _publish(self, job: Job, name: str, data: dict) -> None:
        job.events.append((name, data))
        for loop, event in job.waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its stream is gone
                pass

    # -- streaming (event loop) -------------------------------------------------------
    def snapshot(self, job: Job, start: int) -> tuple[list[tuple[str, dict]], bool]:
        """Events from ``start`` on, and whether the job has finished."""
        with self._lock:
            return job.events[start:], job.finished is not None

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
        """Forget finished jobs older than ``ttl`` (and the oldest past the cap); return how many."""
        now = time.time() if now is None else now
        with self._lock:
            finished = sorted((job for job in self._jobs.values() if job.finished is not None),
                              key=lambda job: job.finished)
            old = [job for job in finished if now - job.finished > self.ttl]
            extra = finished[len(old):][:max(0, len(finished) - len(old) - MAX_FINISHED_JOBS)]
            for job in old + extra:
                del self._jobs[job.id]
            return len(old) + len(extra)

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = {"queued": 0, "running": 0, "completed": 0, "error": 0}
            for job in self._jobs.values():
                counts[job.status] = counts.get(job.status, 0) + 1
            return counts
