"""Envoys: stand-ins for the modules of a wrapped model.

``model.transformer.h[3]`` is the envoy of that submodule.  Envoys mirror the
module tree (attribute access, indexing, iteration, ``print``) and, inside a
trace, give the real values flowing through their module:

* ``.output`` — the module's output (assign to replace it, edit in place to
  change it);
* ``.input`` — its first argument; ``.inputs`` — ``(args, kwargs)``;
* ``.skip(value)`` — do not run the module; use ``value`` as its output;
* ``.next()`` — the call after the current one, for modules called several
  times per forward pass;
* ``.source`` — the operations inside its forward (:mod:`seethrough.source`);
* ``.get("a.b.0")`` — the envoy at a dotted path below this one;
* calling an envoy runs its module on your own data; ``hook=True`` lets the
  trace watch that call (bodies waiting for its submodules' values get them).

Custom envoys: subclass :class:`Envoy` (add properties and methods built on
``.output``/``.input``), and give them to modules with the wrapper's
``envoys=`` argument (see :class:`~seethrough.models.model.Model`).

A child module whose name collides with these (BERT has a submodule called
``output``) is reachable with a trailing underscore: ``layer.output_``.
Other attributes (``.weight``, ``.config``, methods) are the module's own.
"""

from __future__ import annotations

import difflib
import weakref
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import greenlet
import torch

from ._frames import where_user_is
from .errors import ModulePathError, NotInTraceError, UsageAttributeError, UsageTypeError
from .tracing.contract import HookPlan
from .tracing.runtime import TaskGreenlet, current_run, current_task

_getcurrent = greenlet.getcurrent

RESERVED = frozenset({"output", "input", "inputs", "skip", "next", "path", "source"})


def _task_or_raise(envoy: Any, accessor: str) -> Any:
    task = current_task()
    if task is None:
        raise NotInTraceError(
            f"`{envoy._display_path()}.{accessor}` was used outside a trace "
            f"({where_user_is()}). Module values exist only while the model runs: use it "
            "inside `with model.trace(input):` (and `.save()` what you need afterwards)."
        )
    return task


def _read(envoy: Any, kind: str, accessor: str, skip_calls: int = 0) -> Any:
    """The value ``accessor`` reads from ``envoy``'s module (or operation) in
    the running trace, ``skip_calls`` calls after the current one: the hot
    path of every trace body."""
    current = _getcurrent()
    task = current.task if type(current) is TaskGreenlet else None
    if task is None:
        task = _task_or_raise(envoy, accessor)  # raises NotInTraceError
    run = task.run
    interleaver = run.interleaver
    if kind == "input" and not skip_calls:
        run.prepare_skip(envoy._module)  # the body may skip the call whose input it reads
    value = interleaver.request(task, envoy, kind, skip_current=skip_calls > 0)
    for _ in range(skip_calls - 1):
        value = interleaver.request(task, envoy, kind, skip_current=True)
    if accessor == "input":
        args, kwargs = value
        if args:
            value = args[0]
        elif kwargs:
            value = next(iter(kwargs.values()))
        else:
            value = None
    return value if type(value) is torch.Tensor else run.present(value)


def _check_inputs_pair(path: str, value: Any) -> None:
    """``.inputs`` takes ``(args, kwargs)``, for a module or an operation alike."""
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
        raise UsageTypeError(
            f"`{path}.inputs` must be assigned `(args, kwargs)`: a tuple of "
            "the positional arguments and a dict of keyword arguments."
        )


def _write(envoy: Any, kind: str, accessor: str, value: Any) -> None:
    task = _task_or_raise(envoy, accessor)
    task.run.interleaver.assign(task, envoy, kind, value, accessor)


