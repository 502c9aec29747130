"""Run one remote request against a served model (inside a server worker).

The request's body goes through exactly the machinery of a local trace
(:class:`~seethrough.tracing.run.TraceRun`): captured from its source text,
run in greenlets beside the model's forward pass, handed back with the same
rules.  The differences are the walls around it: the body and its helper
functions are validated by :mod:`.sandbox` and run in its restricted
namespace, every attribute they touch checked by the run-time allowlist of
:mod:`.reach` (also in the ``with`` blocks nested in them); the model is a
per-request clone of the served wrapper (so an edit cannot leak into the
next request); the global RNG starts from a fresh seed and is restored
after the request, as is the grad mode; the body's source, parses and
compiled blocks are dropped from every cache when it ends; and only
transferable values go back.
"""

from __future__ import annotations

import itertools
import linecache
import traceback
from typing import Any, Callable

import torch

from ...errors import UsageTypeError
from ...models import LanguageModel
from ...models.backends import GenerateBackend, forward_backend
from ...models.model import envoy_at, fresh_copy
from ...tracing import capture
from ...tracing.capture import capture_source_block
from ...tracing.prefetch import PREFETCH, PREFETCH_LOOP, PREFETCH_RUN, prefetch, prefetch_loop, prefetch_run
from ...tracing.run import TraceRun
from ...tracing.runtime import SAVE_METHOD, save_method
from ...tracing.saving import NotSaved
from ...tracing.tracer import SessionScope, Tracer, enter_session, exit_session
from . import sandbox
from .modules import ModuleBuilder
from .. import portable
from ..protocol import Request, error_answer
from .reach import Guard, guard_tree

REMOTE_PREFIX = "remote:"


def remote_filename(filename: str) -> str:
    """The file name remote code is compiled under (shown back to the client)."""
    return REMOTE_PREFIX + filename


def execute(request: Request, served: Any, print_function: Callable[..., Any] = print) -> dict:
    """Run ``request`` on the served wrapper; return the answer (values or error)."""
    grad_mode = torch.is_grad_enabled()
    try:
        with sandbox.isolated_rng_state(), capture.code_transform(REMOTE_PREFIX, guard_tree):
            values = _run(request, served, print_function)
        return _answer(values)
    except Exception as error:  # noqa: BLE001 - every failure becomes an answer
        return {"error": describe_error(error, request)}
    finally:
        torch.set_grad_enabled(grad_mode)
        _drop_gradients(served)
        capture.forget(REMOTE_PREFIX)  # no line, parse or compiled block of this body outlives it


def _run(request: Request, served: Any, print_function: Callable[..., Any]) -> dict[str, Any]:
    filename = remote_filename(request.filename)
    padded = "\n" * (request.first_line - 1) + request.source
    sandbox.validate(padded, filename)
    model = fresh_copy(served)  # per request: `edit` and friends cannot reach the next one
    module = getattr(model, "_module", None)
    protected = itertools.chain(module.parameters(), module.buffers()) if module is not None else ()
    guard = Guard(protected)  # the served weights: read, never changed in place
    extra: dict[str, Any] = dict(request.variables)
    for name, path in request.envoys.items():
        extra[name] = model if path == "" else envoy_at(model, path)
    for name, module in request.modules.items():
        extra[name] = sandbox.module_proxy(module)
    if request.packages:  # registered modules: rebuilt from their source, in the sandbox
        builder = ModuleBuilder(request.packages, guard, print_function, registered_filename, _add_lines)
        builder.validate_all()
        for name, (module_name, attribute) in request.imports.items():
            rebuilt = builder.get(module_name)
            extra[name] = getattr(rebuilt, attribute) if attribute else rebuilt
    namespace = sandbox.safe_globals(extra, print_function, guard)
    for name, source in request.functions.items():
        helper_file = remote_filename(f"{request.filename}:{name}")
        tree = sandbox.validate(source, helper_file)
        _add_lines(helper_file, source)
        exec(sandbox.compile_body(tree, helper_file), namespace)
    captured = capture_source_block(padded, filename, what=f"model.{request.kind}(...)")
    if request.kind == "session":
        namespace[SAVE_METHOD] = save_method  # the session body's own `X.save()` calls
        namespace[PREFETCH] = prefetch  # and what runs of them compile to (tracing.prefetch)
        namespace[PREFETCH_RUN] = prefetch_run
        namespace[PREFETCH_LOOP] = prefetch_loop
        # As locally: the session's traces hand unsaved values to later ones;
        # only saved values leave (the rest come back as not saved).
        scope = SessionScope(None, f"{filename}:{request.first_line}")
        enter_session(scope)
        try:
            exec(captured.code, namespace)
        finally:
            exit_session(scope)
        namespace.update(scope.leaving(namespace))
        return {name: namespace[name] for name in captured.stored if name in namespace}
    backend = _backend(model, request)
    tracer = Tracer(
        model, tuple(request.args), dict(request.kwargs), backend,
        has_input=bool(request.args or request.kwargs), keep_result=request.kind == "generate",
    )
    if request.tracer_name:
        namespace[request.tracer_name] = tracer
    run = TraceRun(
        model, captured, tracer, dict(namespace), namespace,
        (tuple(request.args), dict(request.kwargs)) if (request.args or request.kwargs) else None,
        backend, keep_graph=request.keep_graph,
    )
    values: dict[str, Any] = {}

    def receive(handed: dict[str, Any]) -> None:
        values.update(handed)
        if request.kind == "generate":
            values["__result__"] = run.output  # `tracer.result` after the block, on the client

    run.run_to_end(receive)  # as a local trace's: the same lifecycle
    values.pop(request.tracer_name or "", None)
    return values


