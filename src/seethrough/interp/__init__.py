"""Analysis helpers built only on seethrough's public API.

The map:

* :mod:`.lens` — :func:`logit_lens`: per layer, the top next tokens and the
  probability of a target, reading the residual stream through the model's
  own final norm and unembedding (applied once).
* :mod:`.patching` — :func:`activation_patching`: copy a clean run's residual
  stream into a corrupted run, layer by layer (and position by position), many
  cells batched into one forward pass per chunk.
* :mod:`.stats` — :func:`activation_stats`: norm, mean and max-abs of each
  layer's residual stream, at the last token and averaged over tokens.
* :mod:`.steering` — :func:`steering_vector` (difference of mean residuals)
  and :func:`generate_text` (greedy generation, optionally steered at every step).
* :mod:`.tables` — :func:`format_table`: aligned plain-text tables.
* :mod:`.plots` — :func:`patching_heatmap`: a PNG of a patching result (matplotlib).

.. code-block:: python

    from seethrough import LanguageModel
    from seethrough.interp import logit_lens, format_table

    model = LanguageModel()
    rows = logit_lens(model, "The capital of France is", target=" Paris")
    print(format_table(["layer", "top-1", "p"], [[r.layer, r.top[0][0], r.target_prob] for r in rows]))

The helpers expect a decoder language model (``seethrough.LanguageModel``)
whose blocks are reachable as ``model.layers`` and whose final norm and
unembedding are ``model.final_norm`` and ``model.unembed``.
"""

from .lens import LensRow, lens_probabilities, logit_lens
from .patching import PatchingResult, activation_patching, shared_positions
from .plots import patching_heatmap
from .stats import LayerStats, activation_stats, residual_summaries
from .steering import generate_text, mean_residual, steering_vector
from .tables import bar, format_cell, format_table, section

__all__ = [
    "LayerStats",
    "LensRow",
    "PatchingResult",
    "activation_patching",
    "activation_stats",
    "bar",
    "format_cell",
    "format_table",
    "generate_text",
    "lens_probabilities",
    "logit_lens",
    "mean_residual",
    "patching_heatmap",
    "residual_summaries",
    "section",
    "shared_positions",
    "steering_vector",
]
