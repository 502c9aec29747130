"""The shape of a remote request and of its answer (shared by client and server).

A request is one wire value (see :mod:`.wire`), a dict:

.. code-block:: python

    {
        "protocol": 1,
        "client_version": "0.1.0",
        "model": "gpt2",                      # the name the server serves it under
        "kind": "trace" | "generate" | "session",
        "body": {"source": str, "filename": str, "first_line": int, "tracer_name": str | None},
        "inputs": {"args": [...], "kwargs": {...}},   # the traced call's inputs
        "options": {"keep_graph": bool, "generate": {...}},
        "variables": {name: value},           # tensors and plain data the body reads
        "envoys": {name: "path"},             # names bound to modules of the model ("" = the model)
        "modules": {name: "torch"},           # names bound to allowed modules
        "functions": {name: source},          # helper functions the body calls
        "packages": {"pkg.mod": {"source": str, "package": bool}},  # registered modules (source)
        "imports": {name: ["pkg.mod", "attr" or ""]},  # names bound to them (or to what they define)
    }

The answer is ``{"values": {name: value}, "not_saved": [name, ...]}`` or
``{"error": ...}`` in the one shape :func:`error_answer` makes (type, module,
message, filename, line, code, traceback, server version), whether the body
raised, the worker, the server or ``remote="local"`` refused it.

:func:`parse_request` checks every field of an untrusted request and raises
:class:`ProtocolError` (a 400 for the server) naming the field and the fix.

Generation options are an allowlist (:data:`GENERATE_OPTIONS`: lengths,
sampling, beams, penalties, stop strings, token ids, what to return);
anything else, above all what makes HuggingFace load code or files
(``custom_generate``, ``trust_remote_code``, a path, a repo), is refused
naming the option.  The inputs of a traced call travel to the model's
forward; names that only load code or files there are refused as well
(:func:`check_call_options`, also used for calls made inside a body).
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any


from .._version import __version__
from ..errors import SeethroughError

PROTOCOL = 1
CONTENT_TYPE = "application/x-seethrough"  # the media type of a request and a result on HTTP
# remote="local": the in-process server's one entry point, "module:function"
# (``run_local(request, model) -> answer``).  The client loads it by this name
# when a body runs with remote="local", as a URL names a server for remote=True;
# it never imports the server package (tests/test_layers.py checks both ends).
LOCAL_SERVER = "seethrough.remote.server.local:run_local"
KINDS = ("trace", "generate", "session")
MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "math", "einops")
MAX_NAMES = 1_000


class ProtocolError(SeethroughError, ValueError):
    """A remote request that does not have the required shape."""


# HuggingFace ``generate`` settings a remote request may use: plain numbers,
# flags, token ids and strings that change decoding, never code or files.
# (Group beam search, contrastive search and DoLa load code from the Hub in
# transformers 5, so their settings are not here.)
GENERATE_OPTIONS = frozenset("""
    max_new_tokens min_new_tokens max_length min_length early_stopping max_time
    do_sample temperature top_k top_p min_p typical_p epsilon_cutoff eta_cutoff
    num_beams length_penalty num_return_sequences
    repetition_penalty encoder_repetition_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids suppress_tokens begin_suppress_tokens exponential_decay_length_penalty
    renormalize_logits remove_invalid_values forced_bos_token_id forced_eos_token_id
    stop_strings eos_token_id pad_token_id bos_token_id decoder_start_token_id
    output_scores output_logits output_attentions output_hidden_states return_dict_in_generate use_cache
