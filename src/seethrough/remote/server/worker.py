"""The worker process: one loaded model; each request in a process of its own.

Started by the API process (``multiprocessing``) with :func:`run_worker`.
It loads its model once (``LanguageModel(source, dispatch=True)``), makes
the CPU weights read-only, warms the model up and fingerprints it
(:mod:`.guard`), walls itself off from the host (:mod:`.isolation`:
network and mount namespaces, a minimal environment, its own uid, limits)
and sends ``ready`` with the model's description and what is isolated.
Then, for each ``run`` message, one of two request models
(``--request-process``):

* ``fork`` (the default for CPU models): :class:`~.forking.RequestForker`
  forks a request process from this loaded, read-only one (copy-on-write,
  no reload) which runs the request and dies; whatever the body changed
  dies with it.  The wall-clock limit kills only that process (``timeout``
  message), as does a crash (``crashed``); this worker lives on.
* ``reuse`` (CUDA models, where ``fork`` is impossible): the request runs
  here; afterwards the model (:class:`~.guard.ModelGuard`) and everything
  else a body could reach (:class:`~.fingerprint.StateFingerprint`) are
  compared with their state at start-up, and on any change the answer
  becomes an error and the worker asks to be replaced.  The API process
  enforces the wall-clock limit by killing this process.

Running a request: unpack the wire bytes and check them (:mod:`..protocol`);
:func:`~seethrough.remote.server.execute.execute` it, with ``print`` (and
``sys.stdout``) streaming each printed line to the API process as it is
printed (capped per request in lines and bytes); check the model against
its fingerprint; send the wire-packed answer back.  A request that
allocates past the memory limit (``RLIMIT_AS``: the size of the process
plus the per-request budget) gets a ``MemoryError`` as its answer.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import resource
import signal
import tempfile
import threading
import time
from dataclasses import make_dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Callable

from ..._version import __version__
from ..protocol import error_answer
from . import framing, isolation
from .fingerprint import StateFingerprint
from .forking import RequestForker, address_space, limit_address_space
from .settings import OPTIONS, REQUEST_PROCESSES, Settings, SettingsError
from .steps import StepReporter

__all__ = ["LogStream", "WorkerOptions", "describe_model", "load_kwargs", "run_worker"]

logger = logging.getLogger("seethrough.server.worker")

_MAX_LINE_CHARS = 16_384  # one printed line; longer ones are cut
_MAX_PENDING_CHARS = 65_536  # text printed without a newline is sent once this long
_MAX_ERROR_FIELD = 16_000


# What a worker needs to know, sent from the API process at spawn: which model,
# and the settings marked ``worker`` in the options table (one home: .settings).
WorkerOptions = make_dataclass(
    "WorkerOptions",
    [("name", str), ("source", str)]
    + [(o.field, Settings.__annotations__[o.field], dc_field(default=o.default)) for o in OPTIONS if o.worker]
    + [("device_map", "str | None", dc_field(default=None))],  # e.g. "auto" for a Ray worker given several GPUs
    frozen=True,
)
WorkerOptions.__module__ = __name__  # where pickle (sending it to a worker) finds it


class LogStream:
    """``print`` and ``sys.stdout`` of a running request: each line goes to the API process at once."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, conn: Any, max_lines: int, max_bytes: int) -> None:
        self._conn = conn
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._pending = ""
        self.lines = 0
        self.bytes = 0
        self.truncated = False

    # the file-like side (sys.stdout while a request runs)
    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.truncated:
            return len(text)
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self._emit(line)
        if len(self._pending) > _MAX_PENDING_CHARS:
            line, self._pending = self._pending, ""
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        """Nothing to do: whole lines are sent as soon as they are written."""

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def finish(self) -> None:
        """Send the text printed without a final newline."""
        if self._pending and not self.truncated:
            line, self._pending = self._pending, ""
            self._emit(line)
        self._pending = ""

    # the builtin `print` of remote bodies
    def print(self, *values: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
              flush: bool = False) -> None:
        sep = " " if sep is None else sep
        end = "\n" if end is None else end
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("print(): sep and end must be None or strings")
        self.write(sep.join(str(value) for value in values) + end)

    def _emit(self, line: str) -> None:
        if len(line) > _MAX_LINE_CHARS:
            line = line[:_MAX_LINE_CHARS] + f" [... line cut at {_MAX_LINE_CHARS:,} characters]"
        size = len(line.encode("utf-8", "replace")) + 1
        if self.lines >= self._max_lines or self.bytes + size > self._max_bytes:
            self.truncated = True
            line = framing.log_cut_notice(self._max_lines, self._max_bytes)
        self.lines += 1
        self.bytes += size
        self._conn.send_bytes(framing.encode("log", text=line))


