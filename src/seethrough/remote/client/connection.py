"""Talk to a seethrough server: submit a request, follow it, fetch its result.

Only the standard library is used (``http.client``), so a client needs no
server dependencies.  The status of a request streams as server-sent events:
``status`` (queued with position, running), ``log`` (a line the body
printed, shown as it arrives), ``completed`` and ``error``.  Anything slower
than a second gets a one-line progress display on stderr (queued with its
position, running with the seconds so far, downloading).  ``job.cancel()``
cancels a request on the server (a running one's process is killed), and so
does Ctrl+C while a blocking remote trace or generate waits for its answer.

``RemoteJob`` is the handle of a submitted request; ``job(id)`` finds one
again later, also from another process (results stay readable only with the
API key that submitted them).  :func:`served_model` fetches the server's
description of a model it serves (config and tokenizer; no weights), which
``LanguageModel.from_server(name)`` builds its wrapper from.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ...config import CONFIG, cache_dir
from ...errors import SeethroughError
from ...tracing.saving import NotSaved
from .. import wire
from ..protocol import CONTENT_TYPE, ProtocolError
from ..refusal import SandboxViolation
from ..wire import WireError

MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_RESULT_BYTES = 1024 * 1024 * 1024
_DIGITS = re.compile(r"\d+")


class RemoteError(SeethroughError):
    """A remote request failed (on the server or on the way there)."""


class RemoteConnectionError(RemoteError, ConnectionError):
    """The server cannot be reached."""


class RemoteAuthError(RemoteError, PermissionError):
    """The server refused the API key."""


class RemoteRequestError(RemoteError, ValueError):
    """The server refused the request as malformed, too big, or unknown."""


class ModelNotServedError(RemoteRequestError, LookupError):
    """The server serves no model by the name asked for (the message lists what it serves)."""


class RemoteClient:
    """One seethrough server, addressed by URL, with an API key."""

    def __init__(self, host: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.host = (host or CONFIG.API.HOST).rstrip("/")
        if "://" not in self.host:
            self.host = "http://" + self.host
        parsed = urllib.parse.urlsplit(self.host)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RemoteRequestError(f"the server address {self.host!r} is not a URL like http://127.0.0.1:8470.")
        self._parsed = parsed
        self.api_key = api_key if api_key is not None else CONFIG.API.APIKEY
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------
    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parsed.scheme == "https" else http.client.HTTPConnection
        return cls(self._parsed.hostname, self._parsed.port, timeout=timeout or self.timeout)

    def _headers(self, extra: dict | None = None) -> dict:
        headers = {"User-Agent": "seethrough-client"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        headers.update(extra or {})
        return headers

    def _send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
              timeout: float | None = None) -> http.client.HTTPResponse:
        connection = self._connection(timeout)
        try:
            connection.request(method, path, body=body, headers=self._headers(headers))
            return connection.getresponse()
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            connection.close()
            raise RemoteConnectionError(
                f"cannot reach the seethrough server at {self.host} ({type(error).__name__}: {error}). "
                "Start one with `seethrough serve --model NAME=PATH`, or point the client at yours with "
                "SEETHROUGH_HOST / `seethrough.CONFIG.API.HOST` / `host=`."
            ) from None

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        response = self._send(method, path, body, headers)
        data = response.read()
        if response.status >= 400:
            raise http_error(response.status, data, self.host)
        return data

    def _json(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Any:
        return json.loads(self._call(method, path, body, headers) or b"null")

    # -- the API --------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")

    def model(self, name: str) -> dict:
        """The description of the model the server serves as ``name`` (any name it answers to)."""
        return self._json("GET", f"/v1/models/{urllib.parse.quote(name, safe='')}")

    def tokenizer_files(self, name: str) -> dict:
        return self._json("GET", f"/v1/models/{urllib.parse.quote(name, safe='/')}/tokenizer")

    def submit(self, payload: bytes) -> dict:
        return self._json("POST", "/v1/requests", payload, {"Content-Type": CONTENT_TYPE})

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/requests/{urllib.parse.quote(job_id)}")

    def result_bytes(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/requests/{urllib.parse.quote(job_id)}/result")

    def delete(self, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/requests/{urllib.parse.quote(job_id)}")

    def usage(self) -> dict:
        """What this key stores on the server (jobs, bytes) and the limits."""
        return self._json("GET", "/v1/usage")

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[tuple[str, dict]]:
        """Server-sent events of a request, from its start, until it ends."""
        response = self._send("GET", f"/v1/requests/{urllib.parse.quote(job_id)}/events",
                              headers={"Accept": "text/event-stream"}, timeout=timeout or 3600.0)
        if response.status >= 400:
            raise http_error(response.status, response.read(), self.host)
        event, data = "message", []
        try:
            while True:
                raw = response.readline()
                if not raw:
                    return
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield event, json.loads("\n".join(data))
                        if event in ("completed", "error"):
                            return
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
        finally:
            response.close()


def http_error(status: int, data: bytes, host: str) -> RemoteError:
    """The error the client raises for a server's HTTP refusal ``status`` with body ``data``."""
    try:
        detail = json.loads(data).get("detail", data.decode("utf-8", "replace"))
    except (ValueError, AttributeError):
        detail = data.decode("utf-8", "replace")[:500]
    if isinstance(detail, dict):
        detail = detail.get("message", json.dumps(detail))
    if status == 401:
        error: RemoteError = RemoteAuthError(f"the server at {host} needs an API key: {detail} Set SEETHROUGH_API_KEY "
                                             "or `seethrough.CONFIG.API.APIKEY`.")
    elif status == 403:
        error = RemoteAuthError(f"the server at {host} refused the API key: {detail}")
    elif status < 500:
        error = RemoteRequestError(f"the server at {host} refused the request ({status}): {detail}")
    else:
        error = RemoteError(f"the server at {host} failed ({status}): {detail}")
    error.status = status  # the HTTP status, for callers that act on it
    return error


