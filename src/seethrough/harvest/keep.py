"""``run.keep(name, value)`` in a harvest body, and how kept values become rows.

Each micro-batch's body gets its own :class:`BatchHandle` (bound to the
``as`` name).  ``keep`` checks the value against the micro-batch and copies
what is kept off the forward pass at once: per-token values lose their
padding (the attention mask decides, left or right padding alike), and every
value is cast to the store's dtype and moved to the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvokeError, ShapeMismatchError, UsageTypeError, UsageValueError
from ..tracing.tasks import stop_trace
from .batching import MicroBatch

PER = ("token", "prompt")


class KeepState:
    """What is kept across micro-batches: each name's kind, fixed at its first keep."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.per: dict[str, str] = {}
        self.keys: dict[str, dict] | None = None


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise UsageValueError(f"dtype={dtype} is not a floating-point dtype; use torch.bfloat16, torch.float16 or torch.float32.")
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise UsageValueError(f"dtype={dtype!r}: use torch.bfloat16, torch.float16, torch.float32 (or their names), or None for the model's own.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class BatchHandle:
    """The ``as`` name of ``with model.harvest(...) as run:`` inside the body,
    for one micro-batch: ``run.keep(...)``, and what the batch holds
    (``run.prompt_ids``, ``run.input_ids``, ``run.attention_mask``)."""

    def __init__(self, state: KeepState, batch: MicroBatch, prompt_ids: torch.Tensor) -> None:
        self._state = state
        self._batch = batch
        self._masks: dict[torch.device, torch.Tensor] = {}
        self.prompt_ids = prompt_ids
        self.input_ids = batch.input_ids
        self.attention_mask = batch.attention_mask
        self.kept: dict[str, tuple[str, torch.Tensor]] = {}

    def keep(self, name: str, value: Any, per: str | None = None) -> None:
        """Keep ``value`` (a tensor whose first dimension is the batch) under
        ``name``: per token (``[batch, seq, ...]``, padding dropped) or per
        prompt (``[batch, ...]``).  ``per`` says which; by default a value
        shaped ``[batch, seq, ...]`` is per token."""
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise UsageValueError(f"run.keep(name, value): the name must be a non-empty string not starting with '_', not {name!r}.")
        if name in self.kept:
            raise UsageValueError(f"run.keep({name!r}, ...) was called twice in one micro-batch; each kept name is kept once per batch.")
        if per is not None and per not in PER:
            raise UsageValueError(f"run.keep({name!r}, ..., per={per!r}): `per` is 'token' or 'prompt'.")
        if not isinstance(value, torch.Tensor):
            raise UsageTypeError(
                f"run.keep({name!r}, ...) got a {type(value).__name__}; keep tensors (for a model output, "
                "keep its field, e.g. `model.output.logits`)."
            )
        rows, length = self._batch.input_ids.shape
        if value.dim() == 0 or value.shape[0] != rows:
            got = "a scalar" if value.dim() == 0 else f"shape {tuple(value.shape)}"
            raise ShapeMismatchError(
                f"run.keep({name!r}, ...) got {got}, but this micro-batch has {rows} prompts: a kept value's "
                "first dimension must be the batch (e.g. `layer.output`, `lm_head.output[:, -1]`; not `layer.output[0]`)."
            )
        known = self._state.per.get(name)
        if known is None:
            if self._state.keys is not None:
                raise UsageValueError(
                    f"run.keep({name!r}, ...) in a later micro-batch: the first micro-batch kept only "
                    f"{sorted(self._state.keys)}; every micro-batch must keep the same names."
                )
            known = per or ("token" if value.dim() >= 2 and value.shape[1] == length else "prompt")
            self._state.per[name] = known
        elif per is not None and per != known:
            raise UsageValueError(f"run.keep({name!r}, ..., per={per!r}): earlier micro-batches kept it per {known}.")
        value = value.detach()
        if known == "token":
            if value.dim() < 2 or value.shape[1] != length:
                raise ShapeMismatchError(
                    f"run.keep({name!r}, ..., per='token') got shape {tuple(value.shape)}, but this micro-batch is "
                    f"[{rows} prompts, {length} tokens]: per-token values are shaped [batch, seq, ...]."
                )
            value = value[self._mask(value.device)]
        self.kept[name] = (known, value.to(device="cpu", dtype=self._state.dtype or value.dtype))

    def _mask(self, device: torch.device) -> torch.Tensor:
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = self._batch.attention_mask.to(device=device, dtype=torch.bool)
        return mask

    def stop(self) -> None:
        """End this micro-batch's forward here (what is kept so far stays): a
        body that keeps only early layers need not run the rest of the model."""
        stop_trace()

    def invoke(self, *args: Any, **kwargs: Any) -> Any:
        raise InvokeError(
            "a harvest body runs once per micro-batch on the prompts given to `model.harvest(...)`; it cannot "
            "open `invoke` blocks. Put the inputs in the harvest's prompts instead."
        )

    def __repr__(self) -> str:
        return f"<harvest micro-batch of {len(self._batch.rows)} prompts>"


def keys_of(kept: dict[str, tuple[str, torch.Tensor]]) -> dict[str, dict]:
    return {name: {"per": per, "dtype": dtype_name(value.dtype), "shape": list(value.shape[1:])} for name, (per, value) in kept.items()}


class WindowRows:
    """One window's kept rows, filled micro-batch by micro-batch in any order,
    read back in input order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: dict[str, list[Any]] = {}

    def add(self, batch: MicroBatch, kept: dict[str, tuple[str, torch.Tensor]]) -> None:
        lengths = batch.attention_mask.sum(1).tolist()
        for name, (per, value) in kept.items():
            slots = self.parts.get(name)
            if slots is None:
                slots = self.parts[name] = [None] * self.size
            pieces = value.split(lengths) if per == "token" else value.unbind(0)
            for local, piece in zip(batch.rows, pieces):
                slots[local] = piece

    def tensors(self, keys: dict[str, dict]) -> dict[str, torch.Tensor]:
        out = {}
        for name, info in keys.items():
            slots = self.parts[name]
            out[name] = torch.cat(slots) if info["per"] == "token" else torch.stack(slots)
        return out
