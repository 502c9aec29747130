"""The server's settings and its command line (``seethrough serve ...``).

:func:`parse_args` turns the command line into a frozen :class:`Settings`;
everything else in the server reads only that object.  Sizes accept plain
bytes or a suffix (``512M``, ``2G``, ``1.5GiB``); API keys come from a file
with one key per line (``#`` starts a comment).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import SeethroughError

# forkserver forks workers from a clean process that imported torch once
# (fast replacement after a crash); other platforms lack it.
_DEFAULT_START = "forkserver" if sys.platform.startswith("linux") else "spawn"

__all__ = ["ModelSpec", "Settings", "SettingsError", "build_parser", "load_api_keys", "parse_args", "parse_size"]

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


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know (see ``seethrough serve --help``)."""

    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: frozenset[str] | None = None  # None: an open server
    timeout: float = 300.0  # wall-clock seconds per request
    memory_limit: int | None = 4 * 1024**3  # extra address space per request (bytes)
    max_request_bytes: int = 256 * 1024**2
    max_unpacked_bytes: int = 1024**3
    max_result_bytes: int = 1024**3
    workers_per_model: int = 1
    spare_workers: int = 0
    read_only_weights: bool = True
    job_ttl: float = 3600.0
    max_queued: int = 1000  # per model
    max_queued_per_key: int = 100  # per model and key
    max_log_lines: int = 10_000  # per request
    max_log_bytes: int = 1024**2  # per request
    startup_timeout: float = 600.0
    threads: int | None = None  # torch threads in each worker (None: torch's default)
    start_method: str = _DEFAULT_START  # how worker processes start: forkserver or spawn
    log_level: str = "info"
    max_source_bytes: int = 1024**2  # a request's code (body and helpers)
    check_workers: int = 2  # processes that check submitted requests
    check_timeout: float = 10.0  # wall-clock seconds to check one request
    check_memory: int | None = 1024**3  # address space one check may add to its checker process
    spool_dir: str | None = None  # None: a fresh temporary folder, removed at shutdown
    max_stored_bytes_per_key: int = 2 * 1024**3  # bodies, results and printed lines kept per key
    max_jobs_per_key: int = 200  # queued, running and kept requests per key
    isolation: str = "best-effort"  # required | best-effort | off (see .isolation)
    request_process: str = "auto"  # fork | reuse | auto (fork unless the model uses CUDA)
    ray: str | None = None  # --ray: "auto", "local" or a head's host:port; None: workers are local processes
    cpus_per_worker: float | None = None  # Ray resource requests per worker (--ray only)
    gpus_per_worker: float | None = None
    # The front door (see .connections, .uploads and .checkers)
    max_connections: int | None = None  # None: what fits under the open-file limit, up to 8192
    max_connections_per_address: int = 64
    header_timeout: float = 10.0  # seconds to deliver a complete request head
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    body_timeout: float = 15.0  # seconds an upload may go without sending a byte
    upload_timeout: float = 300.0  # seconds for a whole request body
    max_uploads_per_key: int = 4  # request bodies one key may be sending at once
    max_checks_per_key: int | None = None  # checker processes one key may use at once (None: half, at least 1)
    max_waiting_checks_per_key: int = 4  # bodies one key may have waiting for a checker


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
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-keys", metavar="FILE",
                        help="file of API keys, one per line; without it the server is open to anyone who reaches it")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="wall-clock limit per request; the worker is killed and replaced past it (default 300)")
    parser.add_argument("--memory-limit", default="4G", metavar="BYTES",
                        help="memory a request may allocate on top of the loaded model, e.g. 2G; 'off' for none "
                             "(default 4G; not applied to workers that use CUDA)")
    parser.add_argument("--max-request-bytes", default="256M", metavar="BYTES",
                        help="largest request body accepted (default 256M)")
    parser.add_argument("--max-unpacked-bytes", default="1G", metavar="BYTES",
                        help="largest decompressed request accepted (default 1G)")
    parser.add_argument("--max-result-bytes", default="1G", metavar="BYTES",
                        help="largest result a request may send back (default 1G)")
    parser.add_argument("--workers-per-model", type=int, default=1, metavar="N",
                        help="worker processes per model, each with its own copy of the weights (default 1)")
    parser.add_argument("--spare-workers", type=int, default=0, choices=(0, 1),
                        help="keep one loaded spare worker per model, so a crashed or timed-out worker is "
                             "replaced at once (costs one more copy of the weights; default 0)")
    parser.add_argument("--no-read-only-weights", action="store_true",
                        help="do not map CPU weights read-only (then every weight is checksummed after each request)")
    parser.add_argument("--job-ttl", type=float, default=3600.0, metavar="SECONDS",
                        help="how long finished requests and their results are kept (default 3600)")
    parser.add_argument("--max-queued", type=int, default=1000, metavar="N",
                        help="queued requests per model before new ones are refused with 429 (default 1000)")
    parser.add_argument("--max-queued-per-key", type=int, default=100, metavar="N",
                        help="queued requests per model and API key (default 100)")
    parser.add_argument("--max-log-lines", type=int, default=10_000, metavar="N",
                        help="printed lines streamed back per request (default 10000)")
    parser.add_argument("--max-log-bytes", default="1M", metavar="BYTES",
                        help="printed bytes streamed back per request (default 1M)")
    parser.add_argument("--start-method", default=_DEFAULT_START, choices=("spawn", "forkserver"),
                        help="how workers start: 'forkserver' (default on Linux: forked from a clean helper that "
                             "imported torch and transformers once, so a replaced worker is ready in about the time "
                             "its weights take to load) or 'spawn' (each a new interpreter; default elsewhere)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads per worker")
    parser.add_argument("--startup-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long a worker may take to load its model (default 600)")
    parser.add_argument("--max-source-bytes", default="1M", metavar="BYTES",
                        help="largest code (trace body and helper functions together) a request may send (default 1M)")
    parser.add_argument("--check-workers", type=int, default=2, metavar="N",
                        help="processes that check submitted requests off the API's event loop (default 2)")
    parser.add_argument("--check-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="wall-clock limit to check one request; past it the request is refused (default 10)")
    parser.add_argument("--spool-dir", default=None, metavar="DIR",
                        help="folder for request bodies and results waiting to be read (default: a private temporary "
                             "folder, removed at shutdown)")
    parser.add_argument("--max-stored-bytes-per-key", default="2G", metavar="BYTES",
                        help="request bodies, results and printed lines one API key may keep on the server; past it "
                             "new requests get 429 (default 2G)")
    parser.add_argument("--max-jobs-per-key", type=int, default=200, metavar="N",
                        help="requests (queued, running, or finished and not yet expired or deleted) one API key may "
                             "have; past it new requests get 429 (default 200)")
    parser.add_argument("--isolation", default="best-effort", choices=("required", "best-effort", "off"),
                        help="wall each worker off from the host: own network namespace (no network), read-only "
                             "file system but a private /tmp, minimal environment, its own unprivileged uid, process "
                             "and open-file limits. 'required': refuse to start when the OS refuses a step; "
                             "'best-effort' (default): start anyway and say at start-up what is not isolated; 'off'")
    parser.add_argument("--request-process", default="auto", choices=("auto", "fork", "reuse"),
                        help="'fork': run each request in a process forked from the loaded model (copy-on-write, "
                             "nothing a request changes outlives it); 'reuse': run requests in the worker and "
                             "replace it when a request changed anything; 'auto' (default): fork unless the model "
                             "is on a CUDA device")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="how much the server logs (default info)")
    door = parser.add_argument_group("the front door (connections, uploads, checks)")
    door.add_argument("--max-connections", type=int, default=None, metavar="N",
                      help="open connections the API keeps; past it the oldest idle one is closed, or a new one gets "
                           "503 (default: what fits under the process's open-file limit, at most 8192)")
    door.add_argument("--max-connections-per-address", type=int, default=64, metavar="N",
                      help="open connections from one client address; past it new ones get 503 (default 64)")
    door.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                      help="time a connection has to send a complete request head before it is closed (default 10)")
    door.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                      help="how long an idle keep-alive connection stays open (default 5)")
    door.add_argument("--body-timeout", type=float, default=15.0, metavar="SECONDS",
                      help="an upload that sends no byte for this long is cut off with 408 (default 15)")
    door.add_argument("--upload-timeout", type=float, default=300.0, metavar="SECONDS",
                      help="time to send a whole request body; past it the upload is cut off with 408 (default 300)")
    door.add_argument("--max-uploads-per-key", type=int, default=4, metavar="N",
                      help="request bodies one API key (or address, on an open server) may send at once; past it "
                           "429 (default 4)")
    door.add_argument("--max-checks-per-key", type=int, default=None, metavar="N",
                      help="checker processes one API key may use at once (default: half of --check-workers, at "
                           "least 1)")
    door.add_argument("--max-waiting-checks-per-key", type=int, default=4, metavar="N",
                      help="bodies one API key may have waiting for a checker; past it 429 (default 4)")
    scale = parser.add_argument_group("scale-out on Ray (pip install \"seethrough[ray]\")")
    scale.add_argument("--ray", default=None, metavar="ADDRESS",
                       help="place each model's workers as Ray actors on a cluster: 'auto' (the cluster this machine "
                            "belongs to), HOST:PORT of a head node, or 'local' (a private Ray instance on this machine)")
    scale.add_argument("--cpus-per-worker", type=float, default=None, metavar="N",
                       help="CPUs Ray reserves for each worker (default 1; --ray only)")
    scale.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                       help="GPUs Ray reserves for each worker; above 1 the model is spread over them with "
                            "device_map='auto' (default 0; --ray only)")
    return parser


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
    positive = {"--timeout": options.timeout, "--workers-per-model": options.workers_per_model,
                "--job-ttl": options.job_ttl, "--max-queued": options.max_queued,
                "--max-queued-per-key": options.max_queued_per_key, "--max-log-lines": options.max_log_lines,
                "--startup-timeout": options.startup_timeout, "--check-workers": options.check_workers,
                "--check-timeout": options.check_timeout, "--max-jobs-per-key": options.max_jobs_per_key,
                "--max-connections-per-address": options.max_connections_per_address,
                "--header-timeout": options.header_timeout, "--keep-alive": options.keep_alive,
                "--body-timeout": options.body_timeout, "--upload-timeout": options.upload_timeout,
                "--max-uploads-per-key": options.max_uploads_per_key,
                "--max-waiting-checks-per-key": options.max_waiting_checks_per_key}
    for flag, value in (("--max-connections", options.max_connections), ("--max-checks-per-key",
                                                                          options.max_checks_per_key)):
        if value is not None and value <= 0:
            raise SettingsError(f"{flag} must be positive, got {value}")
    for flag, value in positive.items():
        if value <= 0:
            raise SettingsError(f"{flag} must be positive, got {value}")
    if options.threads is not None and options.threads <= 0:
        raise SettingsError(f"--threads must be positive, got {options.threads}")
    if not 0 < options.port < 65536:
        raise SettingsError(f"--port must be between 1 and 65535, got {options.port}")
    _ray_options(options)
    return Settings(
        models=models,
        host=options.host,
        port=options.port,
        api_keys=load_api_keys(options.api_keys) if options.api_keys else None,
        timeout=options.timeout,
        memory_limit=_size_or_off(options.memory_limit),
        max_request_bytes=parse_size(options.max_request_bytes),
        max_unpacked_bytes=parse_size(options.max_unpacked_bytes),
        max_result_bytes=parse_size(options.max_result_bytes),
        workers_per_model=options.workers_per_model,
        spare_workers=options.spare_workers,
        read_only_weights=not options.no_read_only_weights,
        job_ttl=options.job_ttl,
        max_queued=options.max_queued,
        max_queued_per_key=options.max_queued_per_key,
        max_log_lines=options.max_log_lines,
        max_log_bytes=parse_size(options.max_log_bytes),
        startup_timeout=options.startup_timeout,
        threads=options.threads,
        start_method=options.start_method,
        log_level=options.log_level,
        max_source_bytes=parse_size(options.max_source_bytes),
        check_workers=options.check_workers,
        check_timeout=options.check_timeout,
        spool_dir=options.spool_dir,
        max_stored_bytes_per_key=parse_size(options.max_stored_bytes_per_key),
        max_jobs_per_key=options.max_jobs_per_key,
        isolation=options.isolation,
        request_process=options.request_process,
        ray=options.ray.strip() if options.ray is not None else None,
        cpus_per_worker=options.cpus_per_worker,
        gpus_per_worker=options.gpus_per_worker,
        max_connections=options.max_connections,
        max_connections_per_address=options.max_connections_per_address,
        header_timeout=options.header_timeout,
        keep_alive=options.keep_alive,
        body_timeout=options.body_timeout,
        upload_timeout=options.upload_timeout,
        max_uploads_per_key=options.max_uploads_per_key,
        max_checks_per_key=options.max_checks_per_key,
        max_waiting_checks_per_key=options.max_waiting_checks_per_key,
    )