class _Progress:
    """A one-line status display on stderr, only for requests slower than a second.

    The state (queued, running, downloading) is shown once the request passes a
    second, also when nothing new arrives from the server: on a terminal the
    line is redrawn each second with the time so far; elsewhere (a log file) a
    line is written when the state changes, and for a new position or
    generation step at most every ``_QUIET_S`` seconds."""

    _QUIET_S = 10.0

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and CONFIG.APP.PROGRESS
        self.started = time.monotonic()
        self.shown = False
        self.text = ""
        self.last = ""
        self._written = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.enabled:
            self._ticker = threading.Thread(target=self._tick, name="seethrough-progress", daemon=True)
            self._ticker.start()

    def update(self, text: str) -> None:
        with self._lock:
            self.text = text
            self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.started
        if not self.enabled or not self.text or elapsed < 1.0 or self._stop.is_set():
            return
        tty = sys.stderr.isatty()
        if not tty and (self.text == self.last or (_DIGITS.sub("", self.text) == _DIGITS.sub("", self.last)
                                                   and time.monotonic() - self._written < self._QUIET_S)):
            return
        self.last, self._written = self.text, time.monotonic()
        line = f"seethrough remote: {self.text} ({elapsed:.0f} s)"
        sys.stderr.write("\r" + line.ljust(70) if tty else line + "\n")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        """Take the line off the terminal (a printed line follows); it comes back at the next tick."""
        with self._lock:
            if self.shown and sys.stderr.isatty():
                sys.stderr.write("\r" + " " * 80 + "\r")
                sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        self.clear()


