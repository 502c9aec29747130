"""One worker process, seen from the API process: start, talk, kill.

:class:`WorkerProcess` starts :func:`.worker.run_worker` in a fresh
interpreter, waits for its ``ready`` message, sends it requests and reads its
messages with a deadline.  Everything the worker sends is decoded as
untrusted input (:mod:`.framing`); the pipe never carries pickles after the
start itself, whose arguments come from the API process.

Start methods (:func:`start_context`, ``--start-method``):

* ``spawn`` (the default): each worker is a new interpreter that imports
  torch, transformers and seethrough itself, then loads its model — nothing
  of the API process's state is inherited;
* ``forkserver``: a clean helper interpreter imports those libraries (and the
  modelling code of the served architectures) once; each worker is forked
  from it.  Workers still inherit nothing from the API process, and no worker
  from another, but a replacement is ready in about the time its weights take
  to load instead of seconds of imports.

Either way the worker isolates itself once its model is loaded
(:mod:`.isolation`) and says so in its ``ready`` message; with
``--request-process fork`` it then runs each request in a process forked
from itself (:mod:`.forking`), so a timeout or a crash costs that process,
not the loaded model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

from . import framing
from .settings import SettingsError
from .worker import WorkerOptions, run_worker

__all__ = ["START_METHODS", "WorkerDied", "WorkerProcess", "WorkerStartError", "start_context"]

START_METHODS = ("spawn", "forkserver")
_PRELOAD = ["torch", "transformers", "seethrough", "seethrough.models.language", "seethrough.remote.server.execute",
            "seethrough.remote.server.worker", "seethrough.remote.server.guard", "transformers.generation"]


def start_context(method: str, sources: list[str] | tuple[str, ...] = ()) -> Any:
    """The multiprocessing context for ``method``; for ``forkserver``, with the
    libraries and the modelling modules of ``sources`` preloaded."""
    if method not in START_METHODS:
        raise SettingsError(f"unknown start method {method!r}; use one of {', '.join(START_METHODS)}")
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(_PRELOAD + _modelling_modules(sources))
    return context


def _modelling_modules(sources: list[str] | tuple[str, ...]) -> list[str]:
    """``transformers.models.X.modeling_X`` for each local model folder's ``model_type``."""
    from ...models.language import resolve_source

    modules = []
    for source in sources:
        try:
            config = json.loads((Path(resolve_source(source)) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            continue
        model_type = str(config.get("model_type", "")).replace("-", "_")
        if model_type.isidentifier():
            modules.append(f"transformers.models.{model_type}.modeling_{model_type}")
    return modules


class WorkerStartError(RuntimeError):
    """A worker could not load its model."""


class WorkerDied(RuntimeError):
    """The worker process ended (crash, kill, or a broken pipe)."""


class WorkerProcess:
    """A worker process and the API process's end of its pipe."""

    def __init__(self, options: WorkerOptions, context: Any = None) -> None:
        self.options = options
        self.context = context if context is not None else multiprocessing.get_context("spawn")
        self.process: Any = None
        self.conn: Any = None
        self.info: dict | None = None
        self.memory = ""
        self.isolation = ""  # the worker's one-line account of what is isolated
        self.isolation_missing: list[str] = []
        self.request_process = "reuse"  # "fork": a process per request (the worker enforces the time limit)
        self.started = 0.0
        self._max_message = options.max_result_bytes + framing.MAX_HEADER_BYTES + 4096

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process (returns at once; see :meth:`wait_ready`)."""
        # glibc gives each thread its own 64 MiB heap arena; under RLIMIT_AS that
        # reserved address space would eat the request budget.  Inherited at spawn.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        parent, child = self.context.Pipe(duplex=True)
        self.process = self.context.Process(
            target=run_worker, args=(child, self.options), daemon=True,
            name=f"seethrough-worker-{self.options.name}",
        )
        self.started = time.monotonic()
        self.process.start()
        child.close()
        self.conn = parent

    def wait_ready(self, timeout: float) -> dict:
        """Wait for the model to load; return its description (raises :class:`WorkerStartError`)."""
        try:
            message = self.receive(timeout)
        except (WorkerDied, framing.FramingError) as error:
            self.kill()
            raise WorkerStartError(f"the worker for {self.options.name!r} stopped while loading "
                                   f"{self.options.source!r} ({error})") from None
        if message is None:
            self.kill()
            raise WorkerStartError(f"the worker for {self.options.name!r} did not load {self.options.source!r} "
                                   f"within {timeout:.0f} s (--startup-timeout)")
        if message.type == "failed":
            self.kill()
            raise WorkerStartError(f"cannot load model {self.options.name!r} from {self.options.source!r}: "
                                   f"{message.fields.get('message', 'unknown error')}")
        if message.type != "ready":
            self.kill()
            raise WorkerStartError(f"the worker for {self.options.name!r} sent {message.type!r} instead of 'ready'")
        try:
            info = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError) as error:
            self.kill()
            raise WorkerStartError(f"the worker for {self.options.name!r} sent an unreadable description ({error})") from None
        self.info = info if isinstance(info, dict) else {}
        self.memory = str(message.fields.get("memory", ""))
        self.isolation = str(message.fields.get("isolation", ""))
        missing = message.fields.get("isolation_missing")
        self.isolation_missing = [str(name) for name in missing] if isinstance(missing, list) else []
        self.request_process = "fork" if message.fields.get("request_process") == "fork" else "reuse"
        return self.info

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def kill(self) -> None:
        """SIGKILL the process and reap it (nothing it was doing survives)."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stop(self, grace: float = 2.0) -> None:
        """Ask the worker to exit; kill it if it does not within ``grace`` seconds."""
        if self.process is None:
            return
        if self.conn is not None and self.process.is_alive():
            try:
                self.conn.send_bytes(framing.encode("stop"))
            except (OSError, ValueError):
                pass
            self.process.join(timeout=grace)
        self.kill()

    def death(self) -> str:
        """How the process ended, in words."""
        if self.process is None:
            return "it was never started"
        self.process.join(timeout=2)  # it may be exiting right now
        if self.process.is_alive():
            return "it is still running"
        code = self.process.exitcode
        if code is None:
            return "its exit status is unknown"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"it was killed by {name}"
        return f"it exited with status {code}"

    # -- messages -------------------------------------------------------------------------
    def send_run(self, payload: bytes, job_id: str) -> None:
        """Hand a request to the worker (raises :class:`WorkerDied` if it is gone)."""
        if self.conn is None or not self.alive:
            raise WorkerDied(self.death())
        try:
            self.conn.send_bytes(framing.encode("run", payload, job=job_id))
        except (OSError, ValueError) as error:
            raise WorkerDied(f"{self.death()} ({error})") from None

    def send_cancel(self) -> None:
        """Ask a forking worker to kill the running request's process (it answers ``cancelled``)."""
        if self.conn is None or not self.alive:
            raise WorkerDied(self.death())
        try:
            self.conn.send_bytes(framing.encode("cancel"))
        except (OSError, ValueError) as error:
            raise WorkerDied(f"{self.death()} ({error})") from None

    def receive(self, timeout: float) -> framing.Message | None:
        """The next message, or None if none came within ``timeout`` seconds.

        Raises :class:`WorkerDied` when the process has ended and
        :class:`~.framing.FramingError` for a malformed message.
        """
        if self.conn is None:
            raise WorkerDied(self.death())
        try:
            if not self.conn.poll(max(0.0, timeout)):
                if not self.process.is_alive():
                    raise WorkerDied(self.death())
                return None
            data = self.conn.recv_bytes(self._max_message)
        except EOFError:
            raise WorkerDied(self.death()) from None
        except OSError as error:  # a message over the size limit, or a broken pipe
            self.kill()
            raise WorkerDied(f"{self.death()} (its pipe failed: {error})") from None
        return framing.decode(data)
