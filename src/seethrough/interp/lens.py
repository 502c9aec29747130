"""Logit lens: what the model would predict if it stopped after each layer.

For every decoder layer, the residual stream at the last position is passed
through the model's own final norm and unembedding (``model.final_norm``, then
``model.unembed``), exactly once each, and turned into next-token
probabilities.  seethrough's ``model.layers[i].output`` is the residual *before*
the final norm, so the last layer's row equals the model's real prediction.

.. code-block:: python

    rows = logit_lens(model, "The capital of France is", target=" Paris", k=3)
    rows[-1].top[0]       # (' Paris', 0.77) on SmolLM2-135M-Instruct
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ._common import check_layers, layer_envoys, residual, target_id


@dataclass(frozen=True)
class LensRow:
    """One layer of a logit lens."""

    layer: int
    top: list[tuple[str, float]]  # the k most likely next tokens and their probabilities
    target_prob: float | None  # p(target), when a target was given
    target_rank: int | None  # 1 = the most likely token


def lens_probabilities(model: Any, prompt: str, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Next-token probabilities ``[len(layers), vocab]`` read off each layer's
    residual stream at the last position (final norm and unembedding applied once)."""
    chosen = check_layers(model, layers)
    envoys = layer_envoys(model, chosen)
    with torch.no_grad():
        with model.trace(prompt):
            last = [residual(envoy.output)[:, -1] for envoy in envoys]
            logits = model.unembed(model.final_norm(torch.cat(last)))
            probs = logits.float().softmax(-1).save()
    return probs


def logit_lens(
    model: Any,
    prompt: str,
    target: str | None = None,
    k: int = 3,
    layers: Sequence[int] | None = None,
) -> list[LensRow]:
    """The logit lens of ``prompt``: per layer, the top-``k`` next tokens and
    (optionally) the probability and rank of ``target``."""
    chosen = check_layers(model, layers)
    probs = lens_probabilities(model, prompt, chosen)
    wanted = target_id(model, target) if target is not None else None
    rows = []
    for layer, row in zip(chosen, probs):
        values, ids = row.topk(k)
        top = [(model.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
        if wanted is None:
            rows.append(LensRow(layer, top, None, None))
            continue
        p = row[wanted]
        rank = int((row > p).sum()) + 1
        rows.append(LensRow(layer, top, float(p), rank))
    return rows
