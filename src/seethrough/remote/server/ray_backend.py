"""Workers as Ray actors: ``seethrough serve --ray ADDRESS``.

The API process (auth, intake, fair queue, jobs, events) stays as it is; only
where each worker runs changes.  Every worker slot holds a :class:`RayWorker`
instead of a :class:`~.process.WorkerProcess` — the same interface (``start``,
``wait_ready``, ``send_run``, ``receive``, ``kill``, ``stop``, ``alive``,
``pid``, ``death``), so the dispatcher, its wall-clock limit, crash handling
and replacement are the built-in server's own code.

Each :class:`RayWorker` is one Ray actor (:class:`WorkerHost`), placed by Ray
with the resources ``--cpus-per-worker`` / ``--gpus-per-worker`` ask for and
spread over the cluster's nodes.  The actor runs **no user code**: it starts
the ordinary worker process (:class:`~.process.WorkerProcess`, the same entry
point, pipe framing, OS isolation, process per request, read-only weights,
memory limit and model check as the built-in server) as its child and relays its messages.  A
request's code runs only in that child.

Faults: a killed actor, or one whose node left the cluster, surfaces as
:class:`~.process.WorkerDied` on the next poll (every wait on Ray is
bounded, so the API never hangs on a lost actor); the slot fails the running
request with a ``WorkerCrashedError`` and starts a replacement actor, which
Ray places on a node that is still there.  The wall-clock limit is enforced
as locally: a forking worker (``--request-process fork``) kills the request's
process itself and serves on; otherwise, or when a worker stops answering,
the slot kills the actor (``ray.kill``) — the worker process in it notices
its parent is gone and exits within a second — and starts a new one.

This module imports :mod:`ray`; it is imported only by a server started with
``--ray`` (Ray is the optional extra ``seethrough[ray]``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from . import framing
from .process import WorkerDied, WorkerProcess, WorkerStartError, start_context
from .settings import Settings
from .worker import WorkerOptions

__all__ = ["RayBackend", "RayWorker", "WorkerHost", "device_map_for"]

logger = logging.getLogger("seethrough.server")

_WINDOW = 0.5  # longest an actor call waits for the worker's next message
_PING_STALE = 10.0  # an actor that has not answered a ping for this long counts as lost
_DIED = "__died__"  # relayed by the actor: its worker process ended
_MALFORMED = "__malformed__"  # relayed by the actor: its worker sent bytes framing cannot read


def device_map_for(gpus: float) -> str | None:
    """The ``device_map`` a worker with ``gpus`` GPUs loads its model with.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned to the actor (the
    worker process inherits it), so ``"auto"`` spreads the layers over exactly
    those; one GPU (or a share of one) loads on it whole; none stays on CPU.
    """
    if gpus > 1:
        return "auto"
    if gpus > 0:
        return "cuda"
    return None


class WorkerHost:
    """The Ray actor: one worker process, started and read as the built-in server does (see the module docs)."""

    def __init__(self, options: WorkerOptions) -> None:
        # spawn: the actor is a Ray process full of Ray's threads; its worker must inherit none of them
        self.worker = WorkerProcess(options, start_context("spawn"))

    def start(self, timeout: float) -> dict:
        """Start the worker and wait for its model; a dict with ``info`` or ``error``."""
        context = ray.get_runtime_context()
        where = {"node": context.get_node_id(), "actor_pid": os.getpid(),
                 "gpus": [str(gpu) for gpu in ray.get_gpu_ids()]}
        self.worker.start()
        try:
            info = self.worker.wait_ready(timeout)
        except WorkerStartError as error:
            return {"error": str(error), "where": where}
        return {"info": info, "memory": self.worker.memory, "pid": self.worker.pid, "where": where,
                "isolation": self.worker.isolation, "isolation_missing": list(self.worker.isolation_missing),
                "request_process": self.worker.request_process}

    def run(self, payload: bytes, job_id: str, wait: float) -> list[tuple[str, dict, bytes]]:
        """Hand a request to the worker, then return what it sends within ``wait`` seconds."""
        try:
            self.worker.send_run(payload, job_id)
        except WorkerDied as death:
            return [(_DIED, {"how": str(death)}, b"")]
        return self.receive(wait)

    def receive(self, wait: float) -> list[tuple[str, dict, bytes]]:
        """The worker's messages: wait up to ``wait`` s for the first, then take all that are ready."""
        messages: list[tuple[str, dict, bytes]] = []
        timeout = wait
        while True:
            try:
                message = self.worker.receive(timeout)
            except WorkerDied as death:
                messages.append((_DIED, {"how": str(death)}, b""))
                return messages
            except framing.FramingError as error:
                self.worker.kill()
                messages.append((_MALFORMED, {"how": str(error)}, b""))
                return messages
            if message is None:
                return messages
            messages.append((message.type, message.fields, message.payload))
            if message.type == "answer":
                return messages
            timeout = 0.0

    def alive(self) -> bool:
        return self.worker.alive

    def stop(self) -> None:
        self.worker.stop()


