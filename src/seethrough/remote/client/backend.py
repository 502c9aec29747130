"""The client half of ``remote=True``: run a captured block on a server.

A tracer (or session) entered with ``remote=True`` captures its body exactly
as a local one does; on leaving the block, instead of running it here, this
module packs the body and the data it reads into a request, submits it,
follows it (printing what the body prints), and binds the returned values in
the caller's scope with the same rules as a local run.  With
``blocking=False`` it returns after submitting; ``tracer.job`` is the handle.
With ``remote="local"`` the same request goes through the server's steps in
this process instead, to check a body before submitting it.  Those steps are
the server's (its intake, guard and execution), and the client package never
imports the server: it calls the one entry point the protocol declares for
this, :data:`seethrough.remote.protocol.LOCAL_SERVER` (the module
``seethrough.remote.server.local``, function ``run_local``), loaded by that
name when a body first runs with ``remote="local"`` — as a URL names a server
for ``remote=True``.  Nothing is registered at import time.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

from ...tracing.capture import CapturedBlock
from ...tracing.saving import NotSaved
from ...tracing.takeover import frame_namespace, write_back
from .. import wire
from .connection import MAX_REQUEST_BYTES, RemoteClient, RemoteError, RemoteJob
from .collect import build_request
from ..protocol import LOCAL_SERVER, Request

# remote="local": run_local(request, model) -> the answer a server would send.
LocalRunner = Callable[[Request, Any], dict]


def local_server() -> LocalRunner:
    """The in-process server's entry point (:data:`~seethrough.remote.protocol.LOCAL_SERVER`),
    loaded by its declared name: the client package imports nothing of the server."""
    module_name, _, function = LOCAL_SERVER.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise RemoteError(
            f"remote='local' cannot run: the in-process server {LOCAL_SERVER} cannot be loaded "
            f"({type(error).__name__}: {error}). Is seethrough's server package installed whole? "
            "Use remote=True with a server meanwhile."
        ) from None


@dataclass(frozen=True)
class RemoteOptions:
    """Where and how a block runs remotely."""

    host: str | None = None
    api_key: str | None = None
    blocking: bool = True
    local: bool = False  # remote="local": the server's steps in this process (seethrough.remote.server.local)


def run_remote(
    *,
    options: RemoteOptions,
    kind: str,
    model: Any,
    captured: CapturedBlock,
    frame: FrameType,
    holder: Any,
    args: tuple = (),
    kwargs: dict | None = None,
    keep_graph: bool = False,
    generate: dict | None = None,
) -> dict[str, Any]:
    """Run the block on the server; bind its values in ``frame``; return them.

    ``holder`` is the tracer or session object: it gets ``.job`` (and, for
    generation, the result: ``holder.receive_result``) and is bound to the
    block's ``as`` name.  ``model`` names the served model with its public
    ``remote_name`` (None: built from an object).  Called from the block's
    ``__exit__``: errors are raised without the internal take-over signal as
    their context."""
    try:
        return _run_remote(options, kind, model, captured, frame, holder, args, kwargs, keep_graph, generate)
    except BaseException as error:
        error.__suppress_context__ = True  # not "during handling of" our internal signal
        raise


def _run_remote(
    options: RemoteOptions, kind: str, model: Any, captured: CapturedBlock, frame: FrameType, holder: Any,
    args: tuple, kwargs: dict | None, keep_graph: bool, generate: dict | None,
) -> dict[str, Any]:
    seed, globals_, _ = frame_namespace(frame)
    request = build_request(
        kind=kind, model=model, captured=captured, seed=seed, globals_=globals_,
        args=args, kwargs=kwargs, keep_graph=keep_graph, generate=generate,
        model_name=_local_name(model) if options.local else None,
    )
    values: dict[str, Any] = {}
    if captured.as_name:
        values[captured.as_name] = holder
    if options.local:
        answer = local_server()(request, model)
    else:
        client = RemoteClient(options.host, options.api_key)
        payload = wire.pack(request.to_wire(), max_bytes=MAX_REQUEST_BYTES)
        submitted = client.submit(payload)
        job = RemoteJob(client, submitted["id"])
        holder.job = job
        if not options.blocking:
            write_back(frame, values)
            return values
        try:
            answer = job.wait()
        except KeyboardInterrupt:  # Ctrl+C: the request must not run on without anyone waiting
            with contextlib.suppress(RemoteError):
                job.cancel()
            raise
        finally:
            # Nobody else holds this job's id: free the server's copy of its result at once.
            with contextlib.suppress(RemoteError):
                job.delete()
    returned = dict(answer.get("values", {}))
    if "__result__" in returned:
        holder.receive_result(returned.pop("__result__"))
    where = f"at {captured.filename}:{captured.with_lineno} (remote)"
    for name in answer.get("not_saved", []):
        returned[name] = NotSaved(name, where, captured.assigned_lines.get(name))
    values.update(returned)
    write_back(frame, values)
    return values


def _local_name(model: Any) -> str:
    """The model's name in a local check: its served name, else any (a plain
    ``Model(module)`` has none, and the check needs no server to find it)."""
    return getattr(model, "remote_name", None) or type(model._module).__name__