class ValueAccessor:
    """``.output`` / ``.input`` / ``.inputs``: one definition for a module's
    envoy, a later call of it (:class:`NextCall`) and a ``.source``
    operation.  Reading asks the owner's ``_read_value(kind, accessor)``,
    assigning its ``_write_value(kind, accessor, value)``; ``kind`` is which
    value of the call ("output" or "input"), ``accessor`` the name used."""

    def __init__(self, kind: str, accessor: str, doc: str, read: Any = None, write: Any = None) -> None:
        self.kind = kind
        self.accessor = accessor
        self.__doc__ = doc
        # A module's envoy reads and writes straight through `_read`/`_write`
        # (the hot path of every body); others go through their own methods.
        self.read = read
        self.write = write

    def __get__(self, owner: Any, cls: type | None = None) -> Any:
        if owner is None:
            return self
        if self.read is not None:
            return self.read(owner, self.kind, self.accessor)
        return owner._read_value(self.kind, self.accessor)

    def __set__(self, owner: Any, value: Any) -> None:
        if self.accessor == "inputs":
            _check_inputs_pair(owner._display_path(), value)
        if self.write is not None:
            self.write(owner, self.kind, self.accessor, value)
        else:
            owner._write_value(self.kind, self.accessor, value)

@runtime_checkable
class EnvoyRoot(Protocol):
    """What an envoy asks of the root of its tree, the model wrapper
    (:class:`seethrough.models.Model` implements it; this module may not
    import the wrappers, which are built on envoys)."""

    def _envoy_class(self, module: torch.nn.Module, path: str) -> type["Envoy"]:
        """The envoy class for the module at ``path`` (``envoys=``)."""
        ...

    def _resolve_alias(self, envoy: "Envoy", name: str) -> "Envoy | None":
        """The envoy an alias (``rename=``, standard names) names under ``envoy``."""
        ...

    def _alias_names(self, envoy: "Envoy") -> list[str]:
        """The aliases usable under ``envoy`` (for ``dir()`` and suggestions)."""
        ...

    def _source_view(self, envoy: "Envoy") -> Any:
        """``envoy.source``: the operations of its forward (:mod:`.source`)."""
        ...

    def _detached_root(self) -> "EnvoyRoot":
        """A root with this one's settings that holds neither this root nor
        its envoys: what envoys fall back on once the wrapper is gone."""
        ...


_LIBRARY_CLASSES: set[type] = set()  # Envoy and seethrough's subclasses of it (``library=True``)


class _RootLink:
    """``envoy._root``: the root of the envoy's tree (the wrapper).

    The root owns its envoys (``_children``, top down); an envoy below it
    holds the root only weakly (``_root_ref``), and the root holds no link to
    itself, so the tree has no reference cycle: dropping the wrapper frees it,
    its envoys and its module at once, without waiting for the garbage
    collector.  An envoy that outlives its wrapper (``Model(net).encoder``,
    kept) falls back on a detached copy of the wrapper's settings
    (``_root_state``: envoy classes, aliases), which holds no envoy, so it
    keeps resolving its children and aliases as before.  (A non-data
    descriptor: an instance attribute ``_root`` still wins.)"""

    def __get__(self, envoy: Any, owner: Any = None) -> Any:
        if envoy is None:
            return self
        state = envoy.__dict__
        ref = state.get("_root_ref")
        if ref is None:
            return envoy
        root = ref()
        return root if root is not None else state["_root_state"]


