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
one part; a part also matches under the user's ``rename=`` aliases, never
under seethrough's standard names: ``"attn"`` is a module named ``attn``).
A class attribute ``envoys`` on a wrapper subclass is the default for its
instances, used unless the caller passes ``envoys=`` (``envoys=None``: plain
envoys throughout).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..envoy import Envoy, cached_children
from .._frames import describe_location, hide_library_frames
from ..errors import EnvoyClassError, ModulePathError, SeethroughError, TraceSourceError, UsageTypeError
from ..remote.client.backend import RemoteOptions, run_remote
from ..remote.client.collect import BlockHandle
from ..source import ModuleSource, source_view
from ..tracing.capture import capture_with_block
from ..tracing.contract import HookPlan
from ..tracing.hooks import ModuleTree
from ..tracing.run import EditSpec
from ..tracing.runtime import current_task
from ..tracing.takeover import Takeover, frame_namespace, write_back
from ..tracing.saving import LazyText
from ..tracing.tracer import SessionScope, Tracer, enter_session, exit_session, run_block
from .aliases import has_path, parse_rename, standard_aliases
from .backends import forward_backend, scan_backend
from .batching import PreparedInput, concat_inputs, count_rows, to_device

_TRACE_OPTIONS = ("remote", "keep_graph", "host", "blocking", "backend")


class _ClassEnvoys:
    """The default of ``envoys=``: the wrapper class's ``envoys`` attribute."""

    def __repr__(self) -> str:
        return "<the wrapper class's `envoys` attribute>"


CLASS_ENVOYS: Any = _ClassEnvoys()


