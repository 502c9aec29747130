"""``tracer.cache(...)``: record module values in bulk, read them by path.

.. code-block:: python

    with model.trace("Hello") as tracer:
        cache = tracer.cache(modules=[model.layers[0], model.layers[5]])
    cache["model.layers.0"].output          # or cache.model.layers[0].output

Values are recorded after the trace's own edits at each module, for the whole
batch.  A module that has been cached can also be read out of order inside
the trace: ``.output`` of a cached module that already ran gives the recorded
value instead of an out-of-order error.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterator

import torch

from ..errors import SeethroughError
from .interleaver import MISSING


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


class CacheEntry:
    """What was recorded for one module: every call, in order."""

    __slots__ = ("path", "outputs", "all_inputs")

    def __init__(self, path: str) -> None:
        self.path = path
        self.outputs: list[Any] = []
        self.all_inputs: list[tuple[tuple, dict]] = []

    @property
    def output(self) -> Any:
        """The output of the module's (last) call."""
        if not self.outputs:
            raise SeethroughError(
                f"no output of `model.{self.path}` was recorded: it did not run, or the cache was "
                "made with `include_output=False`."
            )
        return self.outputs[-1]

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the module's (last) call."""
        if not self.all_inputs:
            raise SeethroughError(
                f"no inputs of `model.{self.path}` were recorded: make the cache with "
                "`tracer.cache(..., include_inputs=True)`."
            )
        return self.all_inputs[-1]

    @property
    def input(self) -> Any:
        """The first argument of the module's (last) call."""
        args, kwargs = self.inputs
        if args:
            return args[0]
        return next(iter(kwargs.values())) if kwargs else None

    def __repr__(self) -> str:
        return f"<CacheEntry model.{self.path}: {len(self.outputs)} outputs, {len(self.all_inputs)} inputs>"


class Cache:
    """Values recorded by ``tracer.cache(...)``, addressable by module path."""

    def __init__(self, envoys: list[Any], include_output: bool, include_inputs: bool, keep_graph: bool) -> None:
        self._envoys = envoys
        self.include_output = include_output
        self.include_inputs = include_inputs
        self._keep_graph = keep_graph
        self._entries: dict[str, CacheEntry] = {}

    def _recorder(self, path: str, kind: str) -> Callable[[Any], None]:
        entry = self._entries.get(path)
        if entry is None:
            entry = self._entries[path] = CacheEntry(path)
        keep = self._keep_graph
        target = entry.outputs if kind == "output" else entry.all_inputs

        def record(value: Any) -> None:
            target.append(value if keep else _detached(value))

        return record

    def _lookup(self, path: str, kind: str) -> Any:
        entry = self._entries.get(path)
        if entry is None:
            return MISSING
        values = entry.outputs if kind == "output" else entry.all_inputs
        return values[-1] if values else MISSING

    def _detach_run(self) -> None:
        self._envoys = []

    # -- reading -------------------------------------------------------------------
    @staticmethod
    def _normalise(key: str) -> str:
        if key == "model":
            return ""
        return key[6:] if key.startswith("model.") else key

    def __getitem__(self, key: str) -> CacheEntry:
        path = self._normalise(key)
        entry = self._entries.get(path)
        if entry is None:
            close = difflib.get_close_matches(path, list(self._entries), n=3)
            hint = f" Did you mean {', '.join('model.' + c for c in close)}?" if close else ""
            raise KeyError(f"`{key}` was not cached.{hint} Cached: {len(self._entries)} modules.")
        return entry

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._normalise(key) in self._entries

    def keys(self) -> list[str]:
        return ["model." + path if path else "model" for path in self._entries]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name: str) -> "_CachePath":
        if name.startswith("_"):
            raise AttributeError(name)
        if name != "model":
            raise AttributeError(f"cache paths start at `model`: use `cache.model.{name}` or `cache['model.{name}']`.")
        return _CachePath(self, "")

    def __repr__(self) -> str:
        return f"<Cache of {len(self._entries)} modules>"


class _CachePath:
    """``cache.model.layers[0]``: walks module paths, ends in a :class:`CacheEntry`."""

    __slots__ = ("_cache", "_path")

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def _join(self, part: str) -> "_CachePath":
        return _CachePath(self._cache, f"{self._path}.{part}" if self._path else part)

    def __getattr__(self, name: str) -> Any:
        if name in ("output", "input", "inputs", "outputs", "all_inputs"):
            return getattr(self._cache[self._path or "model"], name)
        if name.startswith("_"):
            raise AttributeError(name)
        return self._join(name)

    def __getitem__(self, index: Any) -> "_CachePath":
        return self._join(str(index))

    def __repr__(self) -> str:
        return f"<cache path model.{self._path}>"
