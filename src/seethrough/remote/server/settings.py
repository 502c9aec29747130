"""The server's settings and its command line (``seethrough serve ...``).

:data:`OPTIONS` is the one table of server options: each entry names a
:class:`Settings` field, its default, its flag and help, how the command line
reads it, and whether worker processes get it too; :class:`Settings`,
:func:`build_parser`, :func:`parse_args` and the workers' options are all made
from it.  :func:`parse_args` turns the command line into a frozen
:class:`Settings`; everything else in the server reads only that object.  Sizes accept plain
bytes or a suffix (``512M``, ``2G``, ``1.5GiB``); API keys come from a file
with one key per line (``#`` starts a comment).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, make_dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from ...errors import SeethroughError

# forkserver forks workers from a clean process that imported torch once
# (fast replacement after a crash); other platforms lack it.
_DEFAULT_START = "forkserver" if sys.platform.startswith("linux") else "spawn"

__all__ = ["ISOLATION_LEVELS", "OPTIONS", "REQUEST_PROCESSES", "ModelSpec", "Option", "Settings", "SettingsError", "build_parser", "load_api_keys", "parse_args", "parse_size", "worker_values"]

DEFAULT_PORT = 8470
# Served when no --model is given: the model LanguageModel() loads, available offline.
DEFAULT_SERVED = "smollm2=HuggingFaceTB/SmolLM2-135M-Instruct"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


class SettingsError(SeethroughError, ValueError):
    """A command-line option or the API key file is not valid."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: the name clients address it by, and where it loads from."""

    name: str
    source: str


# What a worker may be asked to use to isolate itself (see .isolation) and how
# it runs each request (see .worker): the choices of --isolation and --request-process.
ISOLATION_LEVELS = ("required", "best-effort", "off")
REQUEST_PROCESSES = ("auto", "fork", "reuse")


@dataclass(frozen=True)
class Option:
    """One server option, written once: the :class:`Settings` field, its
    default, its flag (``--`` + the field with dashes, unless ``flag`` says
    otherwise; ``""`` for none) and how the command line reads it.

    ``kind`` is how the flag's text is read: ``int``, ``float``, ``size``
    (bytes with a suffix), ``size_or_off`` (a size, or ``off`` for none),
    ``choice`` (one of ``choices``), ``text``, ``address`` (text, surrounding
    spaces dropped), ``keys`` (a file of API keys),
    ``negated`` (a switch that turns the field off).  ``positive``: the value
    must be above 0 when given.  ``worker``: the worker processes get it too
    (a field of :class:`.worker.WorkerOptions`)."""

    field: str
    default: Any
    help: str
    kind: str = "int"
    metavar: str | None = None
    choices: tuple = ()
    positive: bool = False
    worker: bool = False
    group: str | None = None
    flag: str | None = None
    shown: str | None = None  # the default as written on the command line ("256M"); "" when the help says it

    @property
    def option_string(self) -> str:
        if self.flag is not None:
            return self.flag
        return "--" + self.field.replace("_", "-")

    def help_text(self) -> str:
        if self.kind == "negated" or self.shown == "" or self.default is None and self.shown is None:
            return self.help
        shown = self.shown if self.shown is not None else f"{self.default:g}" if isinstance(self.default, float) else self.default
        return f"{self.help} (default {shown})"


_TYPES = {"int": int, "float": float, "size": int, "size_or_off": "int | None", "choice": str, "text": str,
          "address": str, "keys": "frozenset[str] | None", "negated": bool}