""".split())
# Token inputs that travel with a generate request beside its options.
GENERATE_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
# Options of the client, never of a call made on the server.
CLIENT_OPTIONS = frozenset({"remote", "host", "api_key", "blocking", "backend"})
# Names (or parts of names) of options that load code, files or repositories.
_LOADING_OPTIONS = frozenset({"custom_generate", "trust_remote_code", "revision", "token", "use_auth_token",
                              "local_files_only", "subfolder", "from_tf", "from_flax", "assistant_model",
                              "generation_config", "logits_processor", "stopping_criteria", "streamer",
                              "prefix_allowed_tokens_fn", "synced_gpus", "tokenizer", "assistant_tokenizer"})
# Words of an option name (split at "_") that say it names a file, folder or repository.
_LOADING_WORDS = frozenset({"path", "paths", "file", "files", "filename", "dir", "directory", "folder", "repo",
                            "url", "hub", "code"})


def loads_code_or_files(name: str) -> bool:
    """True for option names that make a library load code, files or repositories."""
    lowered = name.lower()
    return lowered in _LOADING_OPTIONS or not _LOADING_WORDS.isdisjoint(lowered.split("_"))


def check_generate_options(options: dict, where: str) -> None:
    """Refuse generation options outside :data:`GENERATE_OPTIONS` (naming the first)."""
    for name in options:
        if not isinstance(name, str) or name not in GENERATE_OPTIONS:
            raise ProtocolError(_refusal(name, where, "generation option")
                                + f" Allowed: {', '.join(sorted(GENERATE_OPTIONS))}.")


def check_call_options(options: dict, where: str) -> None:
    """Refuse keyword inputs of a traced call that are client options or load code or files."""
    for name in options:
        if not isinstance(name, str) or name in CLIENT_OPTIONS or name.startswith("_") or loads_code_or_files(name):
            raise ProtocolError(_refusal(name, where, "keyword input"))


def _refusal(name: Any, where: str, what: str) -> str:
    if name in CLIENT_OPTIONS:
        why = "it is an option of the seethrough client: code on the server cannot start remote requests"
    elif isinstance(name, str) and loads_code_or_files(name):
        why = "it makes the server load code, files or repositories"
    else:
        why = "it is not one of the options a seethrough server accepts"
    return f"`{where}` has the {what} {name!r}, which a seethrough server refuses: {why}; remove it."


class VersionMismatchError(ProtocolError):
    """Client and server speak different protocol versions."""


@dataclass
class Request:
    """A checked remote request."""

    model: str
    kind: str
    source: str
    filename: str
    first_line: int
    client_version: str = ""
    tracer_name: str | None = None
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    keep_graph: bool = False
    generate: dict = field(default_factory=dict)
    variables: dict = field(default_factory=dict)
    envoys: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    functions: dict = field(default_factory=dict)
    packages: dict = field(default_factory=dict)
    imports: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        return {
            "protocol": PROTOCOL,
            "client_version": self.client_version,
            "model": self.model,
            "kind": self.kind,
            "body": {"source": self.source, "filename": self.filename, "first_line": self.first_line, "tracer_name": self.tracer_name},
            "inputs": {"args": list(self.args), "kwargs": dict(self.kwargs)},
            "options": {"keep_graph": self.keep_graph, "generate": dict(self.generate)},
            "variables": dict(self.variables),
            "envoys": dict(self.envoys),
            "modules": dict(self.modules),
            "functions": dict(self.functions),
            "packages": {name: dict(entry) for name, entry in self.packages.items()},
            "imports": {name: list(target) for name, target in self.imports.items()},
        }


def _require(value: Any, kind: type | tuple, where: str, hint: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"request field `{where}` must be {expected}, got {type(value).__name__}; {hint}.")
    return value


def _names(mapping: Any, where: str, values: type | tuple) -> dict:
    _require(mapping, dict, where, "a mapping from variable names")
    if len(mapping) > MAX_NAMES:
        raise ProtocolError(f"request field `{where}` has {len(mapping)} entries; at most {MAX_NAMES} are accepted.")
    for name, value in mapping.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ProtocolError(f"request field `{where}` has an invalid variable name {name!r}: names are Python identifiers not starting with `_`.")
        if values is not object:
            _require(value, values, f"{where}.{name}", "see the seethrough remote protocol")
    return mapping


def error_answer(kind: str, message: str, *, module: str = "builtins", filename: str = "", line: int | None = None,
                 code: str = "", traceback: str = "") -> dict:
    """An error answer: the exception's type and module (so the client raises the
    same class), its message, and where in the user's code it arose."""
    return {"type": kind, "module": module, "message": message, "filename": filename, "line": line, "code": code,
            "traceback": traceback, "server_version": __version__}