class RemoteJob:
    """A submitted remote request."""

    def __init__(self, client: RemoteClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"<RemoteJob {self.id} at {self.client.host}>"

    def status(self) -> str:
        """'queued', 'running', 'completed' or 'error'."""
        return self.client.status(self.id)["status"]

    def wait(self, show: bool = True) -> dict:
        """Follow the request to its end (printing what the body prints); return its answer."""
        progress = _Progress(show)
        try:
            for event, data in self.client.events(self.id):
                if event == "log":
                    progress.clear()
                    if CONFIG.APP.REMOTE_LOGGING:
                        print(data.get("text", ""), flush=True)
                elif event == "status":
                    state = data.get("status", "")
                    if state == "queued":
                        progress.update(f"queued (position {data.get('position', '?')})")
                    elif state == "running" and isinstance(data.get("step"), int):
                        progress.update(f"running, step {data['step']}")
                    else:
                        progress.update(state)
                elif event == "error":
                    raise rebuild_error(data)
                elif event == "completed":
                    break
            progress.update("downloading")
            answer = wire.unpack(self.client.result_bytes(self.id), max_bytes=MAX_RESULT_BYTES)
        finally:
            progress.close()
        if "error" in answer:
            raise rebuild_error(answer["error"])
        return answer

    def delete(self) -> None:
        """Forget the request on the server (frees this key's storage quota there); a
        queued or running one is cancelled (see :meth:`cancel`)."""
        self.client.delete(self.id)

    def cancel(self) -> bool:
        """Cancel the request on the server: a queued one leaves the queue, a running one's
        process is killed and its worker serves the next request.  Its result is
        forgotten either way; True if it was still queued or running."""
        return bool(self.client.delete(self.id).get("cancelled"))

    def result(self) -> dict:
        """The saved values of the finished request, by name (waits if needed)."""
        answer = self.wait(show=False)
        values = dict(answer.get("values", {}))
        for name in answer.get("not_saved", []):
            values[name] = NotSaved(name, f"(remote request {self.id})")
        return values


def job(job_id: str, host: str | None = None, api_key: str | None = None) -> RemoteJob:
    """The handle of a request submitted earlier (e.g. with ``blocking=False``)."""
    return RemoteJob(RemoteClient(host, api_key), job_id)


@dataclass(frozen=True)
class ServedModel:
    """A model a server serves, as the client knows it: enough to build its
    module tree here (config and tokenizer files in ``folder``), no weights."""

    name: str  # the name the server answered to
    folder: Path  # config.json and tokenizer files, in the seethrough cache
    host: str | None = None  # the server asked (None: CONFIG's, read at each request)


def served_model(name: str, host: str | None = None, api_key: str | None = None) -> ServedModel:
    """The server's description of the model it serves as ``name``; a
    :class:`ModelNotServedError` listing what it serves if it has no such model."""
    return ServedModel(name, served_model_folder(name, host, api_key), host)


def served_model_folder(name: str, host: str | None = None, api_key: str | None = None) -> Path:
    """A local folder with the served model's config and tokenizer files (no weights)."""
    client = RemoteClient(host, api_key)
    try:
        entry = client.model(name)
    except RemoteRequestError as error:
        if getattr(error, "status", None) != 404:
            raise
        served = ", ".join(repr(str(e.get("name"))) for e in client.models() if isinstance(e, dict)) or "none"
        raise ModelNotServedError(f"the server at {client.host} does not serve a model named {name!r}; it serves: "
                                  f"{served}. Use one of these names (or pass `remote_name=` with a local model)."
                                  ) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise RemoteRequestError(f"the server at {client.host} described {name!r} without a config; is it a "
                                 "seethrough server of the same version?")
    files = client.tokenizer_files(name)
    folder = cache_dir() / "remote-models" / hashlib.sha256(f"{client.host}\n{name}".encode()).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(entry["config"]), encoding="utf-8")
    for relative, text in (files.get("files") or {}).items():
        _write_inside(folder, relative, str(text).encode("utf-8"))
    for relative, data in (files.get("binary_files") or {}).items():
        _write_inside(folder, relative, base64.b64decode(str(data)))
    return folder


def _write_inside(folder: Path, relative: str, data: bytes) -> None:
    path = PurePosixPath(str(relative))
    if path.is_absolute() or not path.parts or any(part in ("", ".", "..") for part in path.parts):
        raise RemoteError(f"the server sent a tokenizer file with an unsafe name {relative!r}")
    target = folder.joinpath(*path.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def rebuild_error(data: dict) -> BaseException:
    """The exception a remote error stands for, with the user's line in its message."""
    name = str(data.get("type", "RemoteError"))
    message = str(data.get("message", ""))
    where = ""
    if data.get("line"):
        code = f": `{data['code']}`" if data.get("code") else ""
        where = f"\n  (remote run, at {data.get('filename', '?')}:{data['line']}{code})"
    shown = data.get("traceback") or ""
    text = f"{message}{where}" + (f"\nRemote traceback (most recent call last):\n{shown}" if shown else "")
    cls = _exception_class(name, str(data.get("module", "")))
    try:
        return cls(text)
    except TypeError:
        return RemoteError(f"{name}: {text}")


def _exception_class(name: str, module: str) -> type[BaseException]:
    """The class a remote error names: a builtin, else one of seethrough's own
    errors (all subclass :class:`SeethroughError`, whichever layer defines
    them), else a :class:`RemoteError` subclass of that name."""
    candidate = getattr(builtins, name, None)
    if isinstance(candidate, type) and issubclass(candidate, Exception):
        return candidate
    if _is_ours(module):
        found = _seethrough_errors(name)
        exact = [cls for cls in found if cls.__module__ == module]
        if exact or len(found) == 1:  # a class that moved between versions is still found by its name
            return (exact or found)[0]
    return type(name, (RemoteError,), {"__module__": "seethrough.remote"})


# The errors of what client and server both speak, which a server's answer may
# name: imported here so that :func:`rebuild_error` finds their classes.
SPOKEN_ERRORS = (ProtocolError, SandboxViolation, WireError)


def _seethrough_errors(name: str) -> list[type[SeethroughError]]:
    """The error classes named ``name`` that seethrough's loaded modules define
    (the package root loads every module whose errors reach a client).  A
    class counts only where its module has it under that name: not a user's
    subclass, nor a stand-in class this module made for an unknown remote error."""
    found, stack, seen = [], [SeethroughError], set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        home = sys.modules.get(cls.__module__)
        if cls.__name__ == name and _is_ours(cls.__module__) and getattr(home, name, None) is cls:
            found.append(cls)
    return found


def _is_ours(module: str) -> bool:
    return module == "seethrough" or module.startswith("seethrough.")
