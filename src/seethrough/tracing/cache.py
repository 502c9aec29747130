"""``tracer.cache(...)``: record module values in bulk, read them by path.

.. code-block:: python

    with model.trace("Hello") as tracer:
        cache = tracer.cache(modules=[model.layers[0], model.layers[5]])
    cache["model.layers.0"].output          # or cache.model.layers[0].output

Paths read as on the model itself: ``model`` is the wrapped root, then
module names, indices, ``rename=`` aliases and the standard names
(``cache.model.layers[0]`` and ``cache.model.model.layers[0]`` name the same
block of a Llama-style ``LanguageModel``).  ``cache.layers[0]`` (without
``model``) works too.

Each entry holds one *call* per time the module ran (one per generation
step in ``model.generate``): ``len(entry)`` is the number of calls,
``entry[i]`` the i-th call (``entry[i]`` on a container such as a
``ModuleList`` is its i-th submodule instead), ``entry.output`` the value of
the only call, or the list of every call's value when it ran more than once
(as nnsight gives).  ``.inputs`` is ``(args, kwargs)``; values that were not
recorded (``include_inputs=False``) read as ``None``.

Values are recorded after the trace's own edits at each module, for the whole
batch.  A module that has been cached can also be read out of order inside
the trace: ``.output`` of a cached module that already ran gives the recorded
value instead of an out-of-order error.
"""

from __future__ import annotations

import difflib
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..errors import SeethroughError, UsageIndexError, UsageTypeError
from .sentinels import MISSING
from .values import narrow

if TYPE_CHECKING:
    from .contract import TracedModel


