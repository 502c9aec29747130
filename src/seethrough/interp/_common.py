"""Small shared pieces of the analysis helpers: finding the decoder layers,
reading the residual stream out of a layer's output, and turning target
strings into token ids.  Everything goes through seethrough's public API
(``model.layers``, ``model.final_norm``, ``model.unembed``, ``model.tokenizer``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..envoy import Envoy
from ..errors import UsageValueError


def layer_envoys(model: Any, layers: Sequence[int] | None = None) -> list[Envoy]:
    """The envoys of the decoder layers (``model.layers``), all or the chosen indices."""
    try:
        stack = model.layers
    except AttributeError:
        raise UsageValueError(
            f"{type(model).__name__} has no `layers` alias: the interp helpers need a model whose "
            "decoder blocks seethrough recognises (Llama, GPT-2, GPT-NeoX, ...), or `rename=` to name them."
        ) from None
    everything = list(stack)
    if layers is None:
        return everything
    return [everything[i] for i in layers]


def num_layers(model: Any) -> int:
    """How many decoder layers the model has."""
    return len(layer_envoys(model))


def check_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as sorted, unique, non-negative indices (all layers when None)."""
    total = num_layers(model)
    if layers is None:
        return list(range(total))
    chosen = set()
    for index in layers:
        if not -total <= index < total:
            raise UsageValueError(f"layer {index} does not exist: the model has {total} layers (0..{total - 1}).")
        chosen.add(index % total)
    return sorted(chosen)


def residual(output: Any) -> torch.Tensor:
    """The hidden state inside a layer's output: the tensor itself (transformers
    v5 decoder blocks) or the first element of a tuple (older versions)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def token_count(model: Any, prompt: str) -> int:
    """How many tokens ``prompt`` becomes, as seethrough would feed it."""
    return len(model.tokenizer(prompt)["input_ids"])


def target_id(model: Any, text: str) -> int:
    """The token id that stands for ``text`` as a next-token prediction: the
    first token of its encoding (``" Paris"`` is one token in most vocabularies)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageValueError(f"the target {text!r} encodes to no tokens.")
    return int(ids[0])


def show_token(text: str) -> str:
    """A token as a quoted string with its spaces and newlines visible."""
    return repr(text)
