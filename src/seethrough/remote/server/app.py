"""The HTTP API (FastAPI): endpoints, authentication, size and type checks.

Endpoints (all JSON unless noted; errors are ``{"detail": message}``):

* ``POST /v1/requests`` — body: a wire frame (``Content-Type:
  application/x-seethrough``); checked (:mod:`.intake`) and queued → 202
  ``{"id", "status": "queued", "position"}``.
* ``GET /v1/requests/{id}`` — ``{"id", "status", "position"?, "error"?, ...}``.
* ``GET /v1/requests/{id}/events`` — server-sent events, replayed from the
  start: ``status``, ``log``, then one ``completed`` or ``error``.
* ``GET /v1/requests/{id}/result`` — the wire-packed answer (409 until done).
* ``DELETE /v1/requests/{id}`` — cancel or forget a request: a queued one
  leaves the queue, a running one has its request process killed, a finished
  one's result is removed; the key's quota is freed at once.
* ``GET /v1/usage`` — what the caller's key stores (jobs, bytes) and its limits.
* ``GET /v1/models`` — each model's name, public aliases, architectures,
  config, module paths and ``repr``; ``GET /v1/models/{name}`` — one of them,
  by any name it answers to (:mod:`.naming`); ``GET /v1/models/{name}/tokenizer``
  — its tokenizer files.
* ``GET /v1/health`` — status, versions, each model's workers, and request
  counts (no key needed; no request ids).
* ``/docs`` and ``/openapi.json`` — FastAPI's interactive documentation.

Submitted bodies are streamed to disk as they arrive (:mod:`.uploads`), then
checked in separate processes (:mod:`.checkers`, fairly between keys), never
on the event loop; bodies and results wait on disk (:mod:`.jobs`), under
per-key quotas.  Every 429 and 503 carries ``Retry-After``.

Every endpoint but health and the docs needs the ``X-API-Key`` header when
the server has keys (401 without it, 403 for an unknown key); a request's
status, events and result are readable only with the key that submitted it
(with another key, its id answers 404 exactly as an id that does not exist).
On a server without keys the quotas belong to the caller's address (an IPv6
address's /64 network), never to a header the caller chooses.  No answer
names a path on the server (:mod:`.disclosure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import multiprocessing
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..._version import __version__
from ..protocol import CONTENT_TYPE, PROTOCOL
from .checkers import CheckerPool, CheckLimits
from .intake import IntakeError
from .jobs import Job, QuotaExceeded
from .scheduler import QueueFull
from .service import ServerRuntime
from .uploads import ClientGone, UploadGate, receive_body

__all__ = ["create_app"]

logger = logging.getLogger("seethrough.server")

_KEEPALIVE_SECONDS = 15.0
_EXPIRY_INTERVAL = 30.0


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def address_owner(host: str | None) -> str:
    """The quota owner of a caller on a server without keys: its address (an IPv6 one's /64)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return f"address:{host or '?'}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"address:{address.ipv4_mapped}"
        return f"address:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address:{address}"


def create_app(runtime: ServerRuntime) -> FastAPI:
    """The FastAPI application serving ``runtime`` (its workers already started)."""
    settings = runtime.settings
    store = runtime.store
    allowed = frozenset(_digest(key) for key in settings.api_keys) if settings.api_keys is not None else None
    checkers = CheckerPool(
        multiprocessing.get_context(settings.start_method),
        CheckLimits(max_bytes=settings.max_request_bytes, max_unpacked_bytes=settings.max_unpacked_bytes,
                    max_source_bytes=settings.max_source_bytes, memory=settings.check_memory),
        size=settings.check_workers, timeout=settings.check_timeout,
        max_running_per_key=settings.max_checks_per_key, max_waiting_per_key=settings.max_waiting_checks_per_key)
    uploads = UploadGate(settings.max_uploads_per_key, settings.max_stored_bytes_per_key, store.stored)

    def module_paths() -> dict[str, list[str]]:
        return {name: list((service.info or {}).get("modules") or ()) for name, service in runtime.services.items()}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def expire() -> None:
            while True:
                await asyncio.sleep(min(_EXPIRY_INTERVAL, max(settings.job_ttl / 4, 0.5)))
                removed = store.expire()
                if removed:
                    logger.debug("forgot %d finished requests", removed)

        await asyncio.get_running_loop().run_in_executor(None, checkers.start)
        task = asyncio.create_task(expire())
        try:
            yield
        finally:
            task.cancel()
            checkers.stop()

    app = FastAPI(
        title="seethrough server",
        version=__version__,
        description="Runs seethrough trace bodies (model.trace(..., remote=True)) next to the served models.",
        lifespan=lifespan,
    )

    def owner(request: Request, x_api_key: str | None = Header(default=None, alias="X-API-Key")) -> str:
        """The digest of the caller's key; on an open server, its address (never a header's value)."""
        if allowed is None:
            return address_owner(request.client.host if request.client else None)
        if not x_api_key:
            raise HTTPException(401, "this server needs an API key: send it in the X-API-Key header (the seethrough "
                                     "client sends SEETHROUGH_API_KEY / seethrough.CONFIG.API.APIKEY / api_key=).")
        digest = _digest(x_api_key)
        if digest not in allowed:
            raise HTTPException(403, "this API key is not accepted by this server; check the key, or ask the "
                                     "server's operator for one.")
        return digest

    def find(job_id: str, caller: str | None) -> Job:
        job = store.get(job_id)
        if job is None or (allowed is not None and job.owner != caller):  # another key's: as if there were none
            raise HTTPException(404, f"no request with id {job_id!r} on this server: the id is wrong, the request was "
                                     f"deleted or cancelled, or it finished more than {settings.job_ttl:g} s ago and "
                                     "was forgotten.")
        return job

    @app.post("/v1/requests", status_code=202, summary="Submit a request (a wire-encoded trace body)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  CONTENT_TYPE: {"schema": {"type": "string", "format": "binary",
                                            "description": "a seethrough wire frame (seethrough.remote.wire)"}}}}})
    async def submit(request: Request, caller: str | None = Depends(owner)) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != CONTENT_TYPE:
            raise HTTPException(415, f"requests must be sent as {CONTENT_TYPE} (the seethrough wire format), not "
                                     f"{content_type or 'a body without a Content-Type'}; use the seethrough client.")
        fairness = caller or f"address:{request.client.host if request.client else '?'}"
        with uploads.open(fairness, caller) as upload:
            try:
                path, _ = await receive_body(request, upload, store.spool, limit=settings.max_request_bytes,
                                             body_timeout=settings.body_timeout,
                                             upload_timeout=settings.upload_timeout)
            except ClientGone:
                return JSONResponse({"detail": "the client disconnected before its body was complete"},
                                    status_code=400, headers={"Connection": "close"})
            try:
                try:
                    checked = await checkers.check(path, module_paths(), runtime.names.aliases, key=fairness)
                except IntakeError as error:  # about the caller's own request (its file name, its code): not scrubbed
                    headers = {"Retry-After": f"{error.retry_after:.0f}"} if error.retry_after else None
                    return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)
                service = runtime.services.get(checked.model)
                if service is None:  # a checker answered with a name it was not given: trust nothing
                    raise HTTPException(400, "the request names no model this server serves")
                try:
                    job = store.create(caller, checked.model, checked.filename, path)
                except QuotaExceeded as error:
                    raise HTTPException(429, str(error), headers={"Retry-After": "10"}) from None
            finally:
                path.unlink(missing_ok=True)
        try:
            position = service.submit(job, caller)
        except QueueFull as error:
            store.discard(job)
            raise HTTPException(429, f"{error}; wait for your earlier requests to finish, then submit again.",
                                headers={"Retry-After": "5"}) from None
        return JSONResponse({"id": job.id, "status": "queued", "position": position}, status_code=202)

    @app.get("/v1/requests/{job_id}", summary="A request's status")
    async def status(job_id: str, caller: str | None = Depends(owner)) -> dict:
        return find(job_id, caller).public()

    @app.get("/v1/requests/{job_id}/events", summary="A request's events (server-sent events, from the start)")
    async def events(job_id: str, caller: str | None = Depends(owner)) -> StreamingResponse:
        job = find(job_id, caller)
        return StreamingResponse(_event_stream(store, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/requests/{job_id}/result", summary="A finished request's answer (wire-encoded)",
             response_class=Response)
    async def result(job_id: str, caller: str | None = Depends(owner)) -> FileResponse:
        job = find(job_id, caller)
        if job.result_size is None:
            raise HTTPException(409, f"request {job_id} is {job.status}, not finished; follow "
                                     f"/v1/requests/{job_id}/events and fetch the result once it completes.")
        return FileResponse(job.result_path, media_type=CONTENT_TYPE)

    @app.delete("/v1/requests/{job_id}", summary="Cancel a queued or running request, or forget a finished one")
    async def delete(job_id: str, caller: str | None = Depends(owner)) -> dict:
        job = find(job_id, caller)
        was = runtime.cancel(job)
        if was is None:  # forgotten between the lookup and now
            find(job_id, caller)
        return {"id": job_id, "deleted": True, "cancelled": was in ("queued", "running")}

    @app.get("/v1/usage", summary="What the caller's API key stores on the server, and its limits")
    async def usage(caller: str | None = Depends(owner)) -> dict:
        return store.usage(caller)

    described: dict[str, dict] = {}  # each model's description and tokenizer files, scrubbed once

    def public_name(name: str) -> str:
        others = [alias for alias in runtime.names.public.get(name, []) if alias != name]
        return others[0] if others else name

    def describe(name: str) -> dict:
        if name not in described:
            info = runtime.services[name].info or {"name": name}
            described[name] = {**runtime.disclosure.model({key: value for key, value in info.items()
                                                            if key != "tokenizer"}, public_name(name)),
                               "aliases": runtime.names.public.get(name, [name])}
        return described[name]

    def tokenizer_files(name: str) -> dict:
        key = f"{name}\ntokenizer"
        if key not in described:
            files = (runtime.services[name].info or {}).get("tokenizer") or {"files": {}, "binary_files": {}}
            described[key] = runtime.disclosure.tokenizer(files, public_name(name))
        return described[key]

    def served(name: str) -> str:
        """The served name ``name`` stands for (its own, a repo id or a folder); 404 if none."""
        canonical = runtime.names.resolve(name)
        if canonical is None:
            known = ", ".join(repr(known) for known in sorted(runtime.services))
            raise HTTPException(404, f"this server does not serve a model named {name!r}; it serves: {known}. Use "
                                     "one of these names, or its repo id (GET /v1/models lists both).")
        return canonical

    @app.get("/v1/models", summary="The served models: configs, module paths, printed structure, names")
    async def models(caller: str | None = Depends(owner)) -> list[dict]:
        return [describe(name) for name in runtime.services]

    @app.get("/v1/models/{name:path}/tokenizer", summary="A served model's tokenizer files")
    async def tokenizer(name: str, caller: str | None = Depends(owner)) -> dict:
        return tokenizer_files(served(name))

    @app.get("/v1/models/{name:path}", summary="One served model, by its served name, repo id or folder")
    async def model(name: str, caller: str | None = Depends(owner)) -> dict:
        return describe(served(name))

    @app.get("/v1/health", summary="Liveness, versions and the state of each model's workers")
    async def health() -> dict:
        models_state = runtime.health()
        ok = all(state["state"] != "failed" for state in models_state.values())
        return {"status": "ok" if ok else "degraded", "version": __version__, "protocol": PROTOCOL,
                "models": models_state, "requests": store.counts()}

    @app.exception_handler(HTTPException)
    async def refused(request: Request, error: HTTPException) -> JSONResponse:
        """Every refusal, with no server path in it (a name the caller sent may be echoed)."""
        detail = runtime.disclosure.scrub(error.detail) if isinstance(error.detail, str) else error.detail
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal server error ({type(error).__name__}); the server's log has the "
                                       "details. Please report it."}, status_code=500)

    return app


def _sse(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _event_stream(store: Any, job: Job) -> AsyncIterator[str]:
    index = 0
    while True:
        batch, finished = store.snapshot(job, index)
        if batch:
            index += len(batch)
            yield "".join(_sse(name, data) for name, data in batch)
            continue
        if finished:
            return
        waiter = store.wait_handle(job, index)
        if waiter is None:
            continue
        try:
            await asyncio.wait_for(waiter.wait(), _KEEPALIVE_SECONDS)
        except asyncio.TimeoutError:
            yield ": keep-alive\n\n"
        finally:
            store.forget_handle(job, waiter)