def parse_request(value: Any, server_protocol: int = PROTOCOL, server_version: str = "") -> Request:
    """Check an untrusted, already-decoded request; raise :class:`ProtocolError`."""
    _require(value, dict, "request", "send the request built by the seethrough client")
    protocol = value.get("protocol")
    client_version = value.get("client_version", "")
    if protocol != server_protocol:
        raise VersionMismatchError(
            f"this server speaks seethrough protocol {server_protocol} (seethrough {server_version or '?'}); "
            f"the client sent protocol {protocol!r} (seethrough {client_version or '?'}). Install a matching "
            "seethrough version on the client."
        )
    model = _require(value.get("model"), str, "model", "the name of a model this server serves (see /v1/models)")
    kind = _require(value.get("kind"), str, "kind", f"one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise ProtocolError(f"request field `kind` is {kind!r}; it must be one of {', '.join(KINDS)}.")
    body = _require(value.get("body"), dict, "body", "a dict with source, filename and first_line")
    source = _require(body.get("source"), str, "body.source", "the source text of the trace body")
    filename = _require(body.get("filename", "<remote body>"), str, "body.filename", "a file name")
    first_line = _require(body.get("first_line", 1), int, "body.first_line", "a line number")
    tracer_name = body.get("tracer_name")
    if tracer_name is not None and (not isinstance(tracer_name, str) or not tracer_name.isidentifier() or tracer_name.startswith("_")):
        raise ProtocolError("request field `body.tracer_name` must be a Python identifier (the `as` name of the trace) or null.")
    if not 1 <= first_line <= 10_000_000:
        raise ProtocolError(f"request field `body.first_line` is {first_line}; it must be a line number from 1.")
    inputs = _require(value.get("inputs", {}), dict, "inputs", "a dict with args and kwargs")
    args = _require(inputs.get("args", []), (list, tuple), "inputs.args", "a list of the traced call's inputs")
    kwargs = _require(inputs.get("kwargs", {}), dict, "inputs.kwargs", "a dict of keyword inputs")
    if any(not isinstance(k, str) for k in kwargs):
        raise ProtocolError("request field `inputs.kwargs` must have string keys.")
    options = _require(value.get("options", {}), dict, "options", "a dict of options")
    keep_graph = _require(options.get("keep_graph", False), bool, "options.keep_graph", "true or false")
    generate = _require(options.get("generate", {}), dict, "options.generate", "generate keyword arguments")
    if any(not isinstance(k, str) or k.startswith("_") for k in generate):
        raise ProtocolError("request field `options.generate` must have keyword names not starting with `_`.")
    check_generate_options(generate, "options.generate")
    if kind == "generate":
        extra = {k: v for k, v in kwargs.items() if k not in GENERATE_INPUTS}
        check_generate_options(extra, "inputs.kwargs")
    else:
        check_call_options(kwargs, "inputs.kwargs")
    variables = _names(value.get("variables", {}), "variables", object)
    envoys = _names(value.get("envoys", {}), "envoys", str)
    modules = _names(value.get("modules", {}), "modules", str)
    for name, module in modules.items():
        if module not in MODULES:
            raise ProtocolError(f"request field `modules.{name}` names {module!r}; remote bodies may use only {', '.join(MODULES)}.")
    functions = _names(value.get("functions", {}), "functions", str)
    packages = _packages(value.get("packages", {}))
    imports = _imports(value.get("imports", {}), packages)
    return Request(
        model=model, kind=kind, source=source, filename=filename, first_line=first_line,
        client_version=str(client_version), tracer_name=tracer_name, args=list(args), kwargs=dict(kwargs), keep_graph=keep_graph,
        generate=dict(generate), variables=dict(variables), envoys=dict(envoys), modules=dict(modules),
        functions=dict(functions), packages=packages, imports=imports,
    )


def valid_module_name(name: Any) -> bool:
    """A dotted module name whose parts are identifiers, none private (``pkg.mod``)."""
    return isinstance(name, str) and bool(name) and all(
        part.isidentifier() and not keyword.iskeyword(part) and not part.startswith("_") for part in name.split("."))


def _packages(value: Any) -> dict:
    _require(value, dict, "packages", "a mapping from registered module names to their source")
    if len(value) > MAX_NAMES:
        raise ProtocolError(f"request field `packages` has {len(value)} modules; at most {MAX_NAMES} are accepted.")
    out: dict[str, dict] = {}
    for name, entry in value.items():
        if not valid_module_name(name):
            raise ProtocolError(f"request field `packages` has an invalid module name {name!r}: dotted Python "
                                "identifiers, no part starting with `_`.")
        _require(entry, dict, f"packages.{name}", "a dict with source and package")
        source = _require(entry.get("source"), str, f"packages.{name}.source", "the module's source text")
        package = _require(entry.get("package", False), bool, f"packages.{name}.package", "true for a package")
        out[name] = {"source": source, "package": package}
    return out


def _imports(value: Any, packages: dict) -> dict:
    _names(value, "imports", (list, tuple))
    out: dict[str, tuple[str, str]] = {}
    for name, target in value.items():
        if len(target) != 2 or target[0] not in packages or not isinstance(target[1], str) or (
                target[1] and (not target[1].isidentifier() or target[1].startswith("_"))):
            raise ProtocolError(f"request field `imports.{name}` must be [module, attribute]: a module sent in "
                                "`packages` and a public name it defines (or \"\" for the module itself).")
        out[name] = (target[0], target[1])
    return out