class Model(Envoy, library=True):
    """Wraps any ``torch.nn.Module`` for tracing (see the module docs)."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        rename: dict[str, str] | None = None,
        standard_names: bool = True,
        envoys: Any = CLASS_ENVOYS,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise UsageTypeError(f"seethrough.Model wraps a torch.nn.Module, not a {type(module).__name__}.")
        super().__init__(module, "", None)
        if envoys is CLASS_ENVOYS:
            envoys = _class_envoys(type(self))
        object.__setattr__(self, "_envoys", _check_envoys(envoys))
        paths, names = standard_aliases(module) if standard_names else ({}, {})
        # An alias may not hide what every wrapper answers to (`output`, `trace`, ...).
        taken = frozenset(name for name in dir(type(self)) if not name.startswith("_"))
        rules = parse_rename(rename, taken) if rename else []
        for parts, alias in rules:  # also as the plain maps `envoys=` keys are matched with
            if len(parts) == 1:
                names[alias] = parts
            elif has_path(module, ".".join(parts)):
                paths[alias] = ".".join(parts)
        object.__setattr__(self, "_path_aliases", paths)
        object.__setattr__(self, "_name_aliases", names)
        object.__setattr__(self, "_rename_rules", rules)
        object.__setattr__(self, "_envoy_aliases", _rename_aliases(rules, module))
        object.__setattr__(self, "_edits", [])

    # -- the wrapped module -------------------------------------------------------
    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped module itself (never a copy)."""
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module, exactly as without the wrapper."""
        return self._module(*args, **kwargs)

    # -- module methods that return the module: here they return the wrapper,
    # so `NNsight(net).to("cpu").trace(...)` keeps working.
    def to(self, *args: Any, **kwargs: Any) -> "Model":
        """``module.to(...)`` on the wrapped module; returns this wrapper."""
        self._module.to(*args, **kwargs)
        return self

    def cpu(self) -> "Model":
        """Move the wrapped module to the CPU; returns this wrapper."""
        return self.to("cpu")

    def cuda(self, device: Any = None) -> "Model":
        """Move the wrapped module to a GPU; returns this wrapper."""
        self._module.cuda(device)
        return self

    def train(self, mode: bool = True) -> "Model":
        """``module.train(mode)`` on the wrapped module; returns this wrapper."""
        self._module.train(mode)
        return self

    def eval(self) -> "Model":
        """``module.eval()`` on the wrapped module; returns this wrapper."""
        return self.train(False)

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

    def _detached_root(self) -> "Model":
        """A copy of this wrapper's settings (envoy classes, aliases, the
        module) without its envoys, made once: child envoys hold it (and this
        wrapper only weakly), so a child kept after the wrapper is dropped
        still resolves its own children and aliases (see ``envoy._RootLink``)."""
        state = self.__dict__
        if state.get("_is_detached_copy"):
            return self
        detached = state.get("_detached")
        if detached is None:
            detached = type(self).__new__(type(self))
            detached.__dict__.update(
                (name, value) for name, value in state.items()
                if name.startswith("_") and name not in ("_children", "_source", "_detached")
                and not _holds_envoys(value)  # (public attributes are a subclass's own, not settings)
            )
            object.__setattr__(detached, "_children", {})
            object.__setattr__(detached, "_is_detached_copy", True)  # a root: its `_root` is itself
            object.__setattr__(self, "_detached", detached)
        return detached

    def _source_view(self, envoy: Envoy) -> ModuleSource:
        """``envoy.source`` (one per envoy; see :mod:`seethrough.source`)."""
        return source_view(envoy)

    def _hook_plan(self, module: torch.nn.Module) -> HookPlan:
        """The hook plan of ``module`` (see :class:`~seethrough.tracing.hooks.ModuleTree`),
        from a tree of the wrapped module kept across traces."""
        tree = self.__dict__.get("_module_tree")
        if tree is None or tree.root is not self._module:
            tree = ModuleTree(self._module)
            object.__setattr__(self, "_module_tree", tree)
        return tree.hook_plan(module)

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
        paths, names = self._envoy_aliases  # the user's rename= only, as nnsight
        if not paths and not names:
            return Envoy
        spellings = self._spellings(parts, paths)
        for key, value in keys:
            if any(_suffix_matches(spelled, key, names) for spelled in spellings):
                return value
        return Envoy

    @staticmethod
    def _spellings(parts: list[str], paths: dict[str, str]) -> list[list[str]]:
        """``parts`` as written from the root, and with a root path alias
        (``layers`` for ``transformer.h``) in place of the path it stands for."""
        out = [["model", *parts]]
        for alias, real in paths.items():
            real_parts = real.split(".")
            if parts[: len(real_parts)] == real_parts:
                out.append(["model", alias, *parts[len(real_parts):]])
        return out

    # -- aliases ------------------------------------------------------------------
    def _resolve_alias(self, envoy: Envoy, name: str) -> Envoy | None:
        found = self._renamed(envoy, name, set())  # the user's rename= first
        if found is not None:
            return found
        if envoy is self or envoy._path == "":
            path = self._path_aliases.get(name)
            if path is not None:
                return envoy_at(self, path)
        candidates = self._name_aliases.get(name)
        if candidates:
            modules = envoy._module._modules
            for real in candidates:
                if real != name and real in modules and modules[real] is not None:
                    return envoy._child(real)
        return None

    def _renamed(self, envoy: Envoy, name: str, active: set[tuple[int, str]]) -> Envoy | None:
        """The envoy a ``rename=`` alias ``name`` names under ``envoy``, or None.

        A key's parts are real child names or, as nnsight resolves them, other
        ``rename=`` aliases (``{"transformer": "model", "ln_f": "ln_final",
        "model.ln_final": "ln_final"}`` gives ``model.ln_final`` on GPT-2), in
        any order; ``active`` stops a cycle of aliases naming each other."""
        key = (id(envoy), name)
        if key in active:
            return None
        active.add(key)
        try:
            for parts, alias in self._rename_rules:
                if alias == name:
                    found = self._walk_renamed(envoy, parts, active)
                    if found is not None:
                        return found
            return None
        finally:
            active.discard(key)

    def _walk_renamed(self, envoy: Envoy, parts: tuple[str, ...], active: set[tuple[int, str]]) -> Envoy | None:
        """The envoy ``parts`` (child names or ``rename=`` aliases) lead to from ``envoy``, or None."""
        for part in parts:
            modules = envoy._module._modules
            if modules.get(part) is not None:
                envoy = envoy._child(part)
                continue
            found = self._renamed(envoy, part, active)
            if found is None:
                return None
            envoy = found
        return envoy

    def _alias_names(self, envoy: Envoy) -> list[str]:
        names = list(self._path_aliases) if envoy._path == "" else []
        names += [alias for parts, alias in self._rename_rules if self._walk_renamed(envoy, parts, set()) is not None]
        modules = envoy._module._modules
        names += [alias for alias, reals in self._name_aliases.items() if any(r in modules and r != alias for r in reals)]
        return names

    def _real_path(self, key: str) -> str | None:
        """The real path a string names, read as on the model: ``model`` is the
        root, then child names, indices and aliases (``'model.layers.0'``).
        A root that has a child called ``model`` is tried both ways."""
        relative = "" if key == "model" else (key[6:] if key.startswith("model.") else key)
        attempts = [relative.split(".") if relative else []]
        if key.startswith("model."):
            attempts.append(key.split("."))
        for parts in attempts:
            path: str | None = ""
            for part in parts:
                path = self._child_path(path, part)
                if path is None:
                    break
            if path is not None:
                return path
        return None

    def _child_path(self, path: str, name: str, index_only: bool = False) -> str | None:
        """The real path of ``name`` under the module at real ``path``: a child
        name, an index (``-1`` counts from the end), a ``child_`` for a child
        named like an accessor, or an alias; None if it names nothing (with
        ``index_only``, only indices of a container count)."""
        try:
            envoy = envoy_at(self, path)
        except ModulePathError:
            return None
        modules = envoy._module._modules
        if name.startswith("-") and name[1:].isdigit():
            name = str(int(name) + len(modules))
        if name in modules and modules[name] is not None:
            return f"{path}.{name}" if path else name
        if index_only or name.lstrip("-").isdigit():
            return None
        if name.endswith("_") and name[:-1] in modules and modules[name[:-1]] is not None:
            return f"{path}.{name[:-1]}" if path else name[:-1]
        found = self._resolve_alias(envoy, name)
        return found._path if found is not None else None

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
                path = self._real_path(item)
                if path is None:
                    raise ModulePathError(
                        f"`{item}` names no module of the model: use a path like 'model.layers.0' "
                        "(module names, indices and aliases as on the model), or pass the envoy itself."
                    )
                out.append(envoy_at(self, path))
            else:
                raise UsageTypeError(f"modules must be envoys or paths like 'model.layers.0', not {type(item).__name__}.")
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
        scan: bool = False,
        validate: bool = False,
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
        prepared as a trace prepares them, and returns its output.
        ``scan=True`` (or nnsight's ``validate=True``) first runs the body as
        :meth:`scan` does, on fake tensors, so a mistake fails before any real
        compute; then the trace runs for real and only that run's values are
        handed back."""
        if not trace:
            return self._call_untraced(args, kwargs, remote)
        if remote is False and host is None and blocking is True:
            options = None  # a local trace (`_remote_options` would say the same), the common case
        else:
            options = _remote_options(remote, host, api_key, blocking, self.__dict__.get("_remote_host"))
        return Tracer(
            self, args, kwargs, forward_backend, has_input=bool(args or kwargs), keep_graph=keep_graph,
            remote=options,
            pre_scan=self._scan_backend() if scan or validate else None,
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

    def _scan_backend(self) -> Any:
        """The backend ``scan`` runs with (language models choose by loading state)."""
        return scan_backend

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """``with model.scan(input):`` — like ``trace``, but on fake tensors: the
        body sees real shapes and dtypes, nothing is computed, weights are not
        touched.  Cheap checks of a trace before running it for real."""
        return Tracer(self, args, kwargs, self._scan_backend(), has_input=bool(args or kwargs), what="model.scan(...)")

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

    def _run_remote(self, **request: Any) -> dict[str, Any]:
        """Run a captured block of this model on a server (or ``remote="local"``)
        and bind its values in the caller's frame: what a tracer or session
        entered with ``remote=`` does on leaving its block.  Takes the keyword
        arguments of :func:`seethrough.remote.client.backend.run_remote` but ``model``."""
        try:
            return run_remote(model=self, **request)
        except ModulePathError as error:
            hinted = _custom_envoy_hint(error, self._envoys)
            if hinted is None:
                raise
            raise hinted from None

    @property
    def remote_name(self) -> str | None:
        """The name a seethrough server serves this model under (``remote=True``);
        None for a wrapper of a module object, which no server knows by name."""
        return None


def fresh_copy(model: Model) -> Model:
    """A wrapper of the same module, settings and persistent edits as ``model``,
    with envoys and an edit list of its own: what ``edit(inplace=False)``
    edits, and what a server runs each request on (so that ``edit`` and
    friends in one request cannot reach the next)."""
    clone = type(model).__new__(type(model))
    clone.__dict__.update(model.__dict__)
    for name in cached_children(model):  # the clone makes its own child envoys
        del clone.__dict__[name]
    clone.__dict__.pop("_root_ref", None)  # the clone is a root: `_root` is itself
    clone.__dict__.pop("_detached", None)  # and makes its own detached copy
    object.__setattr__(clone, "_children", {})
    object.__setattr__(clone, "_edits", list(model._edits))
    return clone


def envoy_at(model: Model, path: str) -> Envoy:
    """The envoy of the submodule at the dotted ``path`` below ``model`` (``""``:
    ``model`` itself), by submodule names only (no aliases, no ``.output``):
    what a server resolves a request's envoy paths with."""
    envoy: Envoy = model
    for part in path.split(".") if path else ():
        if part not in envoy._module._modules:
            raise ModulePathError(f"`model.{path}`: no module `{part}` under `{envoy._display_path()}`.")
        envoy = envoy._child(part)
    return envoy


def _holds_envoys(value: Any) -> bool:
    """An envoy, or a list, tuple, set or dict with one (what a detached copy
    of the wrapper must not hold: its envoys hold the copy)."""
    if isinstance(value, Envoy):
        return True
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple, set, frozenset)):
        return False
    return any(isinstance(item, Envoy) for item in value)