class RayBackend:
    """The connection to the Ray cluster and the actor class the workers run in."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        address = _resolve(settings.ray or "auto")
        _check_reachable(address)
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
        self.gpus = settings.gpus_per_worker or 0.0
        self.cpus = settings.cpus_per_worker if settings.cpus_per_worker is not None else 1.0
        # one request at a time per actor; the slot replaces a lost actor itself (no Ray restarts,
        # which would bring back an actor without its model and without telling the slot)
        self.actor_class = ray.remote(WorkerHost).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0, max_concurrency=1,
            scheduling_strategy="SPREAD",
        )
        resources = ray.cluster_resources()
        logger.info("connected to Ray at %s: %d node(s), %g CPUs, %g GPUs; each worker asks for %g CPU(s), %g GPU(s)",
                    address, len([n for n in ray.nodes() if n.get("Alive")]), resources.get("CPU", 0),
                    resources.get("GPU", 0), self.cpus, self.gpus)

    def worker(self, options: WorkerOptions) -> "RayWorker":
        device_map = device_map_for(self.gpus)
        if device_map is not None:
            options = dataclasses.replace(options, device_map=device_map)
        return RayWorker(self, options)

    def node_address(self, node_id: str | None) -> str | None:
        """The address a node registered with (``NodeManagerAddress``), for ``/v1/health``."""
        for node in ray.nodes():
            if node.get("NodeID") == node_id:
                return node.get("NodeManagerAddress")
        return None

    def shutdown(self) -> None:
        ray.shutdown()


class RayWorker:
    """The API process's end of one worker actor (the :class:`~.process.WorkerProcess` interface)."""

    def __init__(self, backend: RayBackend, options: WorkerOptions) -> None:
        self.backend = backend
        self.options = options
        self.actor: Any = None
        self.info: dict | None = None
        self.memory = ""
        self.isolation = ""  # the worker's own account, as WorkerProcess reports it
        self.isolation_missing: list[str] = []
        self.request_process = "reuse"
        self.where: dict = {}
        self.started = 0.0
        self._pid: int | None = None
        self._start_ref: Any = None
        self._pending: Any = None  # the actor call whose messages are awaited
        self._ping: Any = None
        self._ping_since = 0.0
        self._buffer: deque = deque()
        self._death: str | None = None

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Create the actor and ask it to load the model (returns at once; see :meth:`wait_ready`)."""
        self.started = time.monotonic()
        self.actor = self.backend.actor_class.remote(self.options)
        self._start_ref = self.actor.start.remote(self.backend.settings.startup_timeout)

    def wait_ready(self, timeout: float) -> dict:
        """Wait for the model to load; return its description (raises :class:`WorkerStartError`)."""
        name, source = self.options.name, self.options.source
        try:
            reply = ray.get(self._start_ref, timeout=timeout)
        except GetTimeoutError:
            self.kill()
            raise WorkerStartError(
                f"the Ray worker for {name!r} did not load {source!r} within {timeout:.0f} s (--startup-timeout); "
                f"if the cluster lacks free resources ({self.backend.cpus:g} CPU(s) and {self.backend.gpus:g} GPU(s) "
                "per worker), add nodes or lower --workers-per-model / --cpus-per-worker / --gpus-per-worker"
            ) from None
        except RayError as error:
            self.kill()
            raise WorkerStartError(f"the Ray worker for {name!r} was lost while loading {source!r} "
                                   f"({_first_line(error)})") from None
        self.where = dict(reply.get("where") or {})
        self.where["node_ip"] = self.backend.node_address(self.where.get("node"))
        if "error" in reply:
            self.kill()
            raise WorkerStartError(str(reply["error"]))
        self.info, self.memory, self._pid = reply["info"], str(reply.get("memory", "")), reply.get("pid")
        self.isolation = str(reply.get("isolation", ""))
        self.isolation_missing = [str(name) for name in reply.get("isolation_missing") or []]
        self.request_process = "fork" if reply.get("request_process") == "fork" else "reuse"
        return self.info

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        """Whether the actor and its worker are up, without waiting on Ray (a ping answers on a later call)."""
        if self._death is not None or self.actor is None:
            return False
        if self._pending is not None:
            return True  # a running request learns of a death from its own messages
        if self._ping is not None:
            ready, _ = ray.wait([self._ping], timeout=0)
            if not ready:
                if time.monotonic() - self._ping_since > _PING_STALE:
                    self._lost(f"its Ray actor on node {self.node} did not answer for {_PING_STALE:g} s")
                    return False
                return True
            ping, self._ping = self._ping, None
            try:
                worker_alive = ray.get(ping)
            except RayError as error:
                self._lost(_actor_death(error, self.node))
                return False
            if not worker_alive:
                self._lost("its worker process inside the Ray actor ended")
                return False
        self._ping, self._ping_since = self.actor.alive.remote(), time.monotonic()
        return True

    @property
    def node(self) -> str:
        return str(self.where.get("node_ip") or "?") + (f" ({self.where['node'][:12]})" if self.where.get("node") else "")

    def describe(self) -> dict:
        """Where the worker runs, for ``/v1/health``."""
        return {"node": self.where.get("node"), "node_ip": self.where.get("node_ip"),
                "actor_pid": self.where.get("actor_pid"), "gpus": self.where.get("gpus", [])}

    def kill(self) -> None:
        """Kill the actor (its worker process exits with it)."""
        if self._death is None:
            self._death = "it was killed by the server"
        self._pending = self._ping = None
        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except (RayError, ValueError) as error:
                logger.debug("ray.kill: %s", error)

    def stop(self, grace: float = 2.0) -> None:
        """Ask the worker to exit, then kill the actor."""
        if self.actor is not None and self._death is None:
            try:
                ray.get(self.actor.stop.remote(), timeout=grace)
            except RayError as error:  # includes the timeout: the kill below ends it anyway
                logger.debug("stopping a Ray worker: %s", error)
        self.kill()

    def death(self) -> str:
        return self._death or "it is still running"

    def _lost(self, how: str) -> None:
        self._death = how
        self._pending = self._ping = None

    # -- messages -----------------------------------------------------------------------------
    def send_run(self, payload: bytes, job_id: str) -> None:
        """Hand a request to the actor (raises :class:`WorkerDied` if it is gone)."""
        if self._death is not None or self.actor is None:
            raise WorkerDied(self.death())
        self._buffer.clear()
        self._ping = None
        self._pending = self.actor.run.remote(payload, job_id, _WINDOW)

    def receive(self, timeout: float) -> framing.Message | None:
        """The next message, or None if none came within ``timeout`` seconds (raises :class:`WorkerDied`)."""
        if self._buffer:
            return self._take()
        if self._death is not None or self.actor is None:
            raise WorkerDied(self.death())
        if self._pending is None:
            self._pending = self.actor.receive.remote(min(_WINDOW, max(timeout, 0.0)))
        ready, _ = ray.wait([self._pending], timeout=max(timeout, 0.0))
        if not ready:
            return None
        pending, self._pending = self._pending, None
        try:
            items = ray.get(pending)
        except RayError as error:
            self._lost(_actor_death(error, self.node))
            raise WorkerDied(self._death) from None
        self._buffer.extend(items)
        return self._take() if self._buffer else None

    def _take(self) -> framing.Message:
        kind, fields, payload = self._buffer.popleft()
        if kind == _DIED:
            self._lost(f"{fields.get('how')}, inside its Ray actor on node {self.node}")
            raise WorkerDied(self._death)
        if kind == _MALFORMED:
            raise framing.FramingError(str(fields.get("how")))
        return framing.Message(kind, dict(fields), bytes(payload))


def _resolve(address: str) -> str:
    """The head's HOST:PORT for ``--ray auto`` (``RAY_ADDRESS``, else the
    cluster last started on this machine), or ``address`` unchanged.  Ray on
    its own would print a long traceback when there is none, and wait for
    minutes on a cluster file left behind by one that has stopped."""
    if address != "auto":
        return address
    found = os.environ.get("RAY_ADDRESS") or ""
    where = "RAY_ADDRESS"
    if not found:
        from ray._common.utils import get_ray_address_file  # Ray's own rule for where `ray start` records it

        record = get_ray_address_file(None)
        where = record
        try:
            with open(record, encoding="utf-8") as file:
                found = file.read().strip()
        except OSError:
            found = ""
    if not found or found == "auto":
        raise WorkerStartError("--ray auto: no Ray cluster runs on this machine (RAY_ADDRESS is unset and `ray start` "
                               "has recorded none); start one with `ray start --head`, pass --ray HOST:PORT of a "
                               "head elsewhere, or --ray local for a cluster inside this server")
    try:
        _check_reachable(found, timeout=3.0)
    except WorkerStartError:
        raise WorkerStartError(f"--ray auto: the Ray cluster recorded at {found} (in {where}) does not answer: it has "
                               "stopped; start one with `ray start --head`, or pass --ray HOST:PORT of a running "
                               "head") from None
    return found


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once, in words, when a HOST:PORT head does not answer (Ray itself would retry for ever)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise WorkerStartError(f"cannot reach the Ray head at {address} ({error}); start it with `ray start --head` "
                               "there, or pass --ray auto on a node of the cluster") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _actor_death(error: BaseException, node: str) -> str:
    return (f"its Ray actor on node {node} died: the actor process was killed or its node left the cluster "
            f"({_first_line(error)})")
