"""Micro-batches of one window: length bucketing, padding, and ``batch_size="auto"``.

With ``bucket=True`` a window's prompts are sorted by length (stably) before
being cut into micro-batches, so prompts of like length share a batch and
little compute goes into padding; the store still follows input order (the
run puts the rows back).  ``batch_size="auto"`` cuts by a token budget
(prompts x padded length) derived from a memory budget, so short prompts
share larger batches; :func:`is_out_of_memory` tells the run when to split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageValueError

# On a CPU, micro-batches past this many tokens are no faster; on a GPU the
# memory budget decides alone.
CPU_TOKEN_CAP = 8192
MAX_ROWS = 1024


@dataclass
class MicroBatch:
    rows: list[int]  # window-local prompt numbers, in batch order
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan(lengths: list[int], batch_size: int | None, token_budget: int | None, bucket: bool) -> list[list[int]]:
    """Window-local prompt numbers of each micro-batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if bucket else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current:
            if batch_size is not None:
                full = len(current) >= batch_size
            else:
                full = max(longest, lengths[i]) * (len(current) + 1) > token_budget or len(current) >= MAX_ROWS
            if full:
                batches.append(current)
                current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def pad(rows: list[list[int]], pick: list[int], pad_id: int, right: bool) -> MicroBatch:
    length = max(len(rows[i]) for i in pick)
    ids = torch.full((len(pick), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pick), length), dtype=torch.long)
    for r, i in enumerate(pick):
        row = rows[i]
        n = len(row)
        if right:
            ids[r, :n] = torch.tensor(row)
            mask[r, :n] = 1
        else:
            ids[r, length - n :] = torch.tensor(row)
            mask[r, length - n :] = 1
    return MicroBatch(list(pick), ids, mask)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def bytes_per_token(module: torch.nn.Module, length: int, grad: bool) -> int:
    """A generous estimate of the activation memory one token of a forward
    needs at sequence length ``length``: the widest tensors alive at once
    (logits, MLP hidden, attention scores), twice over for temporaries."""
    config = getattr(module, "config", None)
    element = next((p.element_size() for p in module.parameters()), 4)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    vocab = getattr(config, "vocab_size", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    per = vocab + 8 * hidden + 3 * inner + 2 * heads * length
    if grad:  # every layer's activations stay for the backward pass
        per += layers * (12 * hidden + 3 * inner + heads * length)
    return 2 * element * per


def token_budget(module: torch.nn.Module, device: torch.device, max_memory: int | None, length: int, grad: bool) -> tuple[int, int]:
    """(tokens per micro-batch, memory budget in bytes) for ``batch_size="auto"``."""
    budget = int(max_memory) if max_memory is not None else free_memory(device) // 2
    tokens = max(length, budget // max(1, bytes_per_token(module, length, grad)))
    if device.type != "cuda":
        tokens = min(tokens, max(CPU_TOKEN_CAP, length))
    return int(tokens), budget


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def parse_memory(value: Any) -> int | None:
    """``max_memory=``: bytes, or a string like ``"2GB"``/``"512MiB"``."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        for unit, scale in units.items():
            if text.endswith(unit):
                try:
                    return int(float(text[: -len(unit)]) * scale)
                except ValueError:
                    break
    raise UsageValueError(f"max_memory={value!r} is not a size: pass bytes (an int) or a string like '4GB' or '512MiB'.")
