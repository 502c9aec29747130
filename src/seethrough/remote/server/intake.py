"""Checks on a submitted request body, before anything is queued.

:func:`check_request` does, in order, everything that can refuse a request
without running it — decode the wire frame (size caps, zip bombs, malformed
tensors), check its shape and protocol version, find the model, and validate
the body, each helper function and each registered module against the sandbox — and raises
:class:`IntakeError` with the HTTP status and a message that says what was
wrong and how to fix it.  Nothing here runs user code.
"""

from __future__ import annotations

from typing import Any

from ..._version import __version__
from . import sandbox
from .. import wire
from .modules import ModuleRules, validate_module
from ..protocol import PROTOCOL, ProtocolError, Request, VersionMismatchError, parse_request

__all__ = ["IntakeError", "check_request"]


class IntakeError(Exception):
    """A request refused before queueing: an HTTP status and a message."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after  # seconds, for a 429 or 503 the client should retry after


def check_request(body: bytes, *, max_bytes: int, max_unpacked_bytes: int, max_source_bytes: int,
                  models: dict[str, dict | None], aliases: dict[str, str] | None = None) -> Request:
    """The checked request in ``body``; raises :class:`IntakeError` (400, 404 or 413).

    ``models`` maps each served model's name to its description (its
    ``modules`` list is used to check the module paths the request names);
    ``aliases`` maps every other name a model answers to (a repo id, a folder)
    to its served name, which the returned request's ``model`` then holds.
    The request's tensors are never materialised here: they come back as
    ``meta`` tensors (dtype and shape only), so checking a request costs
    memory bounded by the caps on its structure, whatever its tensors weigh.
    """
    value = _decode(body, max_bytes, max_unpacked_bytes)
    try:
        request = parse_request(value, PROTOCOL, __version__)
    except VersionMismatchError as error:
        raise IntakeError(400, f"client and server versions do not match: {error}") from None
    except ProtocolError as error:
        raise IntakeError(400, f"the request is malformed: {error}") from None
    request.model = (aliases or {}).get(request.model, request.model)
    if request.model not in models:
        served = ", ".join(repr(name) for name in sorted(models)) or "none"
        raise IntakeError(404, f"this server does not serve a model named {request.model!r}; it serves: {served}. "
                               "Load the model by one of these names (GET /v1/models lists them).")
    _check_source_size(request, max_source_bytes)
    _validate_code(request)
    _check_envoys(request, models[request.model])
    return request


def _decode(body: bytes, max_bytes: int, max_unpacked_bytes: int) -> Any:
    if not body:
        raise IntakeError(400, "the request body is empty; send the wire-encoded request made by the seethrough "
                               "client (Content-Type: application/x-seethrough)")
    try:
        return wire.inspect(body, max_bytes=max_bytes, max_unpacked_bytes=max_unpacked_bytes)
    except wire.WireSizeError as error:
        raise IntakeError(413, f"the request is too large: {error}. Send smaller tensors (or fewer), or ask the "
                               "server's operator to raise --max-request-bytes / --max-unpacked-bytes.") from None
    except wire.WireVersionError as error:
        raise IntakeError(400, f"client and server versions do not match: {error}") from None
    except wire.WireError as error:
        raise IntakeError(400, f"the request body is not a valid seethrough request: {error}") from None
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as error:
        raise IntakeError(400, f"the request body cannot be read ({type(error).__name__}: {error}); send the "
                               "request made by the seethrough client") from None


def _check_source_size(request: Request, limit: int) -> None:
    """Code is parsed and compiled at several times its size: cap it before any of that."""
    sizes = {"the trace body": len(request.source.encode("utf-8", "replace"))}
    sizes.update({f"the helper function `{name}`": len(source.encode("utf-8", "replace"))
                  for name, source in request.functions.items()})
    sizes.update({f"the registered module `{name}`": len(entry["source"].encode("utf-8", "replace"))
                  for name, entry in request.packages.items()})
    total = sum(sizes.values())
    if total > limit:
        largest = max(sizes, key=sizes.get)
        raise IntakeError(413, f"the request's code is {total:,} bytes (largest: {largest}, {sizes[largest]:,} bytes), "
                               f"over this server's limit of {limit:,} bytes; move data into tensors or variables "
                               "instead of source text, or ask the operator to raise --max-source-bytes.")


def _validate_code(request: Request) -> None:
    padded = "\n" * (request.first_line - 1) + request.source
    _validate(padded, request.filename, "the trace body")
    for name, source in request.functions.items():
        _validate(source, f"{request.filename}:{name}", f"the helper function `{name}`")
    importable = frozenset(request.packages)
    for name, entry in request.packages.items():
        rules = ModuleRules(name, entry["package"], importable)
        _validate(entry["source"], f"<registered module {name}>", f"the registered module `{name}`",
                  lambda source, filename, rules=rules: validate_module(source, filename, rules))


def _validate(source: str, filename: str, what: str, check: Any = None) -> None:
    try:
        (check or sandbox.validate)(source, filename)
    except sandbox.SandboxViolation as error:
        raise IntakeError(400, f"{what} was refused by the server's sandbox: {error}") from None
    except (RecursionError, MemoryError, ValueError) as error:
        raise IntakeError(400, f"{what} cannot be checked ({type(error).__name__}: {error}); simplify it") from None


def _check_envoys(request: Request, info: dict | None) -> None:
    modules = set((info or {}).get("modules") or ())
    if not modules:
        return
    for name, path in request.envoys.items():
        if path and path not in modules:
            raise IntakeError(400, f"`{name}` names the module path {path!r}, which the served model "
                                   f"{request.model!r} does not have; use a module of this model (GET /v1/models "
                                   "lists its paths)")
