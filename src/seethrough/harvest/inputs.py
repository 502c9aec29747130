"""What a harvest runs on: prompts read in windows, tokenized and truncated.

Inputs are a list or any iterable of strings, of token-id lists (or 1-D
integer tensors), or a HuggingFace ``datasets`` column (``ds["text"]``; the
library is not required).  They are consumed one window of ``window``
prompts at a time, so an iterable of any length never sits in memory.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from typing import Any, Iterable, Iterator

import torch

from ..errors import InputTypeError


def count_of(inputs: Any) -> int | None:
    """How many prompts, when the input knows (a list, a dataset column)."""
    try:
        return len(inputs)
    except TypeError:
        return None


def check_inputs(inputs: Any) -> Iterable:
    if isinstance(inputs, (str, bytes)):
        raise InputTypeError(
            "model.harvest(...) takes many prompts: pass a list (or iterable) of strings, not one string "
            "(wrap it: `[text]`)."
        )
    if hasattr(inputs, "column_names") and not hasattr(inputs, "__array__"):
        raise InputTypeError(
            f"model.harvest(...) got a whole dataset (columns {list(inputs.column_names)}): pass one column of "
            "text or token ids, e.g. `ds['text']`."
        )
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2 or inputs.is_floating_point():
            raise InputTypeError(f"a tensor of inputs must be 2-D integer token ids (prompts x tokens), not {inputs.dim()}-D {inputs.dtype}.")
        return (row for row in inputs)
    try:
        iter(inputs)
    except TypeError:
        raise InputTypeError(
            f"model.harvest(...) cannot read prompts from a {type(inputs).__name__}: pass a list or iterable of "
            "strings or token-id lists, or a `datasets` column."
        ) from None
    return inputs


def windows(inputs: Iterable, window: int) -> Iterator[list]:
    iterator = iter(inputs)
    while True:
        chunk = list(islice(iterator, window))
        if not chunk:
            return
        yield chunk


def tokenize(items: list, tokenizer: Any, max_length: int | None, first_id: int) -> list[list[int]]:
    """Token ids of each prompt of one window, truncated to ``max_length``."""
    kinds = set()
    for item in items:
        if isinstance(item, str):
            kinds.add("str")
        elif isinstance(item, torch.Tensor) and item.dim() == 1 and not item.is_floating_point():
            kinds.add("ids")
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            kinds.add("ids")
        else:
            raise InputTypeError(
                f"prompt {first_id + items.index(item)} is a {type(item).__name__}; harvest prompts are strings or "
                "lists of token ids (ints), one kind for the whole input."
            )
    if len(kinds) > 1:
        raise InputTypeError(f"prompts {first_id}..{first_id + len(items) - 1} mix strings and token ids; pass one kind.")
    if kinds == {"str"}:
        if tokenizer is None:
            raise InputTypeError("the model has no tokenizer, so text cannot be harvested: pass token ids, or `tokenizer=` to LanguageModel.")
        if max_length is not None:
            encoded = tokenizer(items, truncation=True, max_length=max_length)["input_ids"]
        else:
            encoded = tokenizer(items)["input_ids"]
        rows = [list(row) for row in encoded]
    else:
        rows = [[int(t) for t in (item.tolist() if isinstance(item, torch.Tensor) else item)] for item in items]
        if max_length is not None:
            rows = [row[:max_length] for row in rows]
    for number, row in enumerate(rows):
        if not row:
            raise InputTypeError(f"prompt {first_id + number} has no tokens; drop empty prompts before harvesting.")
    return rows


def ids_sha(rows: list[list[int]]) -> str:
    """A digest of one window's token ids (a resumed run checks its input is the same)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row).to_bytes(4, "little"))
        digest.update(torch.tensor(row, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:32]
