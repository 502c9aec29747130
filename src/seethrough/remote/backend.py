"""The client half of ``remote=True``: run a captured block on a server.

A tracer (or session) entered with ``remote=True`` captures its body exactly
as a local one does; on leaving the block, instead of running it here, this
module packs the body and the data it reads into a request, submits it,
follows it (printing what the body prints), and binds the returned values in
the caller's scope with the same rules as a local run.  With
``blocking=False`` it returns after submitting; ``tracer.job`` is the handle.
With ``remote="local"`` the same request goes through the server's steps in
this process instead, to check a body before submitting it.  Those steps live
in a higher layer (:mod:`.local` uses the server's intake, guard and
execution), so this module does not import them: :mod:`.local`'s runner is
handed in with :func:`register_local_runner`, which the package root
(``seethrough/__init__.py``) calls.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

from ..errors import ModulePathError
from ..tracing.capture import CapturedBlock
from ..tracing.saving import NotSaved
from ..tracing.takeover import frame_namespace, write_back
from . import wire
from .client import MAX_REQUEST_BYTES, RemoteClient, RemoteError, RemoteJob
from .collect import build_request
from .protocol import Request

# remote="local": run_local(request, model) -> the answer a server would send.
LocalRunner = Callable[[Request, Any], dict]
_local_runner: LocalRunner | None = None


def register_local_runner(runner: LocalRunner) -> None:
    """Set what ``remote="local"`` runs a request with (:func:`.local.run_local`)."""
    global _local_runner
    _local_runner = runner


@dataclass(frozen=True)
class RemoteOptions:
    """Where and how a block runs remotely."""

    host: str | None = None
    api_key: str | None = None
    blocking: bool = True
    local: bool = False  # remote="local": the server's steps in this process (see .local)


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
    generation, the result) and is bound to the block's ``as`` name.  Called
    from the block's ``__exit__``: errors are raised without the internal
    take-over signal as their context."""
    try:
        return _run_remote(options, kind, model, captured, frame, holder, args, kwargs, keep_graph, generate)
    except ModulePathError as error:
        hinted = _custom_envoy_hint(error, model)
        if hinted is not None:
            raise hinted from None
        error.__suppress_context__ = True
        raise
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
        if _local_runner is None:
            raise RemoteError(
                "remote='local' cannot run: no local runner is registered (the package root, "
                "seethrough/__init__.py, registers seethrough.remote.local.run_local when it is imported; "
                "was it replaced or only partly imported?). Use remote=True with a server meanwhile."
            )
        answer = _local_runner(request, model)
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
        holder._result = returned.pop("__result__")
    where = f"at {captured.filename}:{captured.with_lineno} (remote)"
    for name in answer.get("not_saved", []):
        returned[name] = NotSaved(name, where, captured.assigned_lines.get(name))
    values.update(returned)
    write_back(frame, values)
    return values


def _local_name(model: Any) -> str:
    """The model's name in a local check: its served name, else any (a plain
    ``Model(module)`` has none, and the check needs no server to find it)."""
    for attribute in ("_remote_name", "_source"):
        name = model.__dict__.get(attribute)
        if isinstance(name, str) and name:
            return name
    return type(model._model).__name__


def _custom_envoy_hint(error: ModulePathError, model: Any) -> ModulePathError | None:
    """The server's "no such attribute" for a name the user's own envoy classes
    (``envoys=``) define: say why (the server's envoys are the base class)."""
    mapping = model.__dict__.get("_envoys")
    if mapping is None:
        return None
    classes = [mapping] if isinstance(mapping, type) else list(mapping.values())
    message = str(error)
    for klass in classes:
        for owner in klass.__mro__:
            if owner.__module__.startswith("seethrough."):
                break
            for name in owner.__dict__:
                if not name.startswith("_") and f"attribute `{name}`" in message:
                    return ModulePathError(
                        f"{message}\n`{name}` is defined by your envoy class {owner.__name__} (`envoys=`), which "
                        "runs only on your machine: a server's envoys are seethrough's own. In a remote body, "
                        "compute it from `.output`/`.input` (in the body, or a helper function that travels)."
                    )
    return None