# -- the model's description ----------------------------------------------------------------


def describe_model(name: str, model: Any) -> dict:
    """What ``/v1/models`` shows: enough for a client to build the model without weights
    (not where the server loaded it from: that is the operator's business)."""
    module = model._model
    config = getattr(module, "config", None)
    try:
        config_dict = json.loads(config.to_json_string(use_diff=False)) if config is not None else {}
    except (AttributeError, TypeError, ValueError):
        config_dict = {}
    architectures = list(getattr(config, "architectures", None) or [type(module).__name__])
    first = next(module.parameters(), None)
    return {
        "name": name,
        "architectures": architectures,
        "config": config_dict,
        "modules": [path for path, _ in module.named_modules() if path],
        "repr": repr(module),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "parameters": sum(p.numel() for p in module.parameters()),
        "tokenizer": _tokenizer_files(getattr(model, "tokenizer", None)),
    }


def _tokenizer_files(tokenizer: Any) -> dict:
    if tokenizer is None:
        return {"files": {}, "binary_files": {}}
    files: dict[str, str] = {}
    binary: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="seethrough-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            key = path.relative_to(folder).as_posix()
            try:
                files[key] = data.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(data).decode("ascii")
    return {"files": files, "binary_files": binary}


# -- process set-up -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Exit as soon as the API process goes away, even in the middle of a request.

    (``PR_SET_PDEATHSIG`` would follow the *thread* that spawned the worker,
    and dispatcher threads come and go, so a watchdog thread polls instead.)
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="seethrough-parent-watchdog", daemon=True).start()


def _limit_memory(budget: int | None, uses_cuda: bool) -> str:
    """Cap the address space at its current size plus ``budget``; say what was done."""
    if budget is None:
        return "no memory limit"
    if uses_cuda:
        return "no memory limit (RLIMIT_AS would break CUDA)"
    limit = limit_address_space(budget)
    if limit is None:
        return "no memory limit (cannot read this process's size on this platform)"
    return f"memory limit {limit / 2**30:.2f} GiB of address space ({budget / 2**30:.2f} GiB per request)"


def _warm_up(model: Any) -> None:
    """One forward and a one-token generation, so lazy state exists before the fingerprint."""
    import torch

    tokenizer = getattr(model, "tokenizer", None)
    token = getattr(tokenizer, "bos_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    ids = torch.tensor([[int(token)]], device=model.device)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a one-token prompt draws warnings that mean nothing here
    try:
        _forward_and_generate(model, ids)
    finally:
        hf_logging.set_verbosity(verbosity)


class _RequestArrived(Exception):
    """Ends a warm-up forward: the request it prepared for is waiting."""


def _warm_forward(model: Any, arrived: Callable[[], bool]) -> None:
    """A one-token forward in a request process waiting for its request: the memory a
    forward writes is copied from the model process now rather than during the request.

    It stops at the next module call once ``arrived()``: under steady load the next
    request comes while this runs, and waiting for the rest of a warm-up would cost
    that request more than the copying it saves.  (The check is a hook on every
    module call, torch-wide: this process is the request's own and dies with it.)"""
    import torch

    def stop_if_arrived(module: Any, args: Any) -> None:
        if arrived():
            raise _RequestArrived()

    ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(stop_if_arrived)
    try:
        with torch.no_grad():
            model._model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _RequestArrived:
        pass
    finally:
        handle.remove()


def _forward_and_generate(model: Any, ids: Any) -> None:
    import torch

    with torch.no_grad():
        model._model(input_ids=ids, attention_mask=torch.ones_like(ids))
        generate = getattr(model._model, "generate", None)
        if callable(generate):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)


# -- the loop -----------------------------------------------------------------------------