OPTIONS: tuple[Option, ...] = (
    Option("host", "127.0.0.1", "address to listen on", kind="text"),
    Option("port", DEFAULT_PORT, "port"),
    Option("api_keys", None, "file of API keys, one per line ('#' starts a comment); without it the server is open "
           "to anyone who reaches it", kind="keys", metavar="FILE"),
    Option("timeout", 300.0, "wall-clock limit per request; the worker is killed and replaced past it",
           kind="float", metavar="SECONDS", positive=True, worker=True),
    Option("memory_limit", 4 * 1024**3, "memory a request may allocate on top of the loaded model, e.g. 2G; 'off' "
           "for none (not applied to workers that use CUDA)", kind="size_or_off", metavar="BYTES", shown="4G",
           worker=True),
    Option("max_request_bytes", 256 * 1024**2, "largest request body accepted", kind="size", metavar="BYTES",
           shown="256M", worker=True),
    Option("max_unpacked_bytes", 1024**3, "largest decompressed request accepted", kind="size", metavar="BYTES",
           shown="1G", worker=True),
    Option("max_result_bytes", 1024**3, "largest result a request may send back", kind="size", metavar="BYTES",
           shown="1G", worker=True),
    Option("workers_per_model", 1, "worker processes per model, each with its own copy of the weights",
           metavar="N", positive=True),
    Option("spare_workers", 0, "keep one loaded spare worker per model, so a crashed or timed-out worker is "
           "replaced at once (costs one more copy of the weights)", choices=(0, 1)),
    Option("read_only_weights", True, "do not map CPU weights read-only (then every weight is checksummed after "
           "each request)", kind="negated", flag="--no-read-only-weights", worker=True),
    Option("job_ttl", 3600.0, "how long finished requests and their results are kept", kind="float",
           metavar="SECONDS", positive=True),
    Option("max_queued", 1000, "queued requests per model before new ones are refused with 429", metavar="N",
           positive=True),
    Option("max_queued_per_key", 100, "queued requests per model and API key", metavar="N", positive=True),
    Option("max_log_lines", 10_000, "printed lines streamed back per request", metavar="N", positive=True,
           worker=True),
    Option("max_log_bytes", 1024**2, "printed bytes streamed back per request", kind="size", metavar="BYTES",
           shown="1M", worker=True),
    Option("start_method", _DEFAULT_START, "how workers start: 'forkserver' (default on Linux: forked from a clean "
           "helper that imported torch and transformers once, so a replaced worker is ready in about the time its "
           "weights take to load) or 'spawn' (each a new interpreter; default elsewhere)", kind="choice",
           choices=("spawn", "forkserver"), shown=""),
    Option("threads", None, "torch threads per worker (default: torch's own)", metavar="N", positive=True,
           worker=True),
    Option("startup_timeout", 600.0, "how long a worker may take to load its model", kind="float",
           metavar="SECONDS", positive=True),
    Option("max_source_bytes", 1024**2, "largest code (trace body and helper functions together) a request may "
           "send", kind="size", metavar="BYTES", shown="1M"),
    Option("check_workers", 2, "processes that check submitted requests off the API's event loop", metavar="N",
           positive=True),
    Option("check_timeout", 10.0, "wall-clock limit to check one request; past it the request is refused",
           kind="float", metavar="SECONDS", positive=True),
    Option("check_memory", 1024**3, "address space one check may add to its checker process", kind="size_or_off",
           flag=""),
    Option("spool_dir", None, "folder for request bodies and results waiting to be read (default: a private "
           "temporary folder, removed at shutdown)", kind="text", metavar="DIR"),
    Option("max_stored_bytes_per_key", 2 * 1024**3, "request bodies, results and printed lines one API key may keep "
           "on the server; past it new requests get 429", kind="size", metavar="BYTES", shown="2G"),
    Option("max_jobs_per_key", 200, "requests (queued, running, or finished and not yet expired or deleted) one API "
           "key may have; past it new requests get 429", metavar="N", positive=True),
    Option("isolation", "best-effort", "wall each worker off from the host: own network namespace (no network), "
           "read-only file system but a private /tmp, minimal environment, its own unprivileged uid, process and "
           "open-file limits. 'required': refuse to start when the OS refuses a step; 'best-effort': start anyway "
           "and say at start-up what is not isolated; 'off'", kind="choice", choices=ISOLATION_LEVELS, worker=True),
    Option("request_process", "auto", "'fork': run each request in a process forked from the loaded model "
           "(copy-on-write, nothing a request changes outlives it); 'reuse': run requests in the worker and replace "
           "it when a request changed anything; 'auto': fork unless the model is on a CUDA device", kind="choice",
           choices=REQUEST_PROCESSES, worker=True),
    Option("log_level", "info", "how much the server logs", kind="choice",
           choices=("debug", "info", "warning", "error"), worker=True),
    Option("max_connections", None, "open connections the API keeps; past it the oldest idle one is closed, or a "
           "new one gets 503 (default: what fits under the process's open-file limit, at most 8192)", metavar="N",
           positive=True, group="door"),
    Option("max_connections_per_address", 64, "open connections from one client address; past it new ones get 503",
           metavar="N", positive=True, group="door"),
    Option("header_timeout", 10.0, "time a connection has to send a complete request head before it is closed",
           kind="float", metavar="SECONDS", positive=True, group="door"),
    Option("keep_alive", 5.0, "how long an idle keep-alive connection stays open", kind="float", metavar="SECONDS",
           positive=True, group="door"),
    Option("body_timeout", 15.0, "an upload that sends no byte for this long is cut off with 408", kind="float",
           metavar="SECONDS", positive=True, group="door"),
    Option("upload_timeout", 300.0, "time to send a whole request body; past it the upload is cut off with 408",
           kind="float", metavar="SECONDS", positive=True, group="door"),
    Option("max_uploads_per_key", 4, "request bodies one API key (or address, on an open server) may send at once; "
           "past it 429", metavar="N", positive=True, group="door"),
    Option("max_checks_per_key", None, "checker processes one API key may use at once (default: half of "
           "--check-workers, at least 1)", metavar="N", positive=True, group="door"),
    Option("max_waiting_checks_per_key", 4, "bodies one API key may have waiting for a checker; past it 429",
           metavar="N", positive=True, group="door"),
    Option("ray", None, "place each model's workers as Ray actors on a cluster: 'auto' (the cluster this machine "
           "belongs to), HOST:PORT of a head node, or 'local' (a private Ray instance on this machine)",
           kind="address", metavar="ADDRESS", group="ray"),
    Option("cpus_per_worker", None, "CPUs Ray reserves for each worker (default 1; --ray only)", kind="float",
           metavar="N", group="ray"),
    Option("gpus_per_worker", None, "GPUs Ray reserves for each worker; above 1 the model is spread over them with "
           "device_map='auto' (default 0; --ray only)", kind="float", metavar="G", group="ray"),
)

