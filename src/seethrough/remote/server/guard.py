"""Keep the served model exactly as loaded, request after request (worker side).

The sandbox's static checks cannot see a body that changes the model through
calls whose names tensors and containers share: ``weight[:] = 0``,
``weight.data.zero_()``, ``torch.add(a, b, out=weight)``, ``model.to(torch.float16)``,
``model.transformer.h.pop(0)``, ``model.config.update({...})``.  Two walls
stop those from reaching the next request:

1. **Read-only weights** (:class:`ReadOnlyWeights`, CPU parameters): every
   parameter is copied into one page-aligned anonymous memory mapping, the
   parameter is pointed at its slice (at the same address modulo the page
   size as before, so kernels round exactly as on a plain load), and the
   mapping is made read-only with ``mprotect``.  A write to a weight then kills the worker with SIGSEGV
   before a single byte changes; the API process fails that request and
   starts a fresh worker.  (GPU weights cannot be protected this way.)
2. **Verification after every request** (:class:`ModelGuard`): a fingerprint
   of the module tree (identity, class, training flag, children, parameter
   and buffer slots, hook counts), of every parameter (identity, dtype,
   device, shape, strides, data pointer, ``_version``, ``requires_grad``,
   plus a checksum of its bytes unless it lies in read-only memory — the
   checksum catches ``.data`` writes, which do not bump ``_version``), of the
   model's config, generation config and tokenizer settings.  A difference
   fails the request and the worker is replaced (the model reloads from
   disk).  Buffers (small; some models legitimately rebuild them, e.g. rotary
   frequencies) are restored in place instead.

The checksum is the XOR (:func:`torch.hash_tensor`) and the wrapping sum of
the tensor's 64-bit words: any change of one word is caught, and so is a
uniform change; it costs two passes over the bytes, so it is only used where
read-only memory is not available (see ``bench``/the server docs for
its measured cost).  After every request the guard also drops gradients the
request left on parameters and restores torch's global grad mode.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import logging
import mmap
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelGuard", "ReadOnlyWeights", "tensor_checksum"]

logger = logging.getLogger("seethrough.server")

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")
_MAX_REPORTED = 5


def tensor_checksum(tensor: torch.Tensor) -> tuple[int, int]:
    """A bit-exact checksum of a tensor's bytes: the XOR and the (wrapping) sum of its
    64-bit words.  Any change of one word changes both; a uniform change (``fill_``,
    ``mul_`` of a constant tensor), which XOR alone can miss, changes the sum."""
    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    flat = data.reshape(-1)
    if flat.numel() == 0:
        return (0, 0)
    try:
        words = flat.view(torch.uint8)
        words = words.view(torch.int64) if words.numel() % 8 == 0 else words
    except RuntimeError:  # unaligned view: fall back to the element size
        words = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}.get(flat.element_size(), torch.uint8))
    total = words.sum(dtype=torch.int64) if words.dtype == torch.int64 else words.to(torch.int64).sum()
    return (int(torch.hash_tensor(words).item()), int(total.item()))


# -- read-only weights ---------------------------------------------------------------------


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    return libc


class ReadOnlyWeights:
    """CPU parameters moved into one read-only memory mapping (see the module docs)."""

    def __init__(self, mapping: mmap.mmap, base: torch.Tensor, protected: set[int]) -> None:
        self._mapping = mapping  # kept alive for the life of the worker
        self._base = base
        self.protected = protected  # ids of the parameters now in read-only memory
        self.start = base.data_ptr()
        self.end = self.start + base.numel()
        self.nbytes = base.numel()

    def covers(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s bytes lie in the read-only mapping."""
        try:
            pointer = tensor.data_ptr()
        except RuntimeError:
            return False
        return self.start <= pointer and pointer + tensor.nbytes <= self.end

    @classmethod
    def apply(cls, module: torch.nn.Module) -> "ReadOnlyWeights | None":
        """Protect the plain CPU parameters of ``module``; None when nothing could be."""
        candidates = _protectable(module)
        if not candidates:
            return None
        offsets, total = [], 0
        for parameter in candidates:
            # Keep each weight's address modulo the page size: CPU kernels pick their
            # vectorized paths (and so their rounding) by alignment, and the same
            # alignment as a plain load gives bitwise the same results.
            wanted = parameter.data_ptr() % mmap.PAGESIZE
            total += (wanted - total) % mmap.PAGESIZE
            offsets.append(total)
            total += parameter.nbytes
        size = max(mmap.PAGESIZE, (total + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # Huge pages: a fork (one per request) copies ~500x fewer page-table entries.
            with contextlib.suppress(OSError):
                mapping.madvise(mmap.MADV_HUGEPAGE)
        base = torch.frombuffer(mapping, dtype=torch.uint8)
        with torch.no_grad():
            for parameter, offset in zip(candidates, offsets):
                view = base[offset:offset + parameter.nbytes].view(parameter.dtype).view(parameter.shape)
                view.copy_(parameter.detach())
                parameter.data = view
        address = base.data_ptr()
        if address % mmap.PAGESIZE or _libc().mprotect(address, size, mmap.PROT_READ) != 0:
            logger.warning("could not make the weights read-only (mprotect failed, errno %s); "
                           "every weight is checksummed after each request instead", ctypes.get_errno())
            return None
        return cls(mapping, base, {id(parameter) for parameter in candidates})


def _protectable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that own their whole storage alone (shared or odd ones stay as they are)."""
    owners: dict[int, list[torch.nn.Parameter]] = {}
    for parameter in module.parameters():  # each Parameter object once (tied weights are one object)
        if parameter.device.type != "cpu" or parameter.layout != torch.strided or parameter.numel() == 0:
            continue
        owners.setdefault(parameter.untyped_storage().data_ptr(), []).append(parameter)
    chosen = []
    for group in owners.values():
        parameter = group[0]
        if (len(group) == 1 and parameter.is_contiguous() and parameter.storage_offset() == 0
                and parameter.untyped_storage().nbytes() == parameter.nbytes and type(parameter.data) is torch.Tensor):
            chosen.append(parameter)
    return chosen


# -- fingerprints ---------------------------------------------------------------------------


@dataclass
class _Snapshot:
    tree: list[tuple]
    parameters: dict[str, tuple]
    buffers: dict[str, tuple]
    config: Any
    generation_config: Any
    tokenizer: Any
    global_hooks: tuple


def _config_dict(config: Any) -> Any:
    if config is None:
        return None
    try:
        return copy.deepcopy(config.to_dict())
    except (AttributeError, TypeError, ValueError):
        return repr(config)


def _tokenizer_state(tokenizer: Any) -> Any:
    if tokenizer is None:
        return None
    names = ("padding_side", "truncation_side", "model_max_length", "pad_token", "eos_token", "bos_token",
             "unk_token", "chat_template", "clean_up_tokenization_spaces")
    state = {name: repr(getattr(tokenizer, name, None)) for name in names}
    try:
        state["size"] = len(tokenizer)
    except TypeError:
        pass
    state["init_kwargs"] = repr(sorted(getattr(tokenizer, "init_kwargs", {}).items(), key=lambda item: str(item[0])))
    return state


def _global_hooks() -> tuple:
    from torch.nn.modules import module as module_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_module_registration_hooks",
             "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
    return tuple(len(getattr(module_module, name, ())) for name in names)


class ModelGuard:
    """Fingerprints a served model after loading; checks it after each request."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None, read_only: ReadOnlyWeights | None = None) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.read_only = read_only
        self._grad_mode = torch.is_grad_enabled()
        self._baseline = self._snapshot()
        self._parameters = list(module.parameters())
        # Originals of every buffer, to put back what a request changed.
        self._buffer_copies: dict[str, tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]] = {}
        for module_name, owner in module.named_modules():
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    path = f"{module_name}.{name}" if module_name else name
                    self._buffer_copies[path] = (owner, name, buffer, buffer.detach().clone())

    # -- snapshots ------------------------------------------------------------------
    def _tensor_entry(self, tensor: torch.Tensor) -> tuple:
        in_read_only = self.read_only is not None and self.read_only.covers(tensor)
        return (
            id(tensor), tensor.dtype, tensor.device, tuple(tensor.shape), tuple(tensor.stride()),
            tensor.storage_offset(), tensor.data_ptr(), tensor._version, tensor.requires_grad,
            None if in_read_only else tensor_checksum(tensor),
        )

    def _walk(self) -> tuple[list[tuple], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One pass over the module tree: its structure, and each parameter and buffer by
        its first name (what ``named_parameters`` would give, in a fraction of the time)."""
        tree: list[tuple] = []
        parameters: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        stack: list[tuple[str, torch.nn.Module]] = [("", self.module)]
        while stack:
            name, module = stack.pop()
            state = module.__dict__
            own_parameters, own_buffers, children = state["_parameters"], state["_buffers"], state["_modules"]
            tree.append((
                name, id(module), type(module), state.get("training"),
                [(key, id(value)) for key, value in own_parameters.items()],
                [(key, id(value)) for key, value in own_buffers.items()],
                [(key, id(value)) for key, value in children.items()],
                [len(state.get(attr, ())) for attr in _HOOK_DICTS],
            ))
            prefix = f"{name}." if name else ""
            for table, out in ((own_parameters, parameters), (own_buffers, buffers)):
                for key, tensor in table.items():
                    if tensor is not None and id(tensor) not in seen:
                        seen.add(id(tensor))
                        out[prefix + key] = tensor
            stack.extend((prefix + key, child) for key, child in reversed(children.items()) if child is not None)
        return tree, parameters, buffers

    def _buffer_entries(self) -> dict[str, tuple]:
        _, _, buffers = self._walk()
        return {name: self._tensor_entry(tensor) for name, tensor in buffers.items()}

    def _snapshot(self) -> _Snapshot:
        tree, parameters, buffers = self._walk()
        return _Snapshot(
            tree=tree,
            parameters={name: self._tensor_entry(tensor) for name, tensor in parameters.items()},
            buffers={name: self._tensor_entry(tensor) for name, tensor in buffers.items()},
            config=_config_dict(getattr(self.module, "config", None)),
            generation_config=_config_dict(getattr(self.module, "generation_config", None)),
            tokenizer=_tokenizer_state(self.tokenizer), global_hooks=_global_hooks(),
        )

    # -- after each request ------------------------------------------------------------
    def check(self) -> list[str]:
        """Tidy up after a request; return what it changed in the model (empty: nothing).

        Gradients left on parameters are dropped and the grad mode restored;
        changed buffers are put back.  Anything else that differs from the
        baseline is reported: the worker must then be replaced.
        """
        for parameter in self._parameters:
            parameter.grad = None
        torch.set_grad_enabled(self._grad_mode)
        problems = self._compare(self._snapshot())
        if not problems:
            return []
        return problems[:_MAX_REPORTED] + ([f"... and {len(problems) - _MAX_REPORTED} more"]
                                           if len(problems) > _MAX_REPORTED else [])

    def _compare(self, now: _Snapshot) -> list[str]:
        base = self._baseline
        problems: list[str] = []
        if now.tree != base.tree:
            problems.append(_tree_difference(base.tree, now.tree))
        problems += _tensor_differences("parameter", base.parameters, now.parameters)
        if now.buffers != base.buffers:
            expected = {name: entry[:7] + entry[8:] for name, entry in base.buffers.items()}
            self._restore_buffers()
            restored = self._buffer_entries()
            if {name: entry[:7] + entry[8:] for name, entry in restored.items()} != expected:
                problems += _tensor_differences("buffer", base.buffers, restored)
            base.buffers = restored  # restoring bumps versions: the restored state is the new baseline
        if now.config != base.config:
            problems.append(f"model.config changed ({_dict_difference(base.config, now.config)})")
        if now.generation_config != base.generation_config:
            problems.append("model.generation_config changed "
                            f"({_dict_difference(base.generation_config, now.generation_config)})")
        if now.tokenizer != base.tokenizer:
            problems.append(f"the tokenizer changed ({_dict_difference(base.tokenizer, now.tokenizer)})")
        if now.global_hooks != base.global_hooks:
            problems.append("global module hooks were left registered")
        return problems

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for path, (owner, name, original, saved) in self._buffer_copies.items():
                if owner._buffers.get(name) is not original:
                    owner._buffers[name] = original
                if original.dtype == saved.dtype and original.shape == saved.shape:
                    if tensor_checksum(original) != tensor_checksum(saved):
                        original.copy_(saved)
                        logger.info("restored buffer %s after a request changed it", path)


def _tree_difference(before: list[tuple], after: list[tuple]) -> str:
    if len(before) != len(after):
        return f"the module tree changed: {len(before)} modules before the request, {len(after)} after"
    for old, new in zip(before, after):
        if old != new:
            name = f"model.{old[0]}" if old[0] else "model"
            what = ("was replaced" if old[1] != new[1] or old[2] != new[2] else
                    "changed its training mode" if old[3] != new[3] else
                    "had a parameter added, removed or replaced" if old[4] != new[4] else
                    "had a buffer added, removed or replaced" if old[5] != new[5] else
                    "had a submodule added, removed or replaced" if old[6] != new[6] else "had hooks left on it")
            return f"{name} {what}"
    return "the module tree changed"


_FIELDS = ("identity", "dtype", "device", "shape", "strides", "storage offset", "memory", "version",
           "requires_grad", "contents")


def _tensor_differences(kind: str, before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    problems = []
    for name in before.keys() - after.keys():
        problems.append(f"{kind} {name} was removed")
    for name in after.keys() - before.keys():
        problems.append(f"{kind} {name} was added")
    for name, old in before.items():
        new = after.get(name)
        if new is None or new == old:
            continue
        changed = [field for field, a, b in zip(_FIELDS, old, new) if a != b]
        detail = ", ".join(f"{field} {old[i]} -> {new[i]}" if field in ("dtype", "device", "shape") else field
                           for i, field in ((_FIELDS.index(f), f) for f in changed))
        problems.append(f"{kind} {name} changed ({detail})")
    return problems


def _dict_difference(before: Any, after: Any) -> str:
    if not isinstance(before, dict) or not isinstance(after, dict):
        return "its contents differ"
    keys = sorted(str(key) for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"keys: {shown}" if keys else "its contents differ"
