"""The models a server runs: per model a fair queue, worker processes, dispatchers.

A :class:`ModelService` owns one model's :class:`~.scheduler.FairQueue` and
``--workers-per-model`` :class:`WorkerSlot` s.  Each slot is a dispatcher
thread feeding one worker process, one request at a time:

* it takes the next request in turn, marks it running, hands the wire bytes
  to the worker and relays what comes back (printed lines as ``log``
  events, then the answer);
* it enforces the wall-clock limit: past ``--timeout`` the worker is
  SIGKILLed, the request fails with a ``TimeoutError``, a new worker starts;
* a worker that dies mid-request (crash, out of memory, a write to read-only
  weights, a kill) fails that request only and is replaced; so is a worker
  that reports the served model changed.

* it stops a request whose ``job.stop`` is set (cancelled with DELETE, or
  printing past its key's quota) within a fraction of a second: a forking
  worker is told to kill the request process (``cancel``) and serves the
  next request at once; a worker that runs requests itself (``reuse``, a
  Ray actor) is killed and replaced.

With ``--spare-workers 1`` a loaded spare process waits beside the slots and
replaces a lost worker at once (a new spare then loads in the background).
:class:`ServerRuntime` holds the services and the :class:`~.jobs.JobStore`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...models.language import OFFLINE_MODELS, resolve_source
from .. import wire
from . import framing
from .disclosure import Disclosure
from .jobs import Job, JobStore, server_error
from .naming import model_names
from .process import WorkerDied, WorkerProcess, WorkerStartError, start_context
from .scheduler import FairQueue
from .settings import ModelSpec, Settings, worker_values
from .worker import WorkerOptions

__all__ = ["ModelService", "ServerRuntime", "WorkerSlot", "server_error"]

logger = logging.getLogger("seethrough.server")

_POSITION_UPDATES = 100  # queued jobs told their new position after each dequeue
_START_ATTEMPTS = 3
_FORK_BACKSTOP_S = 30.0  # extra time before the API kills a forking worker that missed its own deadline
_POLL_S = 0.2  # how often a dispatcher looks whether its request was cancelled
_CANCEL_GRACE_S = 5.0  # how long a forking worker has to confirm a cancel before it is replaced


class WorkerSlot:
    """One dispatcher thread and the worker process it feeds."""

    def __init__(self, service: "ModelService", index: int) -> None:
        self.service = service
        self.index = index
        self.worker: WorkerProcess | None = None
        self.state = "starting"
        self.restarts = 0
        self.current: Job | None = None
        self.thread = threading.Thread(target=self._loop, name=f"seethrough-dispatch-{service.spec.name}-{index}",
                                       daemon=True)

    def describe(self) -> dict:
        worker = self.worker
        description = {"state": self.state, "pid": worker.pid if worker is not None else None,
                       "restarts": self.restarts, "busy": self.current is not None}
        if worker is not None and hasattr(worker, "describe"):  # a Ray worker: where it runs
            description.update(worker.describe())
        return description

    # -- the dispatcher ---------------------------------------------------------------
    def _loop(self) -> None:
        service = self.service
        while True:
            job = service.queue.get(timeout=1.0)
            if service.stopping:
                if job is not None:
                    service.fail(job, server_error("RemoteError", "the server is shutting down; submit the request again"))
                return
            if job is not None and job.stop is not None:  # cancelled while it waited
                continue
            if job is None:
                if self.worker is not None and not self.worker.alive and self.state == "idle":
                    logger.warning("%s: worker %s died while idle (%s); replacing it",
                                   service.spec.name, self.worker.pid, self.worker.death())
                    self._replace()
                continue
            service.update_positions()
            self.current = job
            try:
                self._run(job)
            except Exception as error:  # noqa: BLE001 - the dispatcher must survive anything
                logger.exception("%s: internal error while running request %s", service.spec.name, job.id)
                service.fail(job, server_error("RemoteError", f"internal server error while running the request "
                                                              f"({type(error).__name__}: {error}); please report it"))
                self._replace()
            finally:
                self.current = None
                if self.state == "busy":
                    self.state = "idle"

    def _run(self, job: Job) -> None:
        service = self.service
        if (self.worker is None or not self.worker.alive) and not self._replace():
            service.fail(job, server_error("RemoteError", f"the model {service.spec.name!r} is unavailable: its worker "
                                                          "cannot be started (see the server log)"))
            return
        payload = job.payload or b""
        service.store.running(job)
        self.state = "busy"
        try:
            self.worker.send_run(payload, job.id)
        except WorkerDied:
            if not self._replace():
                service.fail(job, server_error("RemoteError", f"the model {service.spec.name!r} is unavailable"))
                return
            self.worker.send_run(payload, job.id)
        # A forking worker kills a request past the limit itself and lives on; the API's
        # own deadline then only backs it up (a worker that stopped answering at all).
        forking = self.worker.request_process == "fork"
        deadline = time.monotonic() + service.settings.timeout + (_FORK_BACKSTOP_S if forking else 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(job)
                return
            if job.stop is not None:
                self._stop(job, forking)
                return
            try:
                message = self.worker.receive(min(remaining, _POLL_S))
            except WorkerDied as death:
                self._crashed(job, str(death))
                return
            except framing.FramingError as error:
                self.worker.kill()
                self._crashed(job, f"it sent a malformed message: {error}")
                return
            if message is None:
                continue
            if message.type == "log":
                text = message.fields.get("text")
                if isinstance(text, str):
                    service.store.log(job, text)
                continue
            if message.type == "cancelled":  # a cancel meant for a request that had ended already
                continue
            if message.type == "progress":
                step = message.fields.get("step")
                if isinstance(step, int) and not isinstance(step, bool):
                    service.store.step(job, step)
                continue
            if message.type == "answer":
                self._answered(job, message)
                return
            if message.type == "timeout" and forking:
                self._timed_out(job, worker_survives=True)
                return
            if message.type == "crashed" and forking:
                how = message.fields.get("how")
                self._crashed(job, how if isinstance(how, str) else "it ended without an answer", worker_survives=True)
                return
            self.worker.kill()
            self._crashed(job, f"it sent an unexpected {message.type!r} message")
            return

    def _answered(self, job: Job, message: framing.Message) -> None:
        error = message.fields.get("error")
        if error is not None and not isinstance(error, dict):
            error = server_error("RemoteError", "the worker reported an error it could not describe")
        self.service.store.finish(job, message.payload, error)
        if message.fields.get("replace"):
            logger.warning("%s: request %s changed the served model (%s); replacing the worker",
                           self.service.spec.name, job.id, message.fields.get("reason"))
            self._replace()

    def _stop(self, job: Job, forking: bool) -> None:
        """Stop ``job``'s request now (``job.stop`` says why): a forking worker kills its
        request process and lives on; any other worker is killed and replaced."""
        send_cancel = getattr(self.worker, "send_cancel", None)
        stopped = False
        if forking and send_cancel is not None:
            try:
                send_cancel()
                deadline = time.monotonic() + _CANCEL_GRACE_S
                while not stopped and time.monotonic() < deadline:
                    message = self.worker.receive(min(deadline - time.monotonic(), _POLL_S))
                    stopped = message is not None and message.type in ("cancelled", "answer", "timeout", "crashed")
            except (WorkerDied, framing.FramingError):
                stopped = False
        logger.info("%s: request %s stopped (%s)", self.service.spec.name, job.id, job.stop.get("type"))
        self.service.fail(job, job.stop)
        if not stopped:
            self._replace()

    def _timed_out(self, job: Job, worker_survives: bool = False) -> None:
        limit = self.service.settings.timeout
        if not worker_survives:
            self.worker.kill()
        what = "its request process was killed" if worker_survives else "its worker process was killed and replaced"
        logger.warning("%s: request %s ran past %.0f s; %s", self.service.spec.name, job.id, limit, what)
        self.service.fail(job, server_error(
            "TimeoutError",
            f"the request ran for longer than this server's limit of {limit:g} s and was stopped ({what}). "
            "Make the body do less (fewer tokens, smaller batches, no endless loops), or ask the server's "
            "operator to raise --timeout.",
            module="builtins", filename=job.filename))
        if not worker_survives:
            self._replace()

    def _crashed(self, job: Job, how: str, worker_survives: bool = False) -> None:
        process = "request process" if worker_survives else "worker process"
        logger.warning("%s: the %s died during request %s (%s)", self.service.spec.name, process, job.id, how)
        read_only = bool((self.service.info or {}).get("read_only_weights"))
        causes = ("it ran out of memory, or the body wrote to the model's weights, which are read-only memory on "
                  "this server (e.g. `weight[:] = 0`, `weight.data.zero_()`); edit activations (`.output`, "
                  "`.input`) instead" if read_only else "it ran out of memory, or it was killed")
        self.service.fail(job, server_error(
            "WorkerCrashedError",
            f"the {process} running this request died ({how}), so the request failed. Likely causes: "
            f"{causes}. A fresh {process} serves the next request.", filename=job.filename))
        if not worker_survives:
            self._replace()

    def _replace(self) -> bool:
        """Put a fresh worker in place of the current one; False if none could start."""
        if self.worker is not None:
            self.worker.kill()
        self.state = "restarting"
        self.restarts += 1
        worker = self.service.new_worker()
        self.worker = worker
        self.state = "idle" if worker is not None else "failed"
        return worker is not None


class ModelService:
    """One served model (see the module docs)."""

    def __init__(self, spec: ModelSpec, settings: Settings, store: JobStore, context: Any = None,
                 backend: Any = None) -> None:
        self.spec = spec
        self.context = context
        self.backend = backend  # a RayBackend (--ray): workers are Ray actors; None: local processes
        self.settings = settings
        self.store = store
        self.queue = FairQueue(settings.max_queued, settings.max_queued_per_key)
        self.info: dict | None = None
        self.isolation = ""  # what the first worker said it isolated (one line)
        self.isolation_missing: list[str] = []
        self.stopping = False
        self.slots = [WorkerSlot(self, index) for index in range(settings.workers_per_model)]
        self._lock = threading.Lock()
        self._spare: WorkerProcess | None = None
        self._spare_loading = False

    def options(self) -> WorkerOptions:
        return WorkerOptions(name=self.spec.name, source=self.spec.source, **worker_values(self.settings))

    # -- workers ------------------------------------------------------------------------
    def spawn(self) -> Any:
        """A new, not yet started worker: a local process, or a Ray actor with ``--ray``."""
        if self.backend is not None:
            return self.backend.worker(self.options())
        return WorkerProcess(self.options(), self.context)

    def start(self) -> None:
        """Load the model in every slot's worker (in parallel); raise :class:`WorkerStartError`."""
        workers = [self.spawn() for _ in self.slots]
        for worker in workers:
            worker.start()
        try:
            for slot, worker in zip(self.slots, workers):
                self.info = worker.wait_ready(self.settings.startup_timeout)
                slot.worker, slot.state = worker, "idle"
                self.isolation, self.isolation_missing = worker.isolation, worker.isolation_missing
        except WorkerStartError:
            for worker in workers:
                worker.kill()
            raise
        for slot in self.slots:
            slot.thread.start()
        if self.settings.spare_workers:
            self._refill_spare()

    def new_worker(self) -> WorkerProcess | None:
        """A loaded worker: the spare if one is ready, else a fresh one (None if loading fails)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            self._refill_spare()
            return spare
        for attempt in range(1, _START_ATTEMPTS + 1):
            if self.stopping:
                return None
            worker = self.spawn()
            worker.start()
            try:
                worker.wait_ready(self.settings.startup_timeout)
                return worker
            except WorkerStartError as error:
                logger.error("%s: worker start %d/%d failed: %s", self.spec.name, attempt, _START_ATTEMPTS, error)
                time.sleep(min(2.0 * attempt, 10.0))
        return None

    def _refill_spare(self) -> None:
        with self._lock:
            if self._spare_loading or self._spare is not None or self.stopping:
                return
            self._spare_loading = True

        def load() -> None:
            worker = self.spawn()
            try:
                worker.start()
                worker.wait_ready(self.settings.startup_timeout)
            except WorkerStartError as error:
                logger.error("%s: the spare worker failed to load: %s", self.spec.name, error)
                worker = None
            with self._lock:
                self._spare_loading = False
                if worker is not None and not self.stopping:
                    self._spare, worker = worker, None
            if worker is not None:
                worker.stop()

        threading.Thread(target=load, name=f"seethrough-spare-{self.spec.name}", daemon=True).start()

    def stop(self) -> None:
        self.stopping = True
        self.queue.close()
        for job in self.queue.drain():
            self.fail(job, server_error("RemoteError", "the server is shutting down; submit the request again"))
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.stop()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.stop()

    # -- requests -----------------------------------------------------------------------
    def submit(self, job: Job, fairness_key: Any) -> int:
        """Queue ``job``; return its position (raises :class:`~.scheduler.QueueFull`)."""
        position = self.queue.put(fairness_key, job)
        self.store.queued(job, position)
        return position

    def cancel(self, job: Job) -> None:
        """Take a cancelled ``job`` out of the queue (a running one is stopped by its dispatcher)."""
        if self.queue.remove(job):
            self.update_positions()

    def update_positions(self) -> None:
        for position, job in enumerate(self.queue.positions(_POSITION_UPDATES), 1):
            self.store.queued(job, position)

    def fail(self, job: Job, error: dict) -> None:
        """Finish ``job`` with an error made by the server."""
        try:
            packed = wire.pack({"error": error}, max_bytes=max(self.settings.max_result_bytes, 1 << 20))
        except wire.WireError:
            packed = b""
        self.store.finish(job, packed, error)

    def health(self) -> dict:
        states = [slot.state for slot in self.slots]
        state = ("failed" if all(s == "failed" for s in states) else "busy" if any(s == "busy" for s in states)
                 else "idle" if all(s == "idle" for s in states) else "starting")
        return {
            "state": state,
            "queued": len(self.queue),
            "workers": [slot.describe() for slot in self.slots],
            "spare": self._spare.pid if self._spare is not None else None,
            "read_only_weights": bool((self.info or {}).get("read_only_weights")),
        }


class ServerRuntime:
    """The job store and every model service of one server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.job_ttl, settings.max_log_lines, settings.max_log_bytes,
                              spool_dir=settings.spool_dir, max_stored_bytes_per_key=settings.max_stored_bytes_per_key,
                              max_jobs_per_key=settings.max_jobs_per_key)
        context = start_context(settings.start_method, [spec.source for spec in settings.models])
        self.backend = _ray_backend(settings)
        self.services = {spec.name: ModelService(spec, settings, self.store, context, self.backend)
                         for spec in settings.models}
        folders = {spec.name: _local_folder(spec.source) for spec in settings.models}
        self.names = model_names(settings.models, folders)
        self.disclosure = Disclosure.of_server(settings, [folder for folder in folders.values() if folder],
                                               self.store.spool)
        self.store.scrub = self.disclosure.scrub

    def cancel(self, job: Job) -> str | None:
        """Cancel or forget ``job`` (DELETE): the state it had, None if it was gone already."""
        was = self.store.cancel(job, "the request was cancelled (DELETE /v1/requests/{id}, job.cancel() or Ctrl+C)")
        if was in ("queued", "running"):
            service = self.services.get(job.model)
            if service is not None:
                service.cancel(job)
        return was

    def start(self) -> None:
        """Load every model (in parallel); raise :class:`WorkerStartError` if one fails."""
        with ThreadPoolExecutor(max_workers=len(self.services)) as pool:
            futures = {name: pool.submit(service.start) for name, service in self.services.items()}
        failures = []
        for name, future in futures.items():
            error = future.exception()
            if error is not None:
                failures.append(str(error))
        if failures:
            self.stop()
            raise WorkerStartError("; ".join(failures))

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        self.store.close()
        if self.backend is not None:
            self.backend.shutdown()

    def health(self) -> dict:
        return {name: service.health() for name, service in self.services.items()}

    def isolation_line(self) -> tuple[str, bool]:
        """One line for the start-up log: what the workers isolate; and whether all of it is."""
        lines = {service.isolation for service in self.services.values()}
        complete = not any(service.isolation_missing for service in self.services.values())
        if len(lines) == 1:
            return next(iter(lines)), complete
        return " | ".join(f"{name}: {service.isolation}" for name, service in self.services.items()), complete


def _ray_backend(settings: Settings) -> Any:
    """The Ray backend for ``--ray``, else None."""
    if settings.ray is None:
        return None
    # Ray is an optional extra: imported only by a server started with --ray, never by a plain one
    from .ray_backend import RayBackend

    return RayBackend(settings)


def _local_folder(source: str) -> str | None:
    """The folder ``source`` loads from on this machine (a folder, or the offline copy of a known repo id)."""
    if os.path.isdir(source):
        return source
    if source in OFFLINE_MODELS:
        try:
            return resolve_source(source)
        except Exception:  # noqa: BLE001 - a name is only an extra; the worker reports real load errors
            return None
    return None
