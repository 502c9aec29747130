"""Everything a body could change besides the weights, fingerprinted (for workers that cannot fork).

Where a request cannot run in a process of its own (a model on the GPU: CUDA
does not survive ``fork``), the worker runs it in place and must notice any
state it leaves behind.  :class:`ModelGuard` (``guard.py``) covers the module
tree, parameters and buffers; :class:`StateFingerprint` covers the rest:

* every attribute of every module (``__dict__`` minus the tensor tables and
  hooks the guard checks), e.g. a flag a body flipped;
* the model's config and generation config, private keys (``_attn_implementation``)
  included, and their attribute objects;
* the tokenizer's attributes, lists included (``model_input_names``,
  special tokens, added tokens), and its fast backend's full state but for
  its padding and truncation settings, which the tokenizer sets from the
  arguments of every call it makes (a folder whose ``tokenizer.json`` was
  saved with padding on loads with it on, and the first plain request turns
  it off: no change to what any later call gets);
* the attributes of every class a body can reach through those objects
  (the module classes, config and tokenizer classes and their bases,
  ``torch.Tensor``, ``torch.nn.Parameter``, ``torch.nn.Module``): a class
  attribute set, replaced or deleted is a change for every later user.

Values are compared by content where they are plain data (numbers, strings,
containers, small tensors, nested objects up to a depth) and by identity
where they are code (functions, classes, modules).  The worker is replaced
when :meth:`StateFingerprint.changes` reports anything.
"""

from __future__ import annotations

import hashlib
import json
import types
from typing import Any

import torch

__all__ = ["StateFingerprint"]

_MAX_DEPTH = 6
_MAX_ITEMS = 100_000  # per container: a longer one is summarised by its length and identity
_BIG = 256  # items; a bigger container of hashable items is compared by one hash of them all
_SMALL_TENSOR = 1 << 16  # elements; bigger tensors are fingerprinted by identity, version and a checksum
_MODULE_SKIP = frozenset(("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
                          "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
                          "_load_state_dict_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_always_called", "_state_dict_pre_hooks", "_load_state_dict_post_hooks"))
# The backend's settings that every call of the tokenizer sets from its own
# arguments (transformers' `set_truncation_and_padding`): not state a call leaves.
_PER_CALL = ("padding", "truncation")
_BACKEND_STATES = 16  # distinct backend texts remembered (see `_backend_state`)
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
         staticmethod, classmethod, property, types.MethodDescriptorType, types.WrapperDescriptorType,
         types.GetSetDescriptorType, types.MemberDescriptorType)


def _canonical(value: Any, depth: int, seen: set[int]) -> Any:
    """A comparable, hashable-free summary of ``value``'s content."""
    if isinstance(value, (float, complex)):
        return ("number", repr(value))  # NaN equals itself this way
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return ("torch", str(value))
    if isinstance(value, _CODE):
        return ("code", id(value))
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    key = id(value)
    if key in seen or depth <= 0:
        return ("ref", type(value).__qualname__, key)
    seen.add(key)
    try:
        if isinstance(value, (list, tuple, dict)) and len(value) > _BIG:
            summary = _hash_items(value)
            if summary is not None:
                return ("big", type(value).__qualname__, key, len(value), summary)
        if isinstance(value, (list, tuple)):
            if len(value) > _MAX_ITEMS:
                return ("long", type(value).__qualname__, key, len(value))
            return (type(value).__qualname__, [_canonical(item, depth - 1, seen) for item in value])
        if isinstance(value, (set, frozenset)):
            return (type(value).__qualname__, sorted(repr(item) for item in value))
        if isinstance(value, dict):
            if len(value) > _MAX_ITEMS:
                return ("long", type(value).__qualname__, key, len(value))
            return (type(value).__qualname__, [(repr(k), _canonical(v, depth - 1, seen)) for k, v in value.items()])
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            return ("object", id(type(value)), key, _canonical(state, depth - 1, seen))
        return ("opaque", type(value).__qualname__, key, _safe_repr(value))
    finally:
        seen.discard(key)


def _hash_items(value: Any) -> int | None:
    """One hash of a big container of hashable items (a vocabulary, a merge list), or None."""
    try:
        return hash(tuple(value.items()) if isinstance(value, dict) else tuple(value))
    except TypeError:  # unhashable items: compared one by one instead
        return None


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)[:10_000]
    except Exception:  # noqa: BLE001 - a repr that fails says nothing, but must not stop the check
        return "<no repr>"


def _tensor(tensor: torch.Tensor) -> tuple:
    entry = (id(tensor), tensor.dtype, tensor.device, tuple(tensor.shape), tensor._version, tensor.requires_grad)
    if tensor.device.type == "meta" or tensor.numel() > _SMALL_TENSOR:
        return ("tensor", entry)
    return ("tensor", entry, tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if tensor.numel() else b"")


def _class_state(cls: type) -> list:
    """A class's own attributes: code by identity, data by content."""
    return [(name, _canonical(value, 3, set())) for name, value in sorted(vars(cls).items(), key=lambda kv: kv[0])
            if name not in ("__dict__", "__weakref__", "__doc__")]


class StateFingerprint:
    """Fingerprint of a served model's mutable state beyond its weights (see the module docs)."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self._backend_states: dict[str, str] = {}
        self._baseline = self._take()

    def _backend_state(self, backend: Any) -> str:
        """A hash of the fast backend's state without its per-call settings.
        Taking them out needs the text parsed (tens of ms for a large
        vocabulary): done once per distinct text, which plain requests
        repeat, and remembered for a few."""
        text = backend.to_str()
        raw = hashlib.sha256(text.encode("utf-8")).hexdigest()
        found = self._backend_states.get(raw)
        if found is None:
            state = json.loads(text)
            for name in _PER_CALL:
                state.pop(name, None)
            found = hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()
            if len(self._backend_states) >= _BACKEND_STATES:
                self._backend_states.clear()
            self._backend_states[raw] = found
        return found

    def _classes(self) -> list[type]:
        roots: list[type] = [torch.Tensor, torch.nn.Parameter, torch.nn.Module]
        roots += [type(module) for module in self.module.modules()]
        for owner in (getattr(self.module, "config", None), getattr(self.module, "generation_config", None),
                      self.tokenizer):
            if owner is not None:
                roots.append(type(owner))
        classes: dict[int, type] = {}
        for root in roots:
            for cls in root.__mro__:
                if cls is not object:
                    classes.setdefault(id(cls), cls)
        return list(classes.values())

    def _take(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for name, module in self.module.named_modules():
            own = {key: value for key, value in vars(module).items() if key not in _MODULE_SKIP}
            state[f"module {name or '(root)'}"] = _canonical(own, _MAX_DEPTH, set())
        for label in ("config", "generation_config"):
            owner = getattr(self.module, label, None)
            if owner is not None:
                state[label] = _canonical(vars(owner), _MAX_DEPTH, set())
        if self.tokenizer is not None:
            state["tokenizer"] = _canonical(vars(self.tokenizer), _MAX_DEPTH, set())
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and hasattr(backend, "to_str"):
                state["tokenizer backend"] = self._backend_state(backend)
        for cls in self._classes():
            state[f"class {cls.__module__}.{cls.__qualname__}"] = _class_state(cls)
        state["torch grad mode"] = torch.is_grad_enabled()
        return state

    def changes(self) -> list[str]:
        """What differs from the state at construction (empty: nothing)."""
        now = self._take()
        base = self._baseline
        return sorted(name for name in base.keys() | now.keys() if base.get(name) != now.get(name))