class Envoy:
    """The stand-in for one module of a wrapped model (see the module docs)."""

    _root = _RootLink()

    def __init_subclass__(cls, library: bool = False, **kwargs: Any) -> None:
        """``class Model(Envoy, library=True)``: an envoy class of seethrough's
        own (its attributes are the API); every other subclass is the user's,
        whose own attributes and methods the user may set and read."""
        super().__init_subclass__(**kwargs)
        if library:
            _LIBRARY_CLASSES.add(cls)

    def __init__(self, module: torch.nn.Module, path: str, root: "EnvoyRoot | None" = None) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        if root is not None and root is not self:
            object.__setattr__(self, "_root_ref", weakref.ref(root))
            object.__setattr__(self, "_root_state", root._detached_root())
        object.__setattr__(self, "_children", {})

    # -- the module tree --------------------------------------------------------
    @property
    def path(self) -> str:
        """Dotted path of the module from the root (``""`` for the root)."""
        return self._path

    def _display_path(self) -> str:
        text = "model"
        for part in self._path.split(".") if self._path else ():
            text += f"[{part}]" if part.lstrip("-").isdigit() else f".{part}"
        return text

    def _remembered_hook_plan(self, plan_of: Callable[[torch.nn.Module], HookPlan]) -> HookPlan:
        """See :class:`~seethrough.tracing.contract.ModuleHandle`: kept here, the
        same module tree every trace (worked out again if the module changed)."""
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0][0][0] is not self._module:
            plan = self.__dict__["_plan"] = plan_of(self._module)
        return plan

    def _child(self, name: str) -> "Envoy":
        child = self._children.get(name)
        if child is None:
            module = self._module._modules[name]
            path = f"{self._path}.{name}" if self._path else name
            child = self._root._envoy_class(module, path)(module, path, self._root)
            self._children[name] = child
            if _cacheable(self, name):
                # Found by plain attribute lookup from now on: `model.layer`
                # then skips __getattr__ (and the AttributeError Python
                # raises and formats before calling it), hot in trace bodies.
                self.__dict__[name] = child
        return child

    def _envoy_class(self, module: torch.nn.Module, path: str) -> type["Envoy"]:
        """The envoy class for the module at ``path`` (the wrapper's ``envoys=``
        chooses; a bare envoy tree uses :class:`Envoy` throughout)."""
        return Envoy

    def _detached_root(self) -> "Envoy":
        """See :class:`EnvoyRoot` (a bare envoy tree has no settings to copy)."""
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        found = self._named_envoy(name)
        if found is not None:
            return found
        try:
            value = getattr(self._module, name)
        except AttributeError:
            raise self._unknown(name) from None
        if isinstance(value, torch.Tensor):
            run = current_run()
            if run is not None:
                run.touched_weight(f"{self._display_path()}.{name}", value)
        return value

    def _named_envoy(self, name: str) -> "Envoy | None":
        """The envoy ``name`` names below this one: a submodule (``mlp_`` for a
        submodule named after a reserved word), or an alias; None if neither."""
        modules = self._module._modules
        if name in modules:
            return self._child(name)
        if name.endswith("_") and name[:-1] in RESERVED and name[:-1] in modules:
            return self._child(name[:-1])
        return self._root._resolve_alias(self, name)

    def _unknown(self, name: str) -> ModulePathError:
        defined = _defined_by_subclass(type(self), name)
        if defined is not None:
            # A property of a custom envoy raised AttributeError, so Python
            # tried __getattr__: say that, not "no such submodule".
            return ModulePathError(
                f"`{name}` of `{self._display_path()}` is defined by {defined.__name__}, and reading it raised "
                f"AttributeError inside ({where_user_is()}): look for the failing attribute access in it."
            )
        children = list(self._module._modules)
        aliases = self._root._alias_names(self)
        candidates = list(dict.fromkeys(children + aliases + [a for a in dir(self._module) if not a.startswith("_")]))
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        listing = ", ".join(children[:20]) + (", ..." if len(children) > 20 else "")
        kind = type(self._module).__name__
        available = f" Its submodules: {listing}." if children else " It has no submodules."
        return ModulePathError(
            f"`{self._display_path()}` ({kind}) has no submodule or attribute `{name}`"
            f" ({where_user_is()}).{hint}{available} `print(model)` shows the whole tree."
        )

    def __getitem__(self, key: Any) -> Any:
        if type(key) is int:
            child = self._children.get(key)  # also cached under int keys (hot in loops over layers)
            if child is not None:
                return child
        modules = self._module._modules
        if isinstance(key, slice):
            names = list(modules)[key]
            return [self._child(n) for n in names]
        if isinstance(key, int):
            size = len(modules)
            index = key + size if key < 0 else key
            name = str(index)
            if name not in modules:
                raise ModulePathError(
                    f"`{self._display_path()}[{key}]` does not exist ({where_user_is()}): "
                    f"`{self._display_path()}` has {size} submodules (indices 0 to {size - 1})."
                ) if size else ModulePathError(
                    f"`{self._display_path()}` ({type(self._module).__name__}) cannot be indexed: "
                    f"it has no submodules ({where_user_is()})."
                )
            child = self._child(name)
            self._children[key] = child
            return child
        if isinstance(key, str) and key in modules:
            return self._child(key)
        raise ModulePathError(
            f"`{self._display_path()}[{key!r}]` does not exist ({where_user_is()}); "
            f"its submodules are: {', '.join(modules) or 'none'}."
        )

    def __iter__(self) -> Iterator["Envoy"]:
        if not isinstance(self._module, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            raise UsageTypeError(
                f"`{self._display_path()}` ({type(self._module).__name__}) is not a module "
                "container; iterate `.children()` of the module (`model._model`) instead."
            )
        return (self._child(name) for name in self._module._modules)

    def __len__(self) -> int:
        return len(self._module._modules)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__()) | set(self._module._modules) | set(self._root._alias_names(self))
        names |= {a for a in dir(self._module) if not a.startswith("_")}
        return sorted(names)

    def __repr__(self) -> str:
        return repr(self._module)

    def modules(self) -> Iterator["Envoy"]:
        """This envoy and every envoy below it, depth first."""
        yield self
        for name in self._module._modules:
            if self._module._modules[name] is not None:
                yield from self._child(name).modules()

    def get(self, path: str) -> Any:
        """The envoy at the dotted ``path`` below this one (``"model.layers.0"``:
        names and indices as parts).  Inside a trace a last part ``output``,
        ``input`` or ``inputs`` gives that value."""
        if not isinstance(path, str):
            raise UsageTypeError(f"`get` takes a dotted path like 'model.layers.0', not a {type(path).__name__}.")
        parts = path.lstrip(".").split(".") if path.strip(".") else []
        target: Any = self
        for index, part in enumerate(parts):
            if not isinstance(target, Envoy) or not part:
                raise self._bad_path(path, parts[:index], part)
            if part.lstrip("-").isdigit() and part not in target._module._modules:
                try:
                    target = target[int(part)]
                except ModulePathError:
                    raise self._bad_path(path, parts[:index], part) from None
                continue
            try:
                target = getattr(target, part)
            except ModulePathError:
                raise self._bad_path(path, parts[:index], part) from None
        return target

    def _bad_path(self, path: str, found: list[str], part: str) -> ModulePathError:
        under = self._display_path() + "".join(f".{p}" for p in found)
        return ModulePathError(
            f"`{self._display_path()}.get({path!r})`: there is no `{part}` under `{under}` ({where_user_is()}). "
            "Paths are dotted and relative to this envoy, with indices as parts ('model.layers.0'); "
            "`print(model)` shows the tree."
        )

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        """Call the module on your own data (e.g. ``model.lm_head(h)`` for a
        logit lens).  Inside a trace the call is invisible to the trace: it
        serves no values and leaves the module's place in the forward pass
        alone.  With ``hook=True`` the trace watches it: bodies waiting for the
        values of this module or its submodules get those of this call (e.g.
        an SAE attached to a layer, applied in an edit, whose ``encoder``
        output a trace reads)."""
        if hook:
            task = current_task()
            if task is not None and task.run is not None:
                return task.run.interleaver.call_hooked(task, self._module, args, kwargs)
        return self._module(*args, **kwargs)

    # -- plain navigation, for runs of saves (tracing/prefetch.py) ----------------
    def _plain_paths(self, steps: tuple, items: Sequence[Any]) -> "list[Envoy] | None":
        """See :class:`~.tracing.contract.PlainNavigation`."""
        # The steps before the first by-item index lead to the same envoy for every item: walked once.
        cut = steps.index(None) if None in steps else len(steps)
        start = _plain_walk(self, steps[:cut], None)
        if start is None:
            return None
        rest = steps[cut:]
        if not rest:
            return [start] * len(items)
        found = []
        for item in items:
            envoy = _plain_walk(start, rest, item)
            if envoy is None:
                return None
            found.append(envoy)
        return found

    def _plain_children(self) -> "tuple[Envoy, ...] | None":
        """See :class:`~.tracing.contract.PlainNavigation`."""
        return tuple(self) if _is_plain(type(self)) else None

    # -- values inside a trace ---------------------------------------------------
    output = ValueAccessor("output", "output", "The module's output in the running trace.", _read, _write)
    input = ValueAccessor("input", "input", "The module's first argument in the running trace.", _read, _write)
    inputs = ValueAccessor("input", "inputs", "``(args, kwargs)`` the module is called with in the running trace.",
                           _read, _write)

    def skip(self, value: Any) -> None:
        """Do not run this module on its next call; use ``value`` as its output."""
        task = _task_or_raise(self, "skip(...)")
        task.run.skip(task, self, value)

    def next(self, calls: int = 1) -> "NextCall":
        """The module's call after the current one (for modules called several
        times per forward pass: a shared block, an RNN cell in a loop)."""
        return NextCall(self, calls)

    @property
    def source(self) -> Any:
        """The operations inside the module's forward (see :mod:`seethrough.source`)."""
        return self._root._source_view(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input", "inputs"):
            object.__setattr__(self, name, value)
            return
        if _is_user_subclass(type(self)):
            if name.startswith("_") or _defined_by_subclass(type(self), name) is not None:
                object.__setattr__(self, name, value)
                return
            if name not in self._module._modules and self._root._resolve_alias(self, name) is not None:
                raise UsageAttributeError(
                    f"cannot set `{name}` on `{self._display_path()}` ({where_user_is()}): `{name}` names a "
                    "submodule there (an alias), and an attribute of that name would hide it. Pick another name.")
            if name not in self._module._modules and not hasattr(self._module, name):
                # A custom envoy's (or wrapper's) own state, or a property it defines
                # with a setter; never a name of the module (`weight`, a submodule).
                object.__setattr__(self, name, value)
                return
            if self._root is self and current_task() is None:
                # A wrapper subclass setting itself up outside a trace (nnterp's
                # `self.vocab_size = ...` in __init__): a plain attribute, even where
                # the module has an attribute of that name, but never hiding a submodule.
                if name in self._module._modules:
                    raise UsageAttributeError(
                        f"cannot set `{name}` on `{type(self).__name__}` ({where_user_is()}): `model.{name}` is "
                        "a submodule of the wrapped model, and an attribute of that name would hide it. Pick "
                        "another name for your attribute.")
                object.__setattr__(self, name, value)
                return
        raise UsageAttributeError(
            f"cannot set `{name}` on `{self._display_path()}` ({where_user_is()}): envoys only "
            "take `.output`, `.input` and `.inputs` assignments inside a trace. To change the "
            "module itself, use `model._model` outside a trace."
        )


_plain_types: dict[type, bool] = {}
_ACCESSOR_NAMES = ("output", "input", "inputs")


def _is_plain(cls: type) -> bool:
    """Is ``cls`` an envoy class whose navigation and accessors are seethrough's own?"""
    plain = _plain_types.get(cls)
    if plain is None:
        plain = _plain_types[cls] = (
            issubclass(cls, Envoy)
            and cls.__getattribute__ is object.__getattribute__
            and cls.__getattr__ is Envoy.__getattr__
            and cls.__getitem__ is Envoy.__getitem__
            and cls.__iter__ is Envoy.__iter__
            and all(getattr(cls, name) is Envoy.__dict__[name] for name in _ACCESSOR_NAMES)
        )
    return plain


def _plain_walk(obj: Any, steps: tuple, item: Any) -> Any:
    """The envoy ``obj`` + ``steps`` leads to, found as plain attribute lookup
    would find it, or None where that would run anything but seethrough's own
    navigation: a class attribute or property (a custom envoy's), an attribute
    of the module, a non-envoy on the way (see ``PlainNavigation``)."""
    for step in steps:
        cls = type(obj)
        if not _plain_types.get(cls) and not _is_plain(cls):
            return None
        if type(step) is str:
            child = obj.__dict__.get(step)  # a child cached there (see `_child`)
            if child is None:
                if hasattr(cls, step):
                    return None
                child = obj._named_envoy(step)  # as `__getattr__` finds it
                if child is None:
                    return None
        else:
            key = item if step is None else step[0]
            if type(key) is not int:
                return None
            child = obj._children.get(key)
            if child is None:
                try:
                    child = obj[key]
                except ModulePathError:
                    return None
        obj = child
    cls = type(obj)
    if not _plain_types.get(cls) and not _is_plain(cls):
        return None
    return obj


_LIBRARY_CLASSES.add(Envoy)


def _cacheable(envoy: Envoy, name: str) -> bool:
    """May the child envoy ``name`` live in ``envoy.__dict__``?  Only where
    plain lookup would otherwise reach ``__getattr__`` anyway, and that is
    ours: not a private or dunder name, nothing of the envoy's class (methods,
    properties of custom envoys), no instance attribute of its own."""
    cls = type(envoy)
    return (
        cls.__getattr__ is Envoy.__getattr__
        and name.isidentifier()
        and not name.startswith("_")
        and not hasattr(cls, name)
        and name not in envoy.__dict__
    )


def cached_children(envoy: Envoy) -> list[str]:
    """The names under which ``envoy.__dict__`` holds child envoys (see ``_child``)."""
    own = envoy.__dict__
    return [name for name, child in envoy._children.items() if type(name) is str and own.get(name) is child]


def alias_target(envoy: Envoy, name: str) -> "Envoy | None":
    """The envoy the alias ``name`` (``rename=``, standard names) names under
    ``envoy``; None where ``name`` is no alias there."""
    return envoy._root._resolve_alias(envoy, name)


def unknown_name_error(envoy: Envoy, name: str) -> ModulePathError:
    """The error ``envoy.<name>`` raises where ``name`` is nothing of its module
    (with the names it may have meant)."""
    return envoy._unknown(name)


def _is_user_subclass(cls: type) -> bool:
    """Is ``cls`` an envoy class of the user's (not seethrough's own)?"""
    return cls not in _LIBRARY_CLASSES


def _defined_by_subclass(cls: type, name: str) -> type | None:
    """The user's envoy class (in ``cls``'s MRO, above seethrough's classes)
    that defines ``name``, if any."""
    for klass in cls.__mro__:
        if not _is_user_subclass(klass):
            return None
        if name in klass.__dict__:
            return klass
    return None


class NextCall:
    """``envoy.next()``: the same accessors, for a later call of the module."""

    __slots__ = ("envoy", "calls")

    def __init__(self, envoy: Envoy, calls: int) -> None:
        self.envoy = envoy
        self.calls = calls

    def next(self, calls: int = 1) -> "NextCall":
        return NextCall(self.envoy, self.calls + calls)

    output = ValueAccessor("output", "output", "The module's output in that later call.")
    input = ValueAccessor("input", "input", "The module's first argument in that later call.")
    inputs = ValueAccessor("input", "inputs", "``(args, kwargs)`` of that later call.")

    def _display_path(self) -> str:
        return self.envoy._display_path()

    def _read_value(self, kind: str, accessor: str) -> Any:
        return _read(self.envoy, kind, accessor, self.calls)

    def _write_value(self, kind: str, accessor: str, value: Any) -> None:
        # Wait for that call first; the write then edits it.
        _read(self.envoy, kind, accessor, self.calls)
        _write(self.envoy, kind, accessor, value)