class CacheKeyError(SeethroughError, KeyError, AttributeError):
    """A path that names no cached module (raised by ``cache[...]`` and ``cache.a.b``)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _display(path: str) -> str:
    return f"model.{path}" if path else "model"


class CacheCall:
    """One call of a cached module: its ``output`` and ``inputs`` (``None``
    where not recorded)."""

    __slots__ = ("_output", "_inputs")

    def __init__(self) -> None:
        self._output: Any = MISSING
        self._inputs: Any = MISSING

    @property
    def output(self) -> Any:
        return None if self._output is MISSING else self._output

    @property
    def inputs(self) -> tuple[tuple, dict] | None:
        return None if self._inputs is MISSING else self._inputs

    @property
    def input(self) -> Any:
        """The first argument (positional, else keyword), or ``None``."""
        if self._inputs is MISSING:
            return None
        args, kwargs = self._inputs
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None

    def __repr__(self) -> str:
        return f"<CacheCall output={'-' if self._output is MISSING else 'yes'} inputs={'-' if self._inputs is MISSING else 'yes'}>"


class CacheEntry:
    """What was recorded for one module path, also a step of path navigation
    (``cache.model.layers`` is an entry whose ``[0]`` is layer 0's)."""

    __slots__ = ("_cache", "path")

    def __init__(self, cache: "Cache", path: str) -> None:
        self._cache = cache
        self.path = path

    # -- the recorded calls ---------------------------------------------------------
    @property
    def calls(self) -> list[CacheCall]:
        """Every recorded call of the module, in order."""
        calls = self._cache._calls.get(self.path)
        if calls is None:
            raise self._cache._miss(self.path, _display(self.path))
        return calls

    def _values(self, name: str) -> Any:
        values = [getattr(call, name) for call in self.calls]
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        """The output of the module's call, or the list of outputs of every call
        when it ran more than once (``None`` where not recorded)."""
        return self._values("output")

    @property
    def inputs(self) -> Any:
        """``(args, kwargs)`` of the call (a list for several calls); ``None``
        where inputs were not recorded (``tracer.cache(include_inputs=True)``)."""
        return self._values("inputs")

    @property
    def input(self) -> Any:
        """The first argument of the call (a list for several calls), or ``None``."""
        return self._values("input")

    @property
    def outputs(self) -> list[Any]:
        """The outputs of every recorded call, always a list."""
        return [call._output for call in self.calls if call._output is not MISSING]

    @property
    def all_inputs(self) -> list[tuple[tuple, dict]]:
        """The ``(args, kwargs)`` of every recorded call, always a list."""
        return [call._inputs for call in self.calls if call._inputs is not MISSING]

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[CacheCall]:
        return iter(self.calls)

    # -- navigation -------------------------------------------------------------------
    def __getattr__(self, name: str) -> "CacheEntry":
        if name.startswith("_"):
            raise AttributeError(name)
        return self._cache._entry(self._cache._step(self.path, name, _display(self.path) + "." + name))

    def __getitem__(self, index: Any) -> Any:
        cache = self._cache
        if isinstance(index, int) and not isinstance(index, bool):
            child = cache._child_index(self.path, index)
            if child is not None:
                return cache._entry(child)
            calls = self.calls
            if not -len(calls) <= index < len(calls):
                raise UsageIndexError(
                    f"`{_display(self.path)}` was recorded {len(calls)} time(s); call {index} does not exist."
                )
            return calls[index]
        if isinstance(index, str):
            path = self.path
            typed = _display(path)
            for part in index.split("."):
                typed += "." + part
                path = cache._step(path, part, typed)
            return cache._entry(path)
        raise UsageTypeError(f"cache entries are indexed by call or submodule number, or by name; not {type(index).__name__}.")

    def keys(self) -> list[str]:
        """The cached paths at or below this one."""
        prefix = self.path
        return [
            _display(path) for path in self._cache._calls
            if not prefix or path == prefix or path.startswith(prefix + ".")
        ]

    def __repr__(self) -> str:
        calls = self._cache._calls.get(self.path)
        if calls is None:
            return f"<CacheEntry {_display(self.path)}: {len(self.keys())} cached modules below>"
        return f"<CacheEntry {_display(self.path)}: {len(calls)} call(s)>"


class Cache:
    """Values recorded by ``tracer.cache(...)``, addressable by module path (see
    the module docs)."""

    def __init__(
        self,
        envoys: list[Any],
        include_output: bool,
        include_inputs: bool,
        keep_graph: bool,
        root: "TracedModel | None" = None,
        rows: slice | None = None,
    ) -> None:
        self._envoys = envoys
        self._rows = rows  # made in an invoke with input: that invoke's rows only (as nnsight)
        # Weak: a cache kept after the model wrapper is dropped must not keep
        # the model (its weights) alive; it then reads plain module names only.
        self._root_ref = weakref.ref(root) if root is not None else None
        self.include_output = include_output
        self.include_inputs = include_inputs
        self._keep_graph = keep_graph
        self._calls: dict[str, list[CacheCall]] = {}

    @property
    def _root(self) -> "TracedModel | None":
        """The model wrapper the cache resolves aliases and indices with, while it exists."""
        ref = self._root_ref
        return ref() if ref is not None else None

    # -- recording (used by the trace) --------------------------------------------------
    def _recorder(self, path: str, kind: str, batch_size: Callable[[], int]) -> Callable[[Any], None]:
        entries = self._calls
        keep = self._keep_graph
        slot = "_output" if kind == "output" else "_inputs"
        rows = self._rows

        def record(value: Any) -> None:
            if rows is not None:
                value = _rows_of(value, kind, rows, batch_size())
            calls = entries.get(path)
            if calls is None:  # a module that never runs gets no entry
                calls = entries[path] = []
            # The input of a call arrives before its output: fill the open
            # slot of the current call, or start the next call.
            if not calls or getattr(calls[-1], slot) is not MISSING:
                calls.append(CacheCall())
            setattr(calls[-1], slot, value if keep else _detached(value))

        return record

    def _lookup(self, path: str, kind: str) -> Any:
        calls = self._calls.get(path)
        if not calls:
            return MISSING
        slot = "_output" if kind == "output" else "_inputs"
        for call in reversed(calls):
            value = getattr(call, slot)
            if value is not MISSING:
                return value
        return MISSING

    def _detach_run(self) -> None:
        self._envoys = []

    # -- paths ------------------------------------------------------------------------
    def _step(self, path: str, name: str, typed: str) -> str:
        """The real path of child ``name`` (a module name, index or alias) of ``path``."""
        root = self._root
        if root is None:  # no model to ask: plain module names only
            return f"{path}.{name}" if path else name
        found = root._child_path(path, name)
        if found is None:
            raise self._miss(None, typed)
        return found

    def _child_index(self, path: str, index: int) -> str | None:
        """The path of submodule ``index`` of a container at ``path``, if any."""
        root = self._root
        if root is None:
            child = f"{path}.{index}" if path else str(index)
            return child if any(p == child or p.startswith(child + ".") for p in self._calls) else None
        return root._child_path(path, str(index), index_only=True)

    def _entry(self, path: str) -> CacheEntry:
        return CacheEntry(self, path)

    def _resolve(self, key: str) -> str:
        """The real path a key names: ``model`` is the root; then names,
        indices and aliases as on the model."""
        if not isinstance(key, str):
            raise UsageTypeError(f"cache keys are module paths like 'model.layers.0', not {type(key).__name__}.")
        relative = "" if key == "model" else (key[6:] if key.startswith("model.") else key)
        if relative in self._calls:
            return relative
        attempts = [relative.split(".")] if relative else [[]]
        if key.startswith("model."):
            attempts.append(key.split("."))  # the root has a child called `model`
        error: CacheKeyError | None = None
        for parts in attempts:
            try:
                path, typed = "", "model"
                for part in parts:
                    typed += "." + part
                    path = self._step(path, part, typed)
                return path
            except CacheKeyError as miss:
                error = error or miss
        assert error is not None
        raise error

    def _miss(self, path: str | None, typed: str) -> CacheKeyError:
        known = self.keys()
        real = _display(path) if path is not None else typed
        close = [c for c in difflib.get_close_matches(real, known, n=5, cutoff=0.6) if c not in (typed, real)][:3]
        hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
        if path is None:
            what = f"`{typed}` names no module of the model."
        elif real != typed:
            what = f"`{typed}` (the module at `{real}`) was not cached."
        else:
            what = f"`{typed}` was not cached."
        listing = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        fix = (
            "Paths are read as on the model (`print(model)` shows its tree)." if path is None else
            "Cache it with `tracer.cache(modules=[...])`, or leave `modules` out to cache every module."
        )
        return CacheKeyError(f"{what}{hint} Cached: {len(known)} modules ({listing}). {fix}")

    # -- reading ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> CacheEntry:
        path = self._resolve(key)
        if path not in self._calls and not any(p.startswith(path + ".") or not path for p in self._calls):
            raise self._miss(path, key if key.startswith("model") else _display(key))
        return CacheEntry(self, path)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            return self._resolve(key) in self._calls
        except CacheKeyError:
            return False

    def keys(self) -> list[str]:
        return [_display(path) for path in self._calls]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._calls)

    def __getattr__(self, name: str) -> CacheEntry:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "model":
            return CacheEntry(self, "")
        return CacheEntry(self, self._step("", name, f"model.{name}"))  # short form: cache.layers[0]

    def __repr__(self) -> str:
        return f"<Cache of {len(self._calls)} modules>"


def _rows_of(value: Any, kind: str, rows: slice, batch_size: int) -> Any:
    """An invoke's rows of a recorded output, or of each argument of recorded inputs."""
    if kind == "output":
        return narrow(value, rows, batch_size)
    args, kwargs = value
    return (tuple(narrow(a, rows, batch_size) for a in args), {k: narrow(v, rows, batch_size) for k, v in kwargs.items()})