def registered_filename(module: str) -> str:
    """The file name a registered module's source is compiled under."""
    return remote_filename(f"<registered module {module}>")


def _add_lines(filename: str, source: str) -> None:
    """Source lines for tracebacks (``capture.forget`` drops them with the request)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)


def _drop_gradients(served: Any) -> None:
    """Gradients a request left on the served weights do not reach the next one."""
    module = getattr(served, "_module", None)
    if isinstance(module, torch.nn.Module):
        for parameter in module.parameters():
            parameter.grad = None


def _backend(model: Any, request: Request) -> Any:
    if isinstance(model, LanguageModel):
        model.dispatch()  # the weights, if not loaded yet (a no-op once they are)
    if request.kind == "generate":
        if not isinstance(model, LanguageModel):
            raise UsageTypeError("this served model is not a language model; use kind 'trace'.")
        return GenerateBackend(dict(request.generate))
    return forward_backend


def _answer(values: dict[str, Any]) -> dict:
    out: dict[str, Any] = {}
    not_saved: list[str] = []
    for name, value in values.items():
        if isinstance(value, NotSaved):
            not_saved.append(name)
            continue
        carried = portable.carry(value, _not_saved_as_none)  # what cannot travel is left out
        if carried is not portable.DROP:
            out[name] = carried
    return {"values": out, "not_saved": not_saved}


def _not_saved_as_none(value: Any) -> Any:
    """An unsaved part of a container travels back as None."""
    return None if isinstance(value, NotSaved) else portable.DROP


def describe_error(error: BaseException, request: Request) -> dict:
    """What the client needs to re-raise ``error`` at the user's line."""
    filename = remote_filename(request.filename)
    line: int | None = None
    code = ""
    frames = traceback.extract_tb(error.__traceback__)
    user_frames = [f for f in frames if f.filename.startswith(REMOTE_PREFIX)]
    if user_frames:
        last = user_frames[-1]
        line, code = last.lineno, (last.line or "")
        filename = last.filename
    else:
        line = getattr(error, "lineno", None)  # SyntaxError, SandboxViolation
        if line is not None and request.first_line <= line:
            code = (request.source.splitlines() or [""])[min(line - request.first_line, len(request.source.splitlines()) - 1)].strip()
    shown = "".join(traceback.format_list(user_frames)).replace(REMOTE_PREFIX, "")
    return error_answer(type(error).__name__, str(error), module=type(error).__module__,
                        filename=filename[len(REMOTE_PREFIX):] if filename.startswith(REMOTE_PREFIX) else filename,
                        line=line, code=code, traceback=shown)
