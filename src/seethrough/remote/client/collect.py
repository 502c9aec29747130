"""Build a remote request from a captured body and the caller's variables.

The body travels as source text.  Every name it reads is looked up in the
caller's scope and sent as what it is: tensors and plain data as values,
envoys of the traced model as module paths, allowed modules (``torch``,
``math``, ...) by name, the user's helper functions as their source (with
whatever they read, recursively), and registered modules (and the functions
and classes they define, :mod:`.registry`) as the source of those modules.  Anything else is refused with a message
saying what can be sent.
"""

from __future__ import annotations

import builtins
import inspect
import textwrap
import types
from typing import Any


from ..._version import __version__
from ...envoy import Envoy
from ...errors import SeethroughError
from ...tracing.capture import CapturedBlock
from ...tracing.tracer import Tracer
from . import registry
from .. import portable
from ..protocol import MODULES, Request, valid_module_name



class RemoteInputError(SeethroughError, TypeError):
    """Something the body uses cannot be sent to a server."""



class BlockHandle:
    """The base of a block's handle other than a tracer (``models.Session``):
    a body may name one, but it never travels with a request."""

def build_request(
    *,
    kind: str,
    model: Any,
    captured: CapturedBlock,
    seed: dict,
    globals_: dict,
    args: tuple = (),
    kwargs: dict | None = None,
    keep_graph: bool = False,
    generate: dict | None = None,
    model_name: str | None = None,
) -> Request:
    """The request that runs ``captured`` on the server's copy of ``model``
    (addressed as ``model_name``, by default the name it was loaded from)."""
    args = tuple(_plain_mapping(a) for a in args)
    kwargs = {k: _plain_mapping(v) for k, v in (kwargs or {}).items()}
    request = Request(
        model=model_name or remote_name(model),
        kind=kind,
        source=captured.body_source,
        filename=captured.filename,
        first_line=captured.body_first_line,
        client_version=__version__,
        tracer_name=captured.as_name,
        args=list(args),
        kwargs=dict(kwargs or {}),
        keep_graph=keep_graph,
        generate=dict(generate or {}),
    )
    _check_portable(request.args, "the trace's input")
    _check_portable(request.kwargs, "the trace's keyword inputs")
    _check_portable(request.generate, "the generate settings")
    pending = [name for name in sorted(captured.loaded) if name not in captured.stored or name in seed or name in globals_]
    _gather(pending, seed, globals_, model, request, captured.as_name)
    return request


def _plain_mapping(value: Any) -> Any:
    """A tokenizer's ``BatchEncoding`` (a mapping, not a dict) as a plain dict."""
    if not isinstance(value, dict) and hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {key: value[key] for key in value.keys()}
    return value


def remote_name(model: Any) -> str:
    name = getattr(model, "remote_name", None)  # the wrapper's public name for servers (models.Model.remote_name)
    if not isinstance(name, str) or not name:
        raise RemoteInputError(
            "remote execution addresses a model by the name or path it was loaded from; this model "
            "was built from an object. Load it by name (e.g. `LanguageModel('gpt2')`) to run it remotely."
        )
    return name


def _gather(names: list[str], seed: dict, globals_: dict, model: Any, request: Request, skip: str | None) -> None:
    seen: set[str] = set()
    while names:
        name = names.pop()
        if name in seen or name == skip or name.startswith("__"):
            continue
        seen.add(name)
        if name in seed:
            value = seed[name]
        elif name in globals_:
            value = globals_[name]
        else:
            continue  # a builtin, or a name the body assigns before reading it
        if hasattr(builtins, name) and getattr(builtins, name) is value:
            continue
        _classify(name, value, model, request, names)


def _classify(name: str, value: Any, model: Any, request: Request, names: list[str]) -> None:
    if registry.owner(value) is not None:
        _registered(name, value, request)
        return
    if registry.owner(type(value)) is not None and not isinstance(value, Envoy):
        # (a wrapper of a registered class, e.g. nnterp's StandardizedTransformer, is the model: an envoy)
        raise RemoteInputError(
            f"the body uses `{name}`, an instance of {type(value).__qualname__} from the registered module "
            f"{type(value).__module__}; registered classes travel as source, their instances (state) do not. "
            f"Create it inside the body (`{name} = {type(value).__name__}(...)`), or pass its data instead.")
    if isinstance(value, Envoy):
        if value._root._module is not model._module:
            raise RemoteInputError(f"`{name}` is a module of another model; a remote body can use only the traced model.")
        request.envoys[name] = value.path
        return
    if isinstance(value, types.ModuleType):
        if value.__name__ not in MODULES:
            raise RemoteInputError(
                f"the body uses the module `{value.__name__}` (as `{name}`); remote bodies may use only "
                f"{', '.join(MODULES)}."
            )
        request.modules[name] = value.__name__
        return
    if isinstance(value, types.FunctionType):
        request.functions[name] = _function_source(name, value)
        code_names = set(value.__code__.co_names) | set(_nested_names(value.__code__))
        for other in code_names:
            if other in value.__globals__ and other not in request.variables:
                names.append(other)
        return
    if portable.problem(value) is None:
        request.variables[name] = value
        return
    if isinstance(value, (Tracer, BlockHandle)):
        return  # the handle of a block (the `as` name of a trace or session): it stays here
    raise RemoteInputError(
        f"the body uses `{name}`, a {type(value).__name__}, which cannot be sent to a seethrough server. "
        "Remote bodies can use tensors, numbers, strings, lists/tuples/dicts of those, modules of the "
        "traced model, helper functions, and torch/math/einops."
    )


def _registered(name: str, value: Any, request: Request) -> None:
    """A registered module, or a function or class defined at its top level: the
    name travels as a reference into the module's source, sent with the request."""
    if isinstance(value, types.ModuleType):
        module, attribute = value.__name__, ""
    else:
        module, attribute = value.__module__, value.__name__
        if value.__qualname__ != attribute:
            raise RemoteInputError(
                f"the body uses `{name}` ({value.__qualname__} of the registered module {module}), which is not "
                "defined at the top level of its module, so it cannot be found in the module's source on the "
                "server. Use a top-level function or class.")
    if not valid_module_name(module):
        raise RemoteInputError(f"the registered module {module!r} has a private or invalid name; it cannot "
                               "travel to a server (rename it without a leading underscore).")
    try:
        for other, entry in registry.module_sources([module]).items():
            request.packages.setdefault(other, entry)
    except registry.RegistrationError as error:
        raise RemoteInputError(str(error)) from None
    request.imports[name] = (module, attribute)


def _nested_names(code: types.CodeType) -> list[str]:
    out: list[str] = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.extend(const.co_names)
            out.extend(_nested_names(const))
    return out


def _function_source(name: str, function: types.FunctionType) -> str:
    if function.__closure__:
        raise RemoteInputError(
            f"the helper function `{name}` uses variables of an enclosing function (a closure), which "
            "cannot be sent to a server; define it at module level or pass those values as arguments."
        )
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        raise RemoteInputError(f"the source of the helper function `{name}` cannot be found, so it cannot be sent to a server.") from None
    if function.__name__ != name:
        source += f"\n{name} = {function.__name__}\n"
    return source


def _check_portable(value: Any, what: str) -> None:
    found = portable.problem(value, what)
    if found is not None:
        raise RemoteInputError(
            f"{what} cannot be sent to a seethrough server ({found}): use strings, token ids, tensors, numbers, "
            "and lists/dicts of those."
        )
