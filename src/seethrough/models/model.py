"""``seethrough.Model``: wrap any ``torch.nn.Module``.

.. code-block:: python

    model = seethrough.Model(my_module)
    with model.trace(x):
        hidden = model.encoder.layers[2].output.save()

The wrapper is the root envoy of the module tree, plus the entry points:
``trace``, ``scan``, ``edit``, ``session``.  It never copies the module and
leaves nothing on it between traces: calling the wrapped module outside a
trace is exactly calling the bare module.

Subclasses (``LanguageModel``) change how inputs are prepared and batched and
what a trace calls, by overriding ``_prepare_input``, ``_batch_inputs`` and
``_run_forward``.

Custom envoys (as nnsight 0.8's ``envoys=``): ``Model(module, envoys=X)``
makes every module's envoy an ``X`` (a subclass of
:class:`~seethrough.envoy.Envoy`); ``envoys={torch.nn.Linear: X, "attn": Y}``
chooses per module, by module type (matched along the module class's MRO,
tried first) or by path suffix (dotted, matched part by part, ``*`` for any
one part; a part also matches under its aliases).  A class attribute
``envoys`` on a wrapper subclass is the default for its instances.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..envoy import Envoy
from ..errors import EnvoyClassError, ModulePathError, SeethroughError, TraceSourceError
from ..source import ModuleSource
from ..tracing.capture import capture_with_block
from ..tracing.run import EditSpec, TraceRun
from ..tracing.takeover import Takeover, frame_namespace, write_back
from ..tracing.tracer import Tracer, run_block
from .aliases import split_rename, standard_aliases
from .batching import PreparedInput, concat_inputs, count_rows, to_device

_TRACE_OPTIONS = ("remote", "keep_graph", "host", "blocking", "backend")


class Model(Envoy):
    """Wraps any ``torch.nn.Module`` for tracing (see the module docs)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        rename: dict[str, str] | None = None,
        standard_names: bool = True,
        envoys: Any = None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"seethrough.Model wraps a torch.nn.Module, not a {type(module).__name__}.")
        super().__init__(module, "", None)
        if envoys is None:
            envoys = _class_envoys(type(self))
        object.__setattr__(self, "_envoys", _check_envoys(envoys))
        paths, names = standard_aliases(module) if standard_names else ({}, {})
        if rename:
            extra_paths, extra_names = split_rename(rename)
            paths.update(extra_paths)
            names.update(extra_names)
        object.__setattr__(self, "_path_aliases", paths)
        object.__setattr__(self, "_name_aliases", names)
        object.__setattr__(self, "_edits", [])

    # -- the wrapped module -------------------------------------------------------
    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped module itself (never a copy)."""
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module, exactly as without the wrapper."""
        return self._module(*args, **kwargs)

    @property
    def device(self) -> torch.device | None:
        """The device of the model's first parameter (or buffer)."""
        probe = self.__dict__.get("_device_probe")
        if probe is None:
            probe = next(self._module.parameters(), None)
            if probe is None:
                probe = next(self._module.buffers(), None)
            if probe is None:
                return None
            object.__setattr__(self, "_device_probe", probe)
        return probe.device

    def _source_view(self, envoy: Envoy) -> ModuleSource:
        """``envoy.source`` (one per envoy; see :mod:`seethrough.source`)."""
        view = envoy.__dict__.get("_source")
        if view is None:
            view = envoy.__dict__["_source"] = ModuleSource(envoy)
        view._touch()
        return view

    def _hook_plan(self, module: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple]]:
        """``(module, output key)`` for ``module`` and every module containing
        it: whose outputs get hooked together (see ``Interleaver.hook``)."""
        plans = self.__dict__.get("_hook_plans")
        if plans is None:
            plans = {}
            object.__setattr__(self, "_hook_plans", plans)
        found = plans.get(id(module))
        if found is not None and found[0][0] is module:
            return found
        plan = [(each, (id(each), "output")) for each in (module, *self._ancestors(module))]
        plans[id(module)] = plan
        return plan

    def _ancestors(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """Every module that (transitively) contains ``module``."""
        cache = self.__dict__.get("_ancestor_cache")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_ancestor_cache", cache)
        found_list = cache.get(id(module))
        if found_list is not None and found_list[0] is module:
            return found_list[1]
        parents = self.__dict__.get("_parent_map")
        if parents is None or id(module) not in parents:
            parents = {}
            for parent in self._module.modules():
                for child in parent._modules.values():
                    if child is not None:
                        parents.setdefault(id(child), []).append(parent)
            parents.setdefault(id(self._module), [])
            object.__setattr__(self, "_parent_map", parents)
        found: dict[int, torch.nn.Module] = {}
        stack = list(parents.get(id(module), ()))
        while stack:
            parent = stack.pop()
            if id(parent) not in found:
                found[id(parent)] = parent
                stack.extend(parents.get(id(parent), ()))
        result = list(found.values())
        cache[id(module)] = (module, result)
        return result

    # -- custom envoys --------------------------------------------------------------
    def _envoy_class(self, module: torch.nn.Module, path: str) -> type[Envoy]:
        """The envoy class ``envoys=`` gives the module at ``path``."""
        mapping = self._envoys
        if mapping is None:
            return Envoy
        if isinstance(mapping, type):
            return mapping
        for klass in type(module).__mro__:
            found = mapping.get(klass)
            if found is not None:
                return found
        keys = [(key, value) for key, value in mapping.items() if isinstance(key, str)]
        if not keys:
            return Envoy
        parts = path.split(".") if path else []
        native = ["model", *parts]  # nnsight's paths start at the root, "model"
        for key, value in keys:  # the native path first
            if _suffix_matches(native, key, None):
                return value
        spellings = self._spellings(parts)
        for key, value in keys:
            if any(_suffix_matches(spelled, key, self._name_aliases) for spelled in spellings):
                return value
        return Envoy

    def _spellings(self, parts: list[str]) -> list[list[str]]:
        """``parts`` as written from the root, and with a root path alias
        (``layers`` for ``transformer.h``) in place of the path it stands for."""
        out = [["model", *parts]]
        for alias, real in self._path_aliases.items():
            real_parts = real.split(".")
            if parts[: len(real_parts)] == real_parts:
                out.append(["model", alias, *parts[len(real_parts):]])
        return out

    # -- aliases ------------------------------------------------------------------
    def _resolve_alias(self, envoy: Envoy, name: str) -> Envoy | None:
        if envoy is self or envoy._path == "":
            path = self._path_aliases.get(name)
            if path is not None:
                return self._envoy_at(path)
        candidates = self._name_aliases.get(name)
        if candidates:
            modules = envoy._module._modules
            for real in candidates:
                if real != name and real in modules and modules[real] is not None:
                    return envoy._child(real)
        return None

    def _alias_names(self, envoy: Envoy) -> list[str]:
        names = list(self._path_aliases) if envoy._path == "" else []
        modules = envoy._module._modules
        names += [alias for alias, reals in self._name_aliases.items() if any(r in modules and r != alias for r in reals)]
        return names

    def _envoy_at(self, path: str) -> Envoy:
        envoy: Envoy = self
        for part in path.split(".") if path else ():
            if part not in envoy._module._modules:
                raise ModulePathError(f"`model.{path}`: no module `{part}` under `{envoy._display_path()}`.")
            envoy = envoy._child(part)
        return envoy

    def _resolve_modules(self, modules: Any) -> list[Envoy]:
        """Envoys for ``modules``: None (all), envoys, or path strings."""
        if modules is None:
            return list(self.modules())
        if isinstance(modules, (Envoy, str)):
            modules = [modules]
        out: list[Envoy] = []
        for item in modules:
            if isinstance(item, Envoy):
                out.append(item)
            elif isinstance(item, str):
                path = item[6:] if item.startswith("model.") else ("" if item == "model" else item)
                out.append(self._envoy_at(path))
            else:
                raise TypeError(f"modules must be envoys or paths like 'model.layers.0', not {type(item).__name__}.")
        return out

    # -- inputs (overridden by LanguageModel) ---------------------------------------
    def _prepare_input(self, args: tuple, kwargs: dict) -> PreparedInput:
        device = self.device
        if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor:
            # The common case, kept cheap: one tensor input.
            x = args[0]
            if device is not None and x.device != device:
                x = x.to(device)
            return PreparedInput((x,), kwargs, int(x.shape[0]) if x.dim() else 1)
        if device is not None:
            args = tuple(to_device(a, device) for a in args)
            if kwargs:
                kwargs = {k: to_device(v, device) for k, v in kwargs.items()}
        return PreparedInput(args, kwargs, count_rows(args, kwargs))

    def _batch_inputs(self, prepared: list[PreparedInput]) -> tuple[tuple, dict]:
        return concat_inputs(prepared)

    def _run_forward(self, args: tuple, kwargs: dict) -> Any:
        return self._module(*args, **kwargs)

    # -- entry points ------------------------------------------------------------
    def trace(
        self,
        *args: Any,
        remote: bool | str = False,
        keep_graph: bool = True,
        host: str | None = None,
        api_key: str | None = None,
        blocking: bool = True,
        trace: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``with model.trace(*inputs) as tracer:`` — run the model on the inputs
        (or on the inputs of the ``tracer.invoke`` blocks in the body) and give
        the body access to every module's values.  Keyword arguments other than
        the options below go to the model's forward.

        Saved tensors are the live tensors, autograd graph included when grad
        is enabled (``lg.sum().backward()`` after the trace trains parameters);
        ``keep_graph=False`` detaches them when the trace ends, freeing the
        graph at once.  ``remote=True`` runs the block
        on a seethrough server (``host``/``api_key`` override ``CONFIG``;
        ``blocking=False`` returns at once, with ``tracer.job`` the handle);
        ``remote="local"`` runs the server's steps (wire, sandbox, execution)
        in this process, to check a body before submitting it.
        ``trace=False`` (no ``with`` block) runs the model on the inputs,
        prepared as a trace prepares them, and returns its output."""
        if not trace:
            return self._call_untraced(args, kwargs, remote)
        return Tracer(
            self, args, kwargs, _forward_backend, has_input=bool(args or kwargs), keep_graph=keep_graph,
            remote=_remote_options(remote, host, api_key, blocking, self.__dict__.get("_remote_host")),
        )

    def _call_untraced(self, args: tuple, kwargs: dict, remote: bool | str) -> Any:
        if remote:
            raise SeethroughError(
                "`trace=False` runs the model here and returns its output; it does not combine "
                f"with `remote={remote!r}`. Use a remote trace and save `model.output` instead."
            )
        if not (args or kwargs):
            raise SeethroughError("`model.trace(..., trace=False)` needs the input to run the model on.")
        prepared = self._prepare_input(args, kwargs)
        return self._run_forward(prepared.args, prepared.kwargs)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """``with model.scan(input):`` — like ``trace``, but on fake tensors: the
        body sees real shapes and dtypes, nothing is computed, weights are not
        touched.  Cheap checks of a trace before running it for real."""
        return Tracer(self, args, kwargs, _scan_backend, has_input=bool(args or kwargs), what="model.scan(...)")

    def edit(self, *, inplace: bool = False) -> "EditContext":
        """``with model.edit() as edited:`` — record the body as an intervention
        that every trace of ``edited`` applies (the original model is untouched;
        ``inplace=True`` adds it to this model instead)."""
        return EditContext(self, inplace)

    def clear_edits(self) -> None:
        """Forget every intervention added with ``model.edit(...)``."""
        self._edits.clear()

    def session(
        self, *, remote: bool | str = False, host: str | None = None, api_key: str | None = None, blocking: bool = True
    ) -> "Session":
        """``with model.session():`` — group several traces; values saved in one
        are used by the next.  With ``remote=True`` the whole block is one
        request to the server (``remote="local"``: checked and run as a server
        would, in this process)."""
        return Session(self, _remote_options(remote, host, api_key, blocking, self.__dict__.get("_remote_host")))

    def _clone(self) -> "Model":
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        object.__setattr__(clone, "_root", clone)
        object.__setattr__(clone, "_children", {})
        object.__setattr__(clone, "_edits", list(self._edits))
        return clone


def _class_envoys(cls: type) -> Any:
    """The ``envoys`` class attribute of a wrapper subclass (its default)."""
    for klass in cls.__mro__:
        found = klass.__dict__.get("envoys")
        if found is not None:
            return found
    return None


def _check_envoys(envoys: Any) -> Any:
    """``envoys=`` as given, once checked: an Envoy subclass, or a mapping from
    module types or path suffixes to Envoy subclasses."""
    if envoys is None:
        return None
    if isinstance(envoys, type):
        if not issubclass(envoys, Envoy):
            raise EnvoyClassError(f"envoys={envoys.__name__}: the class must be a subclass of seethrough.Envoy.")
        return envoys
    if not isinstance(envoys, dict):
        raise EnvoyClassError(
            f"envoys= takes an Envoy subclass or a dict from module types or path suffixes to Envoy subclasses, "
            f"not a {type(envoys).__name__}."
        )
    for key, value in envoys.items():
        if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, torch.nn.Module))):
            raise EnvoyClassError(
                f"envoys={{{key!r}: ...}}: keys are module types (torch.nn.Linear) or dotted path suffixes "
                "('self_attn', 'layers.*')."
            )
        if not (isinstance(value, type) and issubclass(value, Envoy)):
            raise EnvoyClassError(f"envoys={{{key!r}: {value!r}}}: the value must be a subclass of seethrough.Envoy.")
    return dict(envoys)


def _suffix_matches(parts: list[str], key: str, names: dict | None) -> bool:
    """Does the dotted ``key`` match the end of ``parts``, part by part (``*``
    matches any one part; with ``names``, a part also matches its aliases)?"""
    key_parts = key.lstrip(".").split(".")
    if not key_parts[0] or len(key_parts) > len(parts):
        return False
    for part, wanted in zip(parts[len(parts) - len(key_parts):], key_parts):
        if wanted == "*" or wanted == part:
            continue
        if names is None or part not in names.get(wanted, ()):
            return False
    return True


def _forward_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    return run.model._run_forward(args, kwargs)


_forward_backend.single_call = True  # type: ignore[attr-defined]  # calls the root module once


def _scan_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(value: Any) -> Any:
        return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    with mode:
        fake_args = tree_map(fake, args)
        fake_kwargs = tree_map(fake, kwargs)
        return run.model._run_forward(fake_args, fake_kwargs)


_scan_backend.single_call = True  # type: ignore[attr-defined]


class EditContext:
    """``with model.edit() as edited:`` (see :meth:`Model.edit`)."""

    def __init__(self, model: Model, inplace: bool) -> None:
        self._model = model
        self._inplace = inplace
        self._takeover: Takeover | None = None

    def __enter__(self) -> Model:
        self._takeover = Takeover.of_block(sys._getframe(1), "model.edit()")
        return self._model

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        if not takeover.end(exc_type):
            return False
        frame, captured = takeover.frame, takeover.captured
        seed, globals_, _ = frame_namespace(frame)
        target = self._model if self._inplace else self._model._clone()
        target._edits.append(EditSpec(captured, seed, globals_))
        if captured.as_name:
            write_back(frame, {captured.as_name: target})
        return True


def _remote_options(
    remote: bool | str, host: str | None, api_key: str | None, blocking: bool, default_host: str | None = None
) -> Any:
    if remote is not None and not isinstance(remote, bool) and remote != "local":
        raise SeethroughError(
            f"remote={remote!r}: use remote=True (run on a seethrough server), remote='local' (the server's "
            "checks and execution, in this process), or remote=False."
        )
    if not remote:
        if host is not None or not blocking:
            raise SeethroughError("`host=` and `blocking=False` only apply with `remote=True`.")
        return None
    from ..remote.backend import RemoteOptions

    if remote == "local":
        if host is not None or not blocking:
            raise SeethroughError(
                "remote='local' runs the request in this process, with no server: `host=` and `blocking=False` "
                "do not apply (use remote=True for a server)."
            )
        return RemoteOptions(local=True)
    return RemoteOptions(host=host or default_host, api_key=api_key, blocking=blocking)


def _has_rewritten_saves(frame: Any) -> bool:
    try:
        return capture_with_block(frame, "model.session()").rewrote_saves
    except TraceSourceError:  # no source, or `return` in the block: it runs natively
        return False


class Session:
    """``with model.session():`` — several traces as one unit of work.

    Locally the traces simply run one after the other, and values saved in one
    are plain variables in the next (a block with ``X.save()`` calls runs from
    its compiled source, like a trace body, so that ``.save()`` works on any
    value at session level too).  Remotely (``remote=True``) the whole
    block is captured and sent as one request: the traces inside run on the
    server, and the names the block assigns come back."""

    def __init__(self, model: Model, remote: Any = None) -> None:
        self._model = model
        self._remote = remote
        self._takeover: Takeover | None = None
        self.job: Any = None

    def __enter__(self) -> "Session":
        frame = sys._getframe(1)
        if self._remote is not None:
            self._takeover = Takeover.of_block(frame, "model.session()")
        elif _has_rewritten_saves(frame):
            # `found = [].save()` at session level: run the block's compiled
            # source, like a trace body; other sessions run as plain Python.
            self._takeover = Takeover.of_block(frame, "model.session()")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        if takeover is None:
            return False
        if not takeover.end(exc_type):
            return False
        if self._remote is None:
            run_block(takeover.captured, takeover.frame, (self,))
            return True
        from ..remote.backend import run_remote

        run_remote(options=self._remote, kind="session", model=self._model, captured=takeover.captured,
                   frame=takeover.frame, holder=self)
        return True

    def log(self, *values: Any) -> None:
        print(*values)

    def __repr__(self) -> str:
        return f"<Session on {type(self._model._module).__name__}>"
