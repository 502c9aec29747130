"""Per-layer activation statistics of the residual stream.

For each decoder layer's output (the residual stream, before the final norm):
the L2 norm, the mean and the largest absolute value over the hidden
dimension, both at the last token and averaged over all tokens of the prompt.
A growing norm and a few very large dimensions ("massive activations") are
typical of trained transformers and worth knowing before steering or patching.

.. code-block:: python

    for row in activation_stats(model, "The capital of France is"):
        print(row.layer, row.norm_last, row.max_abs_avg)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._common import check_layers, layer_envoys, residual


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer's residual stream (``_last``: last token; ``_avg``: mean over tokens)."""

    layer: int
    norm_last: float
    norm_avg: float
    mean_last: float
    mean_avg: float
    max_abs_last: float
    max_abs_avg: float
    top_dim_last: int  # the hidden dimension holding max_abs_last


def _summary(hidden: torch.Tensor) -> torch.Tensor:
    """``[tokens, 3]``: norm, mean and max |x| of each token's vector."""
    hidden = hidden.float()
    return torch.stack([hidden.norm(dim=-1), hidden.mean(dim=-1), hidden.abs().amax(dim=-1)], dim=-1)


def residual_summaries(model: Any, prompt: str, layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summaries [layers, tokens, 3], top dims at the last token [layers])``
    for one prompt, from a single forward pass."""
    envoys = layer_envoys(model, check_layers(model, layers))
    with torch.no_grad():
        with model.trace(prompt):
            per_layer = []
            top_dims = []
            for envoy in envoys:
                hidden = residual(envoy.output)[0]
                per_layer.append(_summary(hidden))
                top_dims.append(hidden[-1].abs().argmax())
            summaries = torch.stack(per_layer).save()
            dims = torch.stack(top_dims).save()
    return summaries, dims


def activation_stats(model: Any, prompt: str, layers: Sequence[int] | None = None) -> list[LayerStats]:
    """One :class:`LayerStats` per layer for ``prompt`` (a single string)."""
    chosen = check_layers(model, layers)
    summaries, dims = residual_summaries(model, prompt, chosen)
    rows = []
    for layer, summary, dim in zip(chosen, summaries, dims):
        last, avg = summary[-1], summary.mean(dim=0)
        rows.append(LayerStats(
            layer, float(last[0]), float(avg[0]), float(last[1]), float(avg[1]),
            float(last[2]), float(avg[2]), int(dim),
        ))
    return rows
