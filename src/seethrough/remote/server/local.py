"""``remote="local"``: the whole remote path in this process, with no server.

``with model.trace(x, remote="local"):`` (also ``generate`` and ``session``)
checks a body before it is submitted to a server, by doing here what the
client and a server would do, step by step:

1. the client builds the request (:mod:`seethrough.remote.client.collect`:
   source, variables, helper functions) and encodes it on the wire
   (:mod:`seethrough.remote.wire`);
2. the server's intake decodes and checks it — size caps, protocol, module
   paths, and the sandbox's static rules for the body and every helper
   (:func:`.intake.check_request`, the function the server itself calls);
3. the worker runs it with :func:`.execute.execute` (the sandbox's restricted
   namespace, a per-request copy of the wrapper, the RNG restored) on a plain
   wrapper of the same module — no ``rename=``, custom envoys or edits of the
   user's wrapper, which a server does not have either — and checks
   afterwards that the model is unchanged (:class:`.guard.ModelGuard`);
4. the answer is encoded, decoded, and errors are rebuilt as the client
   rebuilds a server's (:func:`seethrough.remote.client.rebuild_error`).

So a valid body gives the values ``remote=False`` gives (they travelled the
wire), and a body a server would refuse fails with the same error.  What
differs from a real server: no worker process, time or memory limit, and the
weights are the user's own (not read-only memory), so a body that writes to
weights changes them here as a local trace would; the check reports it.

:func:`run_local` is the server's one entry point for this, named by
:data:`seethrough.remote.protocol.LOCAL_SERVER`: the client loads it by that
name when a body runs with ``remote="local"`` and imports nothing else of the
server.
"""

from __future__ import annotations

import json
import sys
import weakref
from typing import Any

from ..._version import __version__
from ...config import CONFIG
from .. import wire
from ..client.connection import MAX_REQUEST_BYTES, MAX_RESULT_BYTES, http_error, rebuild_error
from .execute import execute
from ...models import LanguageModel, Model
from ..protocol import PROTOCOL, Request, error_answer, parse_request
from .guard import ModelGuard
from .intake import IntakeError, check_request
from .settings import Settings

LOCAL_HOST = "remote='local' (this process)"
# The plain wrapper each user's model is checked on (`served_copy`), while the model lives.
_SERVED: "weakref.WeakKeyDictionary[Model, Model]" = weakref.WeakKeyDictionary()
_LIMITS = Settings(models=())  # the server's default size caps


def run_local(request: Request, model: Any) -> dict:
    """The answer a server would send for ``request`` on ``model``'s module
    (``{"values": ..., "not_saved": ...}``); raises what the client would raise."""
    payload = wire.pack(request.to_wire(), max_bytes=MAX_REQUEST_BYTES)
    served = served_copy(model)
    module = served._module
    info = {"modules": [path for path, _ in module.named_modules() if path]}
    try:
        check_request(payload, max_bytes=_LIMITS.max_request_bytes, max_unpacked_bytes=_LIMITS.max_unpacked_bytes,
                      max_source_bytes=_LIMITS.max_source_bytes, models={request.model: info})
    except IntakeError as error:
        # What the client raises for the server's refusal (HTTP status and all).
        raise http_error(error.status, json.dumps({"detail": error.detail}).encode(), LOCAL_HOST) from None
    # The worker's side: decode the request again, tensors and all.
    checked = parse_request(
        wire.unpack(payload, max_bytes=_LIMITS.max_request_bytes, max_unpacked_bytes=_LIMITS.max_unpacked_bytes),
        PROTOCOL, __version__,
    )
    answer = _execute_guarded(checked, served)
    try:
        packed = wire.pack(answer, max_bytes=_LIMITS.max_result_bytes)
    except wire.WireError as failure:
        packed = wire.pack({"error": error_answer(
            type(failure).__name__, f"the request ran, but its result cannot be sent back: {failure}",
            module="seethrough.remote.wire")},
                           max_bytes=_LIMITS.max_result_bytes)
    answer = wire.unpack(packed, max_bytes=MAX_RESULT_BYTES)
    if "error" in answer:
        raise rebuild_error(answer["error"])
    return answer


def _execute_guarded(request: Request, served: Any) -> dict:
    """Run the request as a worker does, with the model checked afterwards."""
    module = served._module
    guard = ModelGuard(module, getattr(served, "tokenizer", None))
    # The guard drops gradients a request leaves on parameters (as a worker
    # must); here they are the user's, so put back those from before.
    grads = [(parameter, parameter.grad) for parameter in module.parameters()]
    try:
        answer = execute(request, served, print_function=_print)
        problems = guard.check()
    finally:
        for parameter, grad in grads:
            parameter.grad = grad
    if problems:
        return {"error": error_answer(
            "WeightsModifiedError",
            f"this request changed the model, so a server would discard its results: {'; '.join(problems)}. "
            "Edit activations inside the trace (`.output`, `.input`, `.skip()`) instead; the served model's "
            "weights, modules and config must stay as they are.",
            module="seethrough.errors",
        )}
    return answer


def served_copy(model: Any) -> Any:
    """A plain wrapper of ``model``'s module, as a server would serve it: the
    library's own wrapper class, standard names only, no edits (cached)."""
    if isinstance(model, LanguageModel):
        model.dispatch()  # the weights if not loaded yet: a clear error where they exist only on a server
    module = model._module
    cached = _SERVED.get(model)
    if cached is not None and cached._module is module:
        return cached
    if isinstance(model, LanguageModel):
        served: Model = LanguageModel(module, tokenizer=model.tokenizer) if model.tokenizer is not None \
            else LanguageModel(module)
    else:
        served = Model(module)
    _SERVED[model] = served
    return served


def _print(*values: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush: bool = False) -> None:
    """``print`` of the body: what the client shows of a server's log lines."""
    text = (" " if sep is None else str(sep)).join(str(value) for value in values) + ("\n" if end is None else str(end))
    if CONFIG.APP.REMOTE_LOGGING:
        sys.stdout.write(text)
        sys.stdout.flush()



