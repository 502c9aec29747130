"""Steering vectors: push generation towards a concept.

A steering vector at layer ``L`` is the difference between the mean residual
stream of prompts that show a concept (``positive``) and of prompts that show
its opposite (``negative``), averaged over the tokens of every prompt.  The
first token of each prompt is left out: in models without a BOS token (like
SmolLM2) it is the attention sink, with huge activations that depend on the
word and would swamp the difference.
Adding ``scale * vector`` to layer ``L``'s output at every generation step
(``for step in tracer.iter[:]``) nudges what the model writes.

.. code-block:: python

    vector = steering_vector(model, ["I love you", ...], ["I hate you", ...], layer=8)
    before = generate_text(model, "I think that you", max_new_tokens=20)
    after = generate_text(model, "I think that you", max_new_tokens=20,
                          steer=vector, layer=8, scale=4.0)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import UsageValueError
from ._common import check_layers, layer_envoys, residual, token_count


def mean_residual(model: Any, prompts: Sequence[str], layer: int) -> torch.Tensor:
    """The residual stream of ``layer`` averaged over the tokens of each prompt
    (all but the first, when there are several), then over prompts: ``[hidden]``.
    All prompts share one batched forward."""
    if not prompts:
        raise UsageValueError("mean_residual needs at least one prompt.")
    (index,) = check_layers(model, [layer])
    (envoy,) = layer_envoys(model, [index])
    # Left padding: a prompt's own tokens are its last `length`; skip the first of them.
    lengths = [token_count(model, prompt) for prompt in prompts]
    spans = [length - 1 if length > 1 else 1 for length in lengths]
    with torch.no_grad():
        with model.trace() as tracer:
            means = []
            for prompt, span in zip(prompts, spans):
                with tracer.invoke(prompt):
                    means.append(residual(envoy.output)[0, -span:].float().mean(dim=0).save())
    return torch.stack(means).mean(dim=0)


def steering_vector(model: Any, positive: Sequence[str], negative: Sequence[str], layer: int) -> torch.Tensor:
    """``mean_residual(positive) - mean_residual(negative)`` at ``layer``."""
    return mean_residual(model, positive, layer) - mean_residual(model, negative, layer)


def generate_text(
    model: Any,
    prompt: str,
    max_new_tokens: int = 20,
    steer: torch.Tensor | None = None,
    layer: int | None = None,
    scale: float = 1.0,
    on_step: Callable[[int], Any] | None = None,
) -> str:
    """Greedy continuation of ``prompt`` (the new text only).

    With ``steer``, ``scale * steer`` is added to ``layer``'s output, at every
    position, at every generation step.  ``on_step(1)`` is called once per step
    (e.g. a progress bar's ``update``).
    """
    if steer is not None and layer is None:
        raise UsageValueError("steering needs the layer to add the vector at: pass `layer=`.")
    envoy = layer_envoys(model, check_layers(model, [layer]))[0] if steer is not None else None
    delta = None if steer is None else (scale * steer).to(model.device)
    with torch.no_grad():
        with model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False) as tracer:
            for _step in tracer.iter[:]:
                if envoy is not None:
                    hidden = residual(envoy.output)
                    hidden += delta.to(hidden.dtype)
                if on_step is not None:
                    on_step(1)
            tokens = tracer.result.save()
    new = tokens[0, token_count(model, prompt):]
    return model.tokenizer.decode(new, skip_special_tokens=True)