Settings = make_dataclass(
    "Settings",
    [("models", "tuple[ModelSpec, ...]")]
    + [(o.field, _TYPES[o.kind] if o.default is not None or o.kind in ("keys", "size_or_off")
        else f"{_TYPES[o.kind].__name__} | None", dc_field(default=o.default)) for o in OPTIONS],
    frozen=True,
)
Settings.__module__ = __name__  # where pickle (sending it to a worker) finds it
Settings.__doc__ = ("Everything the server needs to know (see ``seethrough serve --help``), one field per "
                    "entry of :data:`OPTIONS` and the served ``models``.")


def worker_values(settings: Any) -> dict[str, Any]:
    """The settings the worker processes get too (``Option.worker``), by field."""
    return {o.field: getattr(settings, o.field) for o in OPTIONS if o.worker}


def parse_size(text: str | int) -> int:
    """``"2G"`` -> 2147483648; plain numbers are bytes; raises :class:`SettingsError`."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise SettingsError(f"cannot read the size {text!r}: write bytes (1048576) or a number with K, M, G or T (512M, 2G)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def _size_or_off(text: str) -> int | None:
    return None if text.strip().lower() in ("0", "off", "none", "unlimited") else parse_size(text)


def _model_spec(text: str) -> ModelSpec:
    name, sep, source = text.partition("=")
    if not sep:  # `--model gpt2`: served under its own name
        name, source = text, text
    name, source = name.strip(), source.strip()
    if not _MODEL_NAME.match(name) or not source:
        raise SettingsError(
            f"--model {text!r}: write NAME=PATH_OR_REPO, e.g. --model gpt2=/models/gpt2 (names use letters, "
            "digits and . _ / -)"
        )
    return ModelSpec(name, source)


def load_api_keys(path: str | os.PathLike) -> frozenset[str]:
    """The keys in ``path``: one per line, blank lines and ``#`` comments ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"cannot read the API key file {os.fspath(path)!r}: {error}") from None
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if any(ch.isspace() for ch in key) or not key.isprintable() or len(key) > 512:
            raise SettingsError(f"{os.fspath(path)}, line {number}: an API key must be one printable word without spaces")
        keys.add(key)
    if not keys:
        raise SettingsError(f"the API key file {os.fspath(path)!r} holds no keys; add one key per line")
    return frozenset(keys)


