"""A heatmap of an activation patching result, written to a PNG file.

Uses matplotlib's object API with the Agg canvas directly: no display, no
``pyplot`` state and no global backend switch.  matplotlib is imported only
when a plot is made (it is an optional dependency: ``seethrough[demo]``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .patching import PatchingResult


def _labels(result: PatchingResult) -> list[str]:
    if len(result.positions) == 1:
        return [f"p({t!r})" for t in result.targets]
    return [f"{k!r}→{c!r}" for k, c in zip(result.clean_tokens, result.corrupted_tokens)]


def patching_heatmap(result: PatchingResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Save ``result`` as a heatmap PNG and return its path.

    One position: layers x targets.  Several positions: one panel per target,
    layers x positions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = result.probs.float().numpy()  # [layers, positions, targets]
    single = len(result.positions) == 1
    panels = [probs[:, 0, :]] if single else [probs[:, :, t] for t in range(len(result.targets))]
    names = [""] if single else [f"p({t!r})" for t in result.targets]
    width = max(6.5 / len(panels), 2.2 + 1.1 * panels[0].shape[1])
    height = 1.6 + 0.22 * len(result.layers)
    figure = Figure(figsize=(width * len(panels), height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel, name in zip(axes, panels, names):
        image = ax.imshow(panel, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
        ax.set_xticks(range(panel.shape[1]), _labels(result), rotation=30 if not single else 0, ha="right" if not single else "center")
        ax.set_yticks(range(len(result.layers)), [str(layer) for layer in result.layers])
        ax.set_ylabel("patched layer")
        ax.set_xlabel("target" if single else "patched position (clean token → corrupted token)")
        ax.set_title(name)
        figure.colorbar(image, ax=ax, label="probability")
    figure.suptitle(title or "Activation patching: clean residual patched into the corrupted run", fontsize="medium")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
