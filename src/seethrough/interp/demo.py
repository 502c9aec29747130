"""``seethrough demo``: a tour of the interp helpers on a real language model.

Four analyses of SmolLM2-135M-Instruct (or any causal LM given with
``--model``), each printed as a plain-text table with a line of explanation:

1. activation statistics of the residual stream across layers;
2. a logit lens for "The capital of France is";
3. activation patching "The Eiffel Tower is in" -> "The Colosseum is in"
   (p(" Paris") and p(" Rome") per patched layer), plus a PNG heatmap of every
   (layer, position) cell;
4. a steering vector (sad minus happy) added during greedy generation, with
   the text before and after.

:func:`run_demo` does the work; :mod:`seethrough.cli` only parses arguments.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

from tqdm import tqdm

from .lens import logit_lens
from .patching import PatchingResult, activation_patching, shared_positions
from .plots import patching_heatmap
from .stats import activation_stats
from .steering import generate_text, steering_vector
from ._common import num_layers, show_token
from .tables import bar, format_table, section

LENS_PROMPT = "The capital of France is"
CLEAN, CORRUPTED = "The Eiffel Tower is in", "The Colosseum is in"
TARGETS = (" Paris", " Rome")
STEER_PROMPT = "Yesterday, my friend and I went to"
# A mood contrast: on SmolLM2 (layer 10 of 30, scale 4) it turns a cheerful
# anniversary story into a gloomy one while the text stays fluent.
SAD = [
    "I am so sad and lonely.",
    "Everything went wrong and I cried all night.",
    "My heart is broken and full of grief.",
    "It was a miserable, depressing day.",
]
HAPPY = [
    "I am so happy and cheerful.",
    "Everything went right and I laughed all night.",
    "My heart is full and full of joy.",
    "It was a wonderful, delightful day.",
]
STEER_SCALE = 4.0


@dataclass
class DemoOptions:
    """What ``seethrough demo`` was asked to do."""

    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct, offline)
    layers: int | None = None  # keep only the first N decoder layers
    png: str = "seethrough-demo-patching.png"
    max_new_tokens: int = 24
    quiet: bool = False  # no progress bars, no explanations
    last_position_only: bool = False  # patch the last position only (faster)


def _prob(p: float) -> str:
    """A probability, readable at both ends: 0.7725, 0.0021, 3.4e-05."""
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


class _Printer:
    """Writes sections and tables to ``out``; explanations only when not quiet."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet

    def section(self, title: str, explanation: str) -> None:
        print(file=self.out)
        print(section(title, "" if self.quiet else explanation), file=self.out)

    def line(self, text: str = "") -> None:
        print(text, file=self.out)
        self.out.flush()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own bars and load reports (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(options: DemoOptions) -> Any:
    """The language model of the demo, weights loaded, with a progress bar."""
    from ..models import LanguageModel

    kwargs: dict[str, Any] = {}
    if options.layers is not None:
        kwargs["num_hidden_layers"] = options.layers
    args = () if options.model is None else (options.model,)
    if options.model is None and options.quiet:
        from ..models.offline import smollm2_dir

        smollm2_dir(progress=False)  # a first run converts the bundled model: without its bar
    with tqdm(total=2, desc="loading model", unit="step", disable=options.quiet, file=sys.stderr) as progress:
        with _quiet_transformers():
            model = LanguageModel(*args, **kwargs)
            progress.update()
            model.dispatch()
            progress.update()
    return model


def show_stats(model: Any, printer: _Printer) -> None:
    printer.section(
        f"1. Activation statistics across layers: {LENS_PROMPT!r}",
        "Size of the residual stream after each layer: L2 norm, mean and largest |value| at the last\n"
        "token and averaged over all tokens. Huge averages come from the first token (an attention sink).",
    )
    rows = activation_stats(model, LENS_PROMPT)
    table = [
        [r.layer, f"{r.norm_last:.1f}", f"{r.norm_avg:.1f}", f"{r.mean_last:+.3f}", f"{r.mean_avg:+.3f}",
         f"{r.max_abs_last:.1f}", r.top_dim_last, f"{r.max_abs_avg:.1f}"]
        for r in rows
    ]
    headers = ["layer", "norm last", "norm avg", "mean last", "mean avg", "max|x| last", "at dim", "max|x| avg"]
    printer.line(format_table(headers, table))


def show_lens(model: Any, printer: _Printer) -> None:
    target = TARGETS[0]
    printer.section(
        f"2. Logit lens: {LENS_PROMPT!r}",
        "What the model would predict next if it stopped after each layer (the final norm and the\n"
        "unembedding applied to that layer's residual stream). The last row is the real prediction.",
    )
    rows = logit_lens(model, LENS_PROMPT, target=target, k=3)
    table = [
        [r.layer, *[f"{show_token(tok)} {_prob(p)}" for tok, p in r.top], _prob(r.target_prob), r.target_rank]
        for r in rows
    ]
    headers = ["layer", "top-1", "top-2", "top-3", f"p({target!r})", "rank"]
    printer.line(format_table(headers, table))


def show_patching(model: Any, options: DemoOptions, printer: _Printer) -> PatchingResult:
    printer.section(
        f"3. Activation patching: {CLEAN!r} (clean) -> {CORRUPTED!r} (corrupted)",
        "The clean run's residual stream at one layer and position is copied into the corrupted run;\n"
        f"where p({TARGETS[0]!r}) comes back, that cell carries the answer. Table: last token; PNG: every token.",
    )
    positions = (-1,) if options.last_position_only else None
    total = num_layers(model) * (1 if positions else _shared_count(model))
    with tqdm(total=total, desc="patching", unit="cell", disable=options.quiet, file=sys.stderr) as progress:
        result = activation_patching(model, CLEAN, CORRUPTED, TARGETS, positions=positions, progress=progress.update)
    a, b = (f"p({t!r})" for t in TARGETS)
    for label, probs in (("clean    ", result.clean), ("corrupted", result.corrupted)):
        printer.line(f"unpatched {label} : {a} = {_prob(float(probs[0]))}   {b} = {_prob(float(probs[1]))}")
    printer.line()
    last = result.positions.index(-1)
    table = [
        [layer, _prob(float(p[0])), _prob(float(p[1])), bar(float(p[0]))]
        for layer, p in zip(result.layers, result.probs[:, last])
    ]
    printer.line(format_table(["patched layer", a, b, f"{a} bar"], table))
    if len(result.positions) > 1:
        printer.line()
        printer.line(_best_cell(result))
    return result


def _shared_count(model: Any) -> int:
    return len(shared_positions(model, CLEAN, CORRUPTED))


def _best_cell(result: PatchingResult) -> str:
    """One sentence naming the (layer, position) cell that restores the clean answer most."""
    paris = result.probs[..., 0]
    flat = int(paris.argmax())
    layer_index, position_index = divmod(flat, paris.shape[1])
    clean_tok, corrupted_tok = result.clean_tokens[position_index], result.corrupted_tokens[position_index]
    return (
        f"Over all {paris.numel()} (layer, position) cells, {TARGETS[0]!r} comes back most when patching layer "
        f"{result.layers[layer_index]} at position {result.positions[position_index]} "
        f"({show_token(clean_tok)} -> {show_token(corrupted_tok)}) "
        f"(p = {_prob(float(paris.max()))})."
    )


def show_steering(model: Any, options: DemoOptions, printer: _Printer) -> None:
    layer = max(0, round(num_layers(model) / 3))
    printer.section(
        f"4. Steering: sad minus happy, added at layer {layer} during generation",
        f"The mean residual stream of {len(SAD)} sad sentences minus that of {len(HAPPY)} happy ones, times "
        f"{STEER_SCALE:g},\nis added to layer {layer}'s output at every generation step (greedy decoding).",
    )
    vector = steering_vector(model, SAD, HAPPY, layer)
    texts = {}
    for label, steer in (("before", None), ("after", vector)):
        with tqdm(total=options.max_new_tokens, desc=f"generating ({label} steering)", unit="tok",
                  disable=options.quiet, file=sys.stderr) as progress:
            texts[label] = generate_text(model, STEER_PROMPT, options.max_new_tokens, steer=steer, layer=layer,
                                         scale=STEER_SCALE, on_step=progress.update)
    printer.line(f"steering vector: layer {layer}, norm {float(vector.norm()):.2f}, scale {STEER_SCALE:g}")
    printer.line(f"prompt          : {STEER_PROMPT!r}")
    printer.line(f"before steering : {texts['before']!r}")
    printer.line(f"after steering  : {texts['after']!r}")


def run_demo(options: DemoOptions, out: TextIO | None = None, model: Any = None) -> Path:
    """Run the whole demo, printing to ``out`` (stdout); returns the PNG's path.

    ``model``: an already loaded ``LanguageModel`` to use instead of loading
    ``options.model`` (``options.layers`` is then ignored).
    """
    out = out or sys.stdout
    printer = _Printer(out, options.quiet)
    start = time.perf_counter()
    if model is None:
        name = options.model or "SmolLM2-135M-Instruct (default, offline)"
        model = load_model(options)
    else:
        name = options.model or "the given model"
    printer.line(f"seethrough demo: {name}, {num_layers(model)} layers")
    show_stats(model, printer)
    show_lens(model, printer)
    result = show_patching(model, options, printer)
    png = patching_heatmap(result, options.png, title=f"Patching {CLEAN!r} into {CORRUPTED!r}")
    printer.line(f"heatmap written to {Path(png).resolve()}")
    show_steering(model, options, printer)
    printer.line()
    printer.line(f"done in {time.perf_counter() - start:.1f} s")
    return Path(png)