def run_worker(conn: Any, options: WorkerOptions) -> None:
    """Entry point of a worker process (see the module docs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's business
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    logging.basicConfig(level=options.log_level.upper(), format=f"%(asctime)s worker[{options.name}] %(message)s")
    try:
        threads = _single_threaded(options)
        model, guard, info = _load(options)
        fork = _choose_request_process(options.request_process, _uses_cuda(model))
        if not fork:
            _set_threads(threads)  # requests run in this process
        fingerprint = None if fork else StateFingerprint(model._model, model.tokenizer)
        readable = (options.source,) if os.path.isdir(options.source) else ()
        report = isolation.isolate(options.isolation, readable=readable)
    except Exception as error:  # noqa: BLE001 - any load failure is reported to the API process
        conn.send_bytes(framing.encode("failed", message=f"{type(error).__name__}: {error}"[:_MAX_ERROR_FIELD]))
        return
    _die_with_parent()  # after isolating: a user namespace needs a single-threaded process
    if fork:
        private_tmp = isolation.PRIVATE_TMP if report.steps.get("file system") is True else None

        def handler(payload: bytes, child: Any) -> None:  # runs in each request process
            started = time.perf_counter()
            answer, error, _ = _handle(child, payload, model, guard, options, None, forked=True)
            logger.debug("request process: request run in %.1f ms", 1e3 * (time.perf_counter() - started))
            child.send_bytes(framing.encode("answer", answer, error=error, replace=False, reason=None))

        forker = RequestForker(handler, options.timeout, options.memory_limit,
                               options.max_result_bytes + framing.MAX_HEADER_BYTES + 4096, private_tmp,
                               prepare=lambda arrived: (_set_threads(threads), _warm_forward(model, arrived)))
        memory = ("no memory limit" if options.memory_limit is None else
                  f"memory limit: each request process may grow {options.memory_limit / 2**30:.2f} GiB past the "
                  f"model process ({(address_space() or 0) / 2**30:.2f} GiB of address space)")
    else:
        forker = None
        memory = _limit_memory(options.memory_limit, _uses_cuda(model))
    mode = "fork" if fork else "reuse"
    logger.info("serving %s from %s (pid %d, requests: %s, %s)", options.name, options.source, os.getpid(), mode, memory)
    conn.send_bytes(framing.encode("ready", json.dumps(info).encode("utf-8"), pid=os.getpid(), memory=memory,
                                   isolation=report.summary(), isolation_missing=sorted(report.missing),
                                   request_process=mode))
    while True:
        try:
            message = framing.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the API process is gone
        if message.type == "stop":
            return
        if message.type != "run":  # e.g. a cancel that came after its request had ended
            continue
        started = time.perf_counter()
        if forker is not None:
            if _run_forked(conn, forker, message.payload) == "stopped":
                return
            replace = False
        else:
            answer, error, problems = _handle(conn, message.payload, model, guard, options, fingerprint)
            conn.send_bytes(framing.encode(
                "answer", answer, error=error, replace=bool(problems), reason="; ".join(problems) or None,
            ))
            replace = bool(problems)
        logger.debug("request %s handled in %.1f ms", message.fields.get("job"), 1e3 * (time.perf_counter() - started))
        if replace:
            return  # the model is no longer the one loaded: the API process starts a fresh worker


def _single_threaded(options: WorkerOptions) -> int:
    """Run torch on one thread in this process; return the threads a request gets.

    OpenMP's thread pool does not survive fork: a request process forked after
    this process ran a multi-threaded operation would hang at its first one.
    So the model process loads and warms up on one thread, and each request
    process (or this one, when requests run here) takes the requested number."""
    import torch

    threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _choose_request_process(wanted: str, uses_cuda: bool) -> bool:
    """True: fork a process per request; False: run requests here and check the state after each."""
    if wanted not in REQUEST_PROCESSES:
        raise SettingsError(f"unknown request process model {wanted!r}; use one of {', '.join(REQUEST_PROCESSES)}")
    if wanted == "fork" and uses_cuda:
        raise SettingsError("--request-process fork is impossible for a model on a CUDA device (CUDA does not "
                            "survive fork); use --request-process auto or reuse")
    return wanted == "fork" or (wanted == "auto" and not uses_cuda)


def _control(data: bytes) -> str | None:
    """What a message from the API process means while a request runs: ``cancel`` and
    ``stop`` end the request (its process is killed); anything else is ignored."""
    try:
        kind = framing.decode(data).type
    except framing.FramingError:
        return None
    return {"cancel": "cancelled", "stop": "stopped"}.get(kind)


def _run_forked(conn: Any, forker: RequestForker, payload: bytes) -> str:
    """One request in a forked request process; its messages are relayed whole to the API process.
    Returns how it ended (``stopped``: the API process asked this worker to exit)."""
    outcome = forker.run(payload, conn.send_bytes, conn, _control)
    if outcome.kind == "cancelled":
        conn.send_bytes(framing.encode("cancelled"))
    elif outcome.kind == "timeout":
        conn.send_bytes(framing.encode("timeout"))
    elif outcome.kind == "crashed":
        conn.send_bytes(framing.encode("crashed", how=outcome.how))
    return outcome.kind


def _uses_cuda(model: Any) -> bool:
    import torch

    device = model.device
    return (device is not None and device.type == "cuda") or torch.cuda.is_initialized()


def load_kwargs(options: WorkerOptions) -> dict:
    """The keyword arguments the worker loads its model with (besides the source)."""
    return {"device_map": options.device_map} if options.device_map else {}


def _load(options: WorkerOptions) -> tuple[Any, Any, dict]:
    import torch

    from ...models.language import LanguageModel
    from .guard import ModelGuard, ReadOnlyWeights

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the server's log
    model = LanguageModel(options.source, dispatch=True, **load_kwargs(options))
    read_only = ReadOnlyWeights.apply(model._model) if options.read_only_weights else None
    _warm_up(model)
    _hide_source(model, options.name)
    guard = ModelGuard(model._model, model.tokenizer, read_only)
    info = describe_model(options.name, model)
    info["read_only_weights"] = read_only is not None
    return model, guard, info


def _hide_source(model: Any, name: str) -> None:
    """Make the loaded model call itself by its served name, not by the folder it came from
    (a body reading ``model.config.name_or_path`` learns nothing of the server's disk)."""
    module = model._model
    for holder in (getattr(module, "config", None), getattr(module, "generation_config", None)):
        if holder is not None and isinstance(getattr(holder, "_name_or_path", None), str):
            holder._name_or_path = name
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and isinstance(getattr(tokenizer, "name_or_path", None), str):
        tokenizer.name_or_path = name
        if isinstance(getattr(tokenizer, "init_kwargs", None), dict) and "name_or_path" in tokenizer.init_kwargs:
            tokenizer.init_kwargs["name_or_path"] = name


def _handle(conn: Any, payload: bytes, model: Any, guard: Any, options: WorkerOptions, fingerprint: Any = None,
            forked: bool = False) -> tuple[bytes, Any, list[str]]:
    """Run one request; return (packed answer, error dict or None, problems with the model).

    ``forked``: this is a request process, whose changes die with it (a change is
    still reported, so that no result computed on a changed model goes back)."""
    from .. import wire
    from .execute import execute
    from ..protocol import PROTOCOL, ProtocolError, parse_request

    stream = LogStream(conn, options.max_log_lines, options.max_log_bytes)
    try:
        request = parse_request(
            wire.unpack(payload, max_bytes=options.max_request_bytes, max_unpacked_bytes=options.max_unpacked_bytes),
            PROTOCOL, __version__,
        )
    except (wire.WireError, ProtocolError) as error:  # the API process checked it; only a bug lands here
        answer: dict = {"error": error_answer(type(error).__name__, str(error))}
    else:
        steps = StepReporter(conn, model._model) if request.kind == "generate" else contextlib.nullcontext()
        with contextlib.redirect_stdout(stream), steps:
            answer = execute(request, model, print_function=stream.print)
        stream.finish()
        del request
    problems = guard.check()
    if fingerprint is not None:
        problems += [f"{name} changed" for name in fingerprint.changes()]
    if problems:
        after = ("the change died with the request's own process, so the next request sees the model as loaded"
                 if forked else "the server reloads the model")
        answer = {"error": error_answer(
            "WeightsModifiedError",
            f"this request changed the served model, so its results were discarded ({after}): "
            f"{'; '.join(problems)}. Edit activations inside the trace (`.output`, `.input`, `.skip()`) "
            "instead; the served model's weights, modules and config must stay as they are.",
            module="seethrough.errors",
        )}
    error = answer.get("error")
    if isinstance(error, dict):
        error = _explain_memory(error, options.memory_limit)
        answer = {"error": error}
    try:
        packed = wire.pack(answer, max_bytes=options.max_result_bytes)
    except wire.WireError as failure:
        error = error_answer(type(failure).__name__, f"the request ran, but its result cannot be sent back: {failure}",
                       module="seethrough.remote.wire")
        packed = wire.pack({"error": error}, max_bytes=options.max_result_bytes)
    except MemoryError:
        error = error_answer("MemoryError", "the request ran, but packing its result ran out of memory; save less")
        packed = wire.pack({"error": error}, max_bytes=options.max_result_bytes)
    return packed, _short(error) if isinstance(error, dict) else None, problems




def _explain_memory(error: dict, budget: int | None) -> dict:
    message = str(error.get("message", ""))
    is_memory = error.get("type") in ("MemoryError", "OutOfMemoryError") or (
        error.get("type") == "RuntimeError" and "allocate" in message and "memory" in message.lower())
    if not is_memory or budget is None:
        return error
    hint = (f" (this server lets one request allocate about {budget / 2**30:.1f} GiB on top of the model; "
            "work on smaller pieces, save less, or ask the operator to raise --memory-limit)")
    return {**error, "message": message + hint}


def _short(error: dict) -> dict:
    """The error dict cut to fit a pipe message header."""
    out = {}
    for key, value in error.items():
        if isinstance(value, str) and len(value) > _MAX_ERROR_FIELD:
            value = value[:_MAX_ERROR_FIELD] + " [...]"
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)[:_MAX_ERROR_FIELD]
    return out