def _rename_aliases(rules: list, module: torch.nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """The ``rename=`` aliases alone, as (root path aliases, child name aliases):
    what ``envoys=`` path keys may be spelled with besides the real names."""
    paths: dict[str, str] = {}
    names: dict[str, tuple[str, ...]] = {}
    for parts, alias in rules:
        if len(parts) == 1:
            names[alias] = names.get(alias, ()) + parts
        elif has_path(module, ".".join(parts)):
            paths[alias] = ".".join(parts)
    return paths, names


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


class _ApplyingTracer:
    """``tracer`` of ``with model.edit() as (tracer, edited):``: stands for the
    tracer of whichever trace applies the edit (``tracer.all()``, ``.iter``)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        task = current_task()
        if task is None or task.run is None:
            raise SeethroughError(
                f"`tracer.{name}` of `with model.edit() as (tracer, edited)` works inside the edit's "
                "body, where it stands for the tracer of each trace that applies the edit."
            )
        return getattr(task.run.tracer, name)

    def __repr__(self) -> str:
        return "<the tracer of each trace that applies this edit>"


class EditContext:
    """``with model.edit() as edited:`` or nnsight 0.8's
    ``with model.edit() as (tracer, edited):`` (see :meth:`Model.edit`).  The
    body may use ``edited`` (or ``model``) and ``tracer``."""

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
        target = self._model if self._inplace else fresh_copy(self._model)
        names: dict[str, Any] = {}
        if captured.as_name:
            names[captured.as_name] = target
        elif captured.as_names:
            names[captured.as_names[0]] = _ApplyingTracer()
            names[captured.as_names[1]] = target
        # What the edit keeps of its frame: the names its body uses, except
        # those bound to the wrapper that holds the edit (bound again at
        # each run, see EditSpec: no cycle keeps a dropped wrapper alive).
        seed.update(names)  # the body may use what `as` binds
        used = captured.loaded | captured.stored
        self_names = tuple(name for name in used if name in seed and seed[name] is target)
        kept = {name: value for name, value in seed.items() if name in used and value is not target}
        target._edits.append(EditSpec(captured, kept, globals_, target, self_names))
        write_back(frame, names)
        return True


def _custom_envoy_hint(error: ModulePathError, envoys: Any) -> ModulePathError | None:
    """The server's "no such attribute" for a name the user's own envoy classes
    (``envoys=``) define: say why (the server's envoys are the base class)."""
    if envoys is None:
        return None
    classes = [envoys] if isinstance(envoys, type) else list(envoys.values())
    message = str(error)
    for klass in classes:
        for owner in klass.__mro__:
            if owner is Envoy:  # (and what it derives from): the server has these
                break
            for name in owner.__dict__:
                if not name.startswith("_") and f"attribute `{name}`" in message:
                    return ModulePathError(
                        f"{message}\n`{name}` is defined by your envoy class {owner.__name__} (`envoys=`), which "
                        "runs only on your machine: a server's envoys are seethrough's own. In a remote body, "
                        "compute it from `.output`/`.input` (in the body, or a helper function that travels)."
                    )
    return None


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


class Session(BlockHandle):
    """``with model.session():`` — several traces as one unit of work.

    Locally the traces simply run one after the other.  As in nnsight, a value
    a trace computes in the session is usable in the session's later traces
    without ``.save()``; only what leaves the session needs saving (unsaved
    values still bound in the session's scope when it ends become
    :class:`NotSaved` placeholders).  A block with ``X.save()`` calls runs
    from its compiled source, like a trace body, so that ``.save()`` works on
    any value at session level too.  Remotely (``remote=True``) the whole
    block is captured and sent as one request: the traces inside run on the
    server, and the names the block assigns come back."""

    def __init__(self, model: Model, remote: Any = None) -> None:
        self._model = model
        self._remote = remote
        self._takeover: Takeover | None = None
        self._scope: SessionScope | None = None
        self.job: Any = None

    def __enter__(self) -> "Session":
        frame = sys._getframe(1)
        if self._remote is not None:
            self._takeover = Takeover.of_block(frame, "model.session()")
            return self
        code, line = frame.f_code, frame.f_lineno
        where = LazyText(lambda: describe_location(code.co_filename, line))
        if _has_rewritten_saves(frame):
            # `found = [].save()` at session level: run the block's compiled
            # source, like a trace body (in a namespace of its own, so its
            # traces' frames are not this one); other sessions run as plain Python.
            self._takeover = Takeover.of_block(frame, "model.session()")
            self._scope = SessionScope(None, where)
        else:
            self._scope = SessionScope(frame, where)
        enter_session(self._scope)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        scope, self._scope = self._scope, None
        if scope is not None:  # local
            frame = takeover.frame if takeover is not None else scope.frame
            try:
                if takeover is None or not takeover.end(exc_type):
                    return False
                try:
                    run_block(takeover.captured, takeover.frame, (self,))
                except BaseException as error:
                    hide_library_frames(error)  # this frame, added on the way out of run_block
                    raise
                return True
            finally:
                exit_session(scope)
                # Unsaved values lent to the session's scope do not outlive it.
                snapshot, globals_, module_level = frame_namespace(frame)
                write_back(frame, scope.leaving(globals_ if module_level else snapshot))
        if takeover is None or not takeover.end(exc_type):
            return False
        self._model._run_remote(options=self._remote, kind="session", captured=takeover.captured,
                                frame=takeover.frame, holder=self)
        return True

    def log(self, *values: Any) -> None:
        print(*values)

    def __repr__(self) -> str:
        return f"<Session on {type(self._model._module).__name__}>"
