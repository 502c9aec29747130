"""Activation patching: which layer (and position) carries the answer?

Run a *clean* prompt (``"The Eiffel Tower is in"``) and a *corrupted* one
(``"The Colosseum is in"``).  For each cell (layer, position), copy the clean
residual stream at that cell into the corrupted run and measure the
probabilities of target tokens (``" Paris"``, ``" Rome"``) at the last position.
Where the clean answer comes back, that cell carries the information.

All cells of a chunk go into ONE batched forward: one ``tracer.invoke`` for the
clean prompt (its residuals are saved), then one invoke per cell patching them
into the corrupted prompt.  Positions count from the end (``-1`` is the last
token), so prompts of different lengths line up on their last tokens.

.. code-block:: python

    result = activation_patching(model, "The Eiffel Tower is in", "The Colosseum is in",
                                 targets=(" Paris", " Rome"))
    result.probs[:, 0, 0]   # p(" Paris") per patched layer, last position
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import UsageValueError
from ._common import check_layers, layer_envoys, residual, target_id, token_count


@dataclass
class PatchingResult:
    """Target probabilities for every patched cell, plus the two baselines."""

    layers: list[int]
    positions: list[int]  # negative: counted from the end of the prompt
    targets: list[str]
    probs: torch.Tensor  # [len(layers), len(positions), len(targets)]
    clean: torch.Tensor  # [len(targets)]: the clean run, unpatched
    corrupted: torch.Tensor  # [len(targets)]: the corrupted run, unpatched
    clean_tokens: list[str]  # the clean prompt's tokens at `positions`
    corrupted_tokens: list[str]  # the corrupted prompt's tokens at `positions`


def shared_positions(model: Any, clean: str, corrupted: str) -> list[int]:
    """Every position both prompts have, counted from the end: ``[-n, ..., -1]``."""
    n = min(token_count(model, clean), token_count(model, corrupted))
    return list(range(-n, 0))


def _chunks(cells: list[tuple[int, int]], size: int) -> Iterable[list[tuple[int, int]]]:
    for start in range(0, len(cells), size):
        yield cells[start:start + size]


def _target_probs(model: Any, ids: list[int]) -> torch.Tensor:
    """p(targets) at the last position of the current invoke: ``[rows, len(ids)]``."""
    return model.output.logits[:, -1].float().softmax(-1)[:, ids]


def _run_chunk(
    model: Any, clean: str, corrupted: str, cells: list[tuple[int, int]], ids: list[int], baselines: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """One batched forward: the clean invoke, then one invoke per (layer, position) cell."""
    needed = sorted({layer for layer, _ in cells})
    envoys = dict(zip(needed, layer_envoys(model, needed)))
    clean_probs = base_probs = None
    with model.trace() as tracer:
        with tracer.invoke(clean):
            # Filled layer by layer (not built at once): a patching invoke reads
            # `saved[layer]` as soon as its own forward reaches that layer.
            saved = {}
            for layer in needed:
                saved[layer] = residual(envoys[layer].output).clone().save()
            if baselines:
                clean_probs = _target_probs(model, ids).save()
        if baselines:
            with tracer.invoke(corrupted):
                base_probs = _target_probs(model, ids).save()
        patched = []
        for layer, position in cells:
            with tracer.invoke(corrupted):
                hidden = residual(envoys[layer].output)  # first wait for the layer...
                hidden[:, position] = saved[layer][:, position]  # ...then read the clean value
                patched.append(_target_probs(model, ids).save())
    return patched, clean_probs, base_probs


def activation_patching(
    model: Any,
    clean: str,
    corrupted: str,
    targets: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = (-1,),
    chunk_size: int = 32,
    progress: Callable[[int], Any] | None = None,
) -> PatchingResult:
    """Patch the clean residual stream into the corrupted run, one cell at a time.

    ``positions`` are negative indices from the end (default: the last token
    only; ``None`` means every position both prompts share).  ``chunk_size``
    cells share one batched forward.  ``progress(n)``, if given, is called
    after each chunk with the number of cells it finished (e.g. ``bar.update``).
    """
    chosen = check_layers(model, layers)
    shared = shared_positions(model, clean, corrupted)
    wanted = shared if positions is None else [_check_position(p, shared) for p in positions]
    ids = [target_id(model, t) for t in targets]
    cells = [(layer, position) for layer in chosen for position in wanted]
    results: list[torch.Tensor] = []
    clean_probs = base_probs = None
    with torch.no_grad():
        for index, chunk in enumerate(_chunks(cells, max(1, chunk_size))):
            patched, c, b = _run_chunk(model, clean, corrupted, chunk, ids, baselines=index == 0)
            if index == 0:
                clean_probs, base_probs = c, b
            results.extend(patched)
            if progress is not None:
                progress(len(chunk))
    probs = torch.cat(results).reshape(len(chosen), len(wanted), len(ids))
    return PatchingResult(
        chosen, wanted, list(targets), probs, clean_probs[0], base_probs[0],
        _tokens_at(model, clean, wanted), _tokens_at(model, corrupted, wanted),
    )


def _check_position(position: int, shared: list[int]) -> int:
    if position not in shared:
        raise UsageValueError(
            f"position {position} is not shared by both prompts: positions count from the end "
            f"and must be in {shared[0]}..-1."
        )
    return position


def _tokens_at(model: Any, prompt: str, positions: list[int]) -> list[str]:
    ids = model.tokenizer(prompt)["input_ids"]
    return [model.tokenizer.decode([ids[p]]) for p in positions]