def build_parser(prog: str = "seethrough serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve models to seethrough clients (model.trace(..., remote=True)).",
    )
    parser.add_argument("--model", action="append", metavar="NAME=PATH_OR_REPO",
                        help="a model to serve, addressed by NAME (repeat for several); without any, the bundled "
                             f"offline model is served as {DEFAULT_SERVED}")
    groups = {"door": parser.add_argument_group("the front door (connections, uploads, checks)"),
              "ray": parser.add_argument_group("scale-out on Ray (pip install \"seethrough[ray]\")")}
    for option in OPTIONS:
        if option.option_string == "":
            continue  # a setting with no flag
        where = groups.get(option.group, parser)
        if option.kind == "negated":
            where.add_argument(option.option_string, dest=option.field, action="store_false", help=option.help_text())
            continue
        extra: dict[str, Any] = {}
        if option.choices:
            extra["choices"] = option.choices
        if option.kind in ("int", "float"):
            extra["type"] = int if option.kind == "int" else float
        where.add_argument(option.option_string, dest=option.field, default=None, metavar=option.metavar,
                           help=option.help_text(), **extra)
    return parser


def _read(option: Option, given: Any) -> Any:
    """``option``'s value from what the command line gave (None: not given)."""
    if given is None:
        return option.default
    if option.kind == "size":
        return parse_size(given)
    if option.kind == "size_or_off":
        return _size_or_off(given)
    if option.kind == "keys":
        return load_api_keys(given)
    if option.kind == "address":
        return given.strip()
    if option.positive and given <= 0:
        raise SettingsError(f"{option.option_string} must be positive, got {given}")
    return given


def _ray_options(options: argparse.Namespace) -> None:
    """Check --ray and the resource requests that only make sense with it."""
    if options.ray is None:
        for flag, value in (("--cpus-per-worker", options.cpus_per_worker), ("--gpus-per-worker", options.gpus_per_worker)):
            if value is not None:
                raise SettingsError(f"{flag} is a Ray resource request: use it with --ray ADDRESS")
        return
    address = options.ray.strip()
    if address not in ("auto", "local") and not _RAY_ADDRESS.match(address):
        raise SettingsError(f"--ray {options.ray!r}: write 'auto', 'local' or the head node's HOST:PORT "
                            "(e.g. --ray 10.0.0.5:6379)")
    if options.cpus_per_worker is not None and options.cpus_per_worker <= 0:
        raise SettingsError(f"--cpus-per-worker must be positive, got {options.cpus_per_worker:g}")
    if options.gpus_per_worker is not None and options.gpus_per_worker < 0:
        raise SettingsError(f"--gpus-per-worker must be 0 or more, got {options.gpus_per_worker:g}")
    if options.gpus_per_worker is not None and options.gpus_per_worker > 1 and options.gpus_per_worker % 1:
        raise SettingsError(f"--gpus-per-worker above 1 must be a whole number, got {options.gpus_per_worker:g}")


def parse_args(argv: list[str] | None = None, prog: str = "seethrough serve") -> Settings:
    """Settings from the command line; raises :class:`SettingsError` for bad values."""
    options = build_parser(prog).parse_args(argv)
    models = tuple(_model_spec(text) for text in (options.model or [DEFAULT_SERVED]))
    names = [spec.name for spec in models]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SettingsError(f"--model: the name(s) {', '.join(duplicates)} are given twice; give each model its own name")
    if options.port is not None and not 0 < options.port < 65536:
        raise SettingsError(f"--port must be between 1 and 65535, got {options.port}")
    _ray_options(options)
    values = {o.field: _read(o, getattr(options, o.field, None)) for o in OPTIONS}
    return Settings(models=models, **values)
