"""Activation patching over every layer x every position: how fast is each way of doing it?

Run from the repository root:

    python bench/patching_sweep.py            # full run (a few minutes on 2 shared cores)
    python bench/patching_sweep.py --quick    # smoke run for CI (fewer layers/positions; numbers not meaningful)

GPT-2 small (``GPT2Config()``, random weights, real tokenizer).  A clean and a
corrupted prompt of exactly 16 tokens each, built token by token (an
indirect-object sentence; the corrupted one swaps the second name).  For each
cell (layer, position) the clean block output at that position is written
into the corrupted run; the metric is the logit difference
``logit(" Mary") - logit(" John")`` at the last position.  Four methods:

(a) one seethrough trace per cell;
(b) seethrough, many invokes batched into one trace (one invoke per cell,
    ``--chunk`` cells per trace, default 16);
(c) raw PyTorch hooks, one forward per cell, a forward hook doing the patch;
(d) raw hooks batched: one forward over ``--chunk`` copies of the corrupted
    prompt, a hook on each needed block patching row i at its cell (the fair
    batched reference for (b)).

The clean run (every block output saved) is done once, outside the timing:
a full sweep needs it once, whatever the method.  Section 1 times the four
methods interleaved; each round every method patches the same block of cells
(one layer x every position by default), and successive rounds move through
the layers, so after one pass every method has computed the whole result
matrix; the script then checks that all four matrices agree (max abs
difference).  Section 2 times one batched trace (and one batched raw forward)
per chunk size, to show the chunk-size trade-off.

The trace bodies below must live in a real source file: seethrough reads a
``with model.trace(...)`` body from its source.
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

import seethrough  # noqa: E402
from seethrough import LanguageModel  # noqa: E402

# The clean prompt, one GPT-2 token per entry (checked); the corrupted prompt
# swaps the second " John" (index 11) for " Mary", so the answer flips.
WORDS = ["Then", ",", " when", " Mary", " and", " John", " went", " to", " the", " store", ",", " John",
         " gave", " a", " drink", " to"]
SWAP_INDEX, SWAP_WORD = 11, " Mary"
GOOD, BAD = " Mary", " John"  # metric: logit(GOOD) - logit(BAD) at the last position
DEFAULT_CHUNK = 16
CHUNK_SIZES = (8, 16, 32, 64)


# -- seethrough trace bodies (GPT-2, transformers v5: h[i].output is the hidden-state tensor) --


def st_clean(model, x, n_layers, kw):
    """The clean run: every block output saved."""
    with model.trace(x, **kw):
        hs = [model.transformer.h[layer].output.save() for layer in range(n_layers)]
    return hs


def st_cell(model, x, clean, layer, pos, good, bad, kw):
    """(a) one trace per cell."""
    with model.trace(x, **kw):
        model.transformer.h[layer].output[:, pos] = clean[layer][:, pos]
        logits = model.lm_head.output[:, -1]
        diff = (logits[:, good] - logits[:, bad]).save()
    return diff


def st_chunk(model, x, clean, cells, good, bad, kw):
    """(b) one trace, one invoke per cell: a single batched forward."""
    diffs = []
    with model.trace() as tracer:
        for layer, pos in cells:
            with tracer.invoke(x, **kw):
                model.transformer.h[layer].output[:, pos] = clean[layer][:, pos]
                logits = model.lm_head.output[:, -1]
                diffs.append((logits[:, good] - logits[:, bad]).save())
    return diffs


# -- raw PyTorch references ----------------------------------------------------------------


def raw_clean(hf, x, mask, kw):
    saved = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(i, o))
        for i, block in enumerate(hf.transformer.h)
    ]
    try:
        hf(x, attention_mask=mask, **kw)
    finally:
        for h in handles:
            h.remove()
    return [saved[i] for i in range(len(hf.transformer.h))]


def raw_cell(hf, x, mask, clean, layer, pos, good, bad, kw):
    """(c) one forward per cell, a forward hook doing the patch."""

    def hook(module, inputs, output):
        output[:, pos] = clean[layer][:, pos]

    handle = hf.transformer.h[layer].register_forward_hook(hook)
    try:
        logits = hf(x, attention_mask=mask, **kw).logits[:, -1]
    finally:
        handle.remove()
    return logits[:, good] - logits[:, bad]


def raw_chunk(hf, x, mask, clean, cells, good, bad, kw):
    """(d) one forward over len(cells) copies; the hook on block l patches row i at its position."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, pos) in enumerate(cells):
        by_layer.setdefault(layer, []).append((row, pos))
    handles = []
    try:
        for layer, items in by_layer.items():
            rows = torch.tensor([r for r, _ in items])
            positions = torch.tensor([p for _, p in items])
            values = clean[layer][0, positions]  # [k, hidden]

            def hook(module, inputs, output, rows=rows, positions=positions, values=values):
                output[rows, positions] = values

            handles.append(hf.transformer.h[layer].register_forward_hook(hook))
        n = len(cells)
        logits = hf(x.expand(n, -1), attention_mask=mask.expand(n, -1), **kw).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return list((logits[:, good] - logits[:, bad]).unsqueeze(1).unbind(0))


# -- setup -----------------------------------------------------------------------------------


def prompts(tok) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    ids = []
    for word in WORDS:
        t = tok(word)["input_ids"]
        if len(t) != 1:
            raise SystemExit(f"{word!r} is {len(t)} GPT-2 tokens, expected 1")
        ids.append(t[0])
    clean = torch.tensor([ids])
    corrupted = clean.clone()
    (swap,) = tok(SWAP_WORD)["input_ids"]
    corrupted[0, SWAP_INDEX] = swap
    (good,) = tok(GOOD)["input_ids"]
    (bad,) = tok(BAD)["input_ids"]
    return clean, corrupted, good, bad


def positions_of(args) -> range:
    """The patched positions: the last ``args.positions`` of the prompt (so a short
    --quick run still covers the swapped token and the positions after it)."""
    return range(len(WORDS) - args.positions, len(WORDS))


def chunks(cells: list, size: int) -> list[list]:
    return [cells[i:i + size] for i in range(0, len(cells), size)]


class Rotating:
    """A condition that processes block ``n mod len(blocks)`` of cells on its n-th call.

    The harness calls every condition exactly once per round, so on round n all
    conditions work on the same block of cells; the results of every call are kept
    (cell -> value) for the cross-method check."""

    def __init__(self, blocks: list[list[tuple[int, int]]], work: Callable[[list], list]) -> None:
        self.blocks = blocks
        self.work = work
        self.calls = 0
        self.results: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self) -> None:
        block = self.blocks[self.calls % len(self.blocks)]
        self.calls += 1
        values = self.work(block)
        for cell, value in zip(block, values):
            self.results[cell] = value.reshape(())

    def matrix(self, n_layers: int, positions: range) -> torch.Tensor:
        for block in self.blocks:  # cells never reached by the timed rounds (few rounds): compute them now
            if any(cell not in self.results for cell in block):
                for cell, value in zip(block, self.work(block)):
                    self.results[cell] = value.reshape(())
        m = torch.empty(n_layers, len(positions))
        for (layer, pos), value in self.results.items():
            m[layer, pos - positions.start] = value
        return m


def ratio_of(a: str, b: str):
    return lambda t: statistics.median(t[a]) / statistics.median(t[b])


def ci_text(ci: tuple[float, float]) -> str:
    return f"{ci[0]:.2f}x .. {ci[1]:.2f}x"


# -- section 1 -------------------------------------------------------------------------------


def section_methods(args, env, targets: H.Targets) -> None:
    hf, model, clean_ids, corr_ids, mask, good, bad, kw, st_h, raw_h = env
    n_layers, n_pos, chunk = args.layers, args.positions, args.chunk
    # Cells in layer-major order; a block of cells = `layers_per_round` whole layers.
    cells = [(layer, pos) for layer in range(n_layers) for pos in positions_of(args)]
    per_block = args.layers_per_round * n_pos
    blocks = chunks(cells, per_block)
    rounds = args.rounds or max(len(blocks), int(len(blocks) * (1 if args.quick else args.rounds_scale)))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)

    names = {
        "a": "(a) seethrough, one trace per cell",
        "b": f"(b) seethrough, batched invokes ({chunk} per trace)",
        "c": "(c) raw hooks, one forward per cell",
        "d": f"(d) raw hooks, batched ({chunk} rows per forward)",
    }
    conds = {
        names["a"]: Rotating(blocks, lambda blk: [st_cell(model, corr_ids, st_h, l, p, good, bad, kw) for l, p in blk]),
        names["b"]: Rotating(blocks, lambda blk: [v for c in chunks(blk, chunk) for v in st_chunk(model, corr_ids, st_h, c, good, bad, kw)]),
        names["c"]: Rotating(blocks, lambda blk: [raw_cell(hf, corr_ids, mask, raw_h, l, p, good, bad, kw) for l, p in blk]),
        names["d"]: Rotating(blocks, lambda blk: [v for c in chunks(blk, chunk) for v in raw_chunk(hf, corr_ids, mask, raw_h, c, good, bad, kw)]),
    }
    print("## 1. The four methods")
    print()
    print(
        f"{n_layers} layers x {n_pos} positions = {len(cells)} cells; each round every method patches the same "
        f"{per_block} cells ({args.layers_per_round} layer(s) x {n_pos} positions), rounds move through the layers; "
        f"{rounds} rounds after {warmup} warm-up round(s); batched methods: {chunk} cells per forward "
        f"({-(-per_block // chunk)} forward(s) per round)."
    )
    print()
    s = H.measure(conds, rounds, warmup, seed=args.seed, progress="patching methods")
    print(f"load average after section 1: {H.loadavg()}")
    print()

    # -- correctness: every method's full matrix against the raw loop's
    mats = {k: conds[names[k]].matrix(n_layers, positions_of(args)) for k in "abcd"}
    ref = mats["c"]
    diffs = {k: (mats[k] - ref).abs().max().item() for k in "abd"}
    scale = ref.abs().max().item()
    tol = 1e-4 * max(1.0, scale)
    print(
        f"result matrix ({n_layers} x {n_pos}, logit({GOOD!r}) - logit({BAD!r}) at the last position): "
        f"range {ref.min().item():+.4f} .. {ref.max().item():+.4f}; unpatched: {env_baselines(env)}"
    )
    base = env_baselines_values(env)[1]
    moved = int(((ref - base).abs() > 1e-6).sum())
    print(
        f"cells where the patch moves the metric away from the corrupted run: {moved} of {ref.numel()} "
        f"(positions before the swapped token {SWAP_INDEX} are identical in both prompts, so patching them changes nothing)"
    )
    print(
        "max |difference| against (c) raw hooks, one forward per cell: "
        + ", ".join(f"({k}) {diffs[k]:.2e}" for k in "abd")
        + f" (tolerance {tol:.0e})"
    )
    ok = all(d <= tol for d in diffs.values())
    targets.check("all four methods give the same result matrix", f"max abs diff {max(diffs.values()):.2e}", ok)
    if not ok:
        print("** the methods DISAGREE: see the max differences above **")
    print()

    rows = []
    for key in "abcd":
        name = names[key]
        med = s[name].median
        rows.append(
            (
                name,
                f"{med * 1e3:.0f} ms",
                f"{med / per_block * 1e3:.1f} ms",
                f"{per_block / med:.2f}",
                f"{len(cells) * med / per_block:.1f} s",
                H.fmt_spread(s[name].spread),
            )
        )
    H.print_table(
        ["method", f"median per round ({per_block} cells)", "per cell", "cells / s", f"full sweep ({len(cells)} cells)", "spread"],
        rows,
        align="lrrrrr",
    )

    comparisons = [
        ("seethrough: batched (b) over one trace per cell (a)", names["a"], names["b"]),
        ("raw hooks: batched (d) over one forward per cell (c)", names["c"], names["d"]),
        ("per cell: raw hooks (c) over seethrough (a)", names["a"], names["c"]),
        ("batched: raw hooks (d) over seethrough (b)", names["b"], names["d"]),
    ]
    crow = []
    for label, slow, fast in comparisons:
        # speed-up of `fast` over `slow` = median(slow) / median(fast) = cells/s ratio
        value = s[slow].median / s[fast].median
        ci = H.bootstrap_ci(s, ratio_of(slow, fast), seed=args.seed)
        paired = H.paired_median_ratio(s[slow], s[fast])
        crow.append((label, f"{value:.2f}x", ci_text(ci), f"{paired:.2f}x"))
    H.print_table(["speed-up (cells/s ratio)", "value", "95% interval", "paired"], crow, align="lrrr")
    print(
        "'per cell: raw hooks over seethrough' > 1 means seethrough is slower by that factor (its overhead "
        "on the same work); the batched speed-ups are what batching buys."
    )
    print()
    speedup = s[names["a"]].median / s[names["b"]].median
    ci = H.bootstrap_ci(s, ratio_of(names["a"], names["b"]), seed=args.seed)
    targets.check(
        f"batched invokes beat one trace per cell by a wide margin (>= {args.min_speedup}x)",
        f"{speedup:.2f}x ({ci_text(ci)})",
        speedup >= args.min_speedup,
        ("pass" if speedup >= args.min_speedup else "MISS") + (" (unresolved)" if ci[0] < args.min_speedup <= ci[1] else ""),
    )


def env_baselines_values(env) -> tuple[float, float]:
    """The metric on the unpatched clean and corrupted runs (raw forwards)."""
    hf, model, clean_ids, corr_ids, mask, good, bad, kw, st_h, raw_h = env
    out = []
    for x in (clean_ids, corr_ids):
        logits = hf(x, attention_mask=mask, **kw).logits[:, -1]
        out.append(float(logits[0, good] - logits[0, bad]))
    return out[0], out[1]


def env_baselines(env) -> str:
    clean, corrupted = env_baselines_values(env)
    return f"clean run {clean:+.4f}, corrupted run {corrupted:+.4f}"


# -- section 2 -------------------------------------------------------------------------------


def section_chunks(args, env) -> None:
    hf, model, clean_ids, corr_ids, mask, good, bad, kw, st_h, raw_h = env
    cells = [(layer, pos) for layer in range(args.layers) for pos in positions_of(args)]
    sizes = [c for c in CHUNK_SIZES if c <= len(cells)] or [len(cells)]
    rounds = args.chunk_rounds or (1 if args.quick else max(4, int(4 * args.rounds_scale)))
    warmup = 0 if args.quick else 1
    print("## 2. Chunk size (cells per batched forward)")
    print()
    print(
        f"each condition runs ONE batched forward of c cells per round (the cells move through the sweep from "
        f"round to round); {rounds} rounds after {warmup} warm-up round(s)."
    )
    print()
    conds = {}
    for c in sizes:
        blocks = chunks(cells, c)
        conds[f"seethrough, {c} invokes"] = Rotating(blocks, lambda blk: st_chunk(model, corr_ids, st_h, blk, good, bad, kw))
        conds[f"raw hooks, {c} rows"] = Rotating(blocks, lambda blk: raw_chunk(hf, corr_ids, mask, raw_h, blk, good, bad, kw))
    s = H.measure(conds, rounds, warmup, seed=args.seed + 1, progress="chunk sizes")
    print(f"load average after section 2: {H.loadavg()}")
    print()
    rows = []
    for c in sizes:
        st, raw = s[f"seethrough, {c} invokes"], s[f"raw hooks, {c} rows"]
        rows.append(
            (
                str(c),
                f"{st.median * 1e3:.0f} ms",
                f"{c / st.median:.2f}",
                f"{raw.median * 1e3:.0f} ms",
                f"{c / raw.median:.2f}",
                f"{st.median / raw.median:.2f}x",
                f"{H.fmt_spread(st.spread)} / {H.fmt_spread(raw.spread)}",
            )
        )
    H.print_table(
        ["chunk", "seethrough trace", "cells / s", "raw batched forward", "cells / s", "seethrough / raw", "spread (st / raw)"],
        rows,
    )


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = H.common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="recorded rounds of section 1 (default: one pass over the layers, 12)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds of section 1 (default 1, --quick 0)")
    parser.add_argument("--chunk-rounds", type=int, default=0, help="recorded rounds of section 2 (default 4, --quick 1)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"cells per batched forward in section 1 (default {DEFAULT_CHUNK})")
    parser.add_argument("--layers", type=int, default=0, help="patch layers 0..N-1 (default all 12, --quick 2)")
    parser.add_argument("--positions", type=int, default=0, help="patch the last N of the 16 positions (default 16, --quick 8)")
    parser.add_argument("--layers-per-round", type=int, default=0, help="layers patched per round in section 1 (default 1)")
    parser.add_argument("--sections", default="1,2", help="comma-separated sections to run (1 methods, 2 chunk sizes)")
    parser.add_argument(
        "--last-logits-only",
        action="store_true",
        help="pass logits_to_keep=1 to every forward (raw and seethrough): the LM head then runs on the last "
        "position only (by default it runs on all 16, as a plain model(ids) call does)",
    )
    parser.add_argument("--min-speedup", type=float, default=2.0, help="the 'wide margin' of the batched-vs-per-cell target")
    args = parser.parse_args()
    args.layers = args.layers or (2 if args.quick else 12)
    args.positions = args.positions or (8 if args.quick else len(WORDS))
    args.layers_per_round = args.layers_per_round or 1
    if not (1 <= args.layers <= 12 and 1 <= args.positions <= len(WORDS) and args.chunk >= 1):
        parser.error("--layers must be 1..12, --positions 1..16, --chunk >= 1")
    H.setup_torch(args.threads, args.seed)
    H.set_clock(args.clock, args.threads)
    H.quiet_transformers()
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from seethrough.models.offline import gpt2_tokenizer

    H.print_environment(
        "activation patching sweep: seethrough vs raw PyTorch hooks",
        args.threads,
        args.quick,
        [("torch", torch.__version__), ("transformers", transformers.__version__), ("seethrough", seethrough.__version__)],
    )
    tok = gpt2_tokenizer()
    hf = GPT2LMHeadModel(GPT2Config(pad_token_id=tok.pad_token_id)).eval()
    model = LanguageModel(hf, tokenizer=tok)
    clean_ids, corr_ids, good, bad = prompts(tok)
    mask = torch.ones_like(clean_ids)
    kw = {"logits_to_keep": 1} if args.last_logits_only else {}
    print(
        f"GPT-2 small (GPT2Config(), random weights); clean prompt {tok.decode(clean_ids[0])!r}, corrupted prompt "
        f"swaps token {SWAP_INDEX} for {SWAP_WORD!r}; both exactly {clean_ids.shape[1]} tokens; metric "
        f"logit({GOOD!r}) - logit({BAD!r}) at the last position; LM head on "
        f"{'the last position only (logits_to_keep=1)' if kw else 'all 16 positions (a plain forward)'}. "
        "Raw forwards get the same attention mask (all ones) that seethrough passes. The clean run is done once, "
        "untimed."
    )
    print()
    targets = H.Targets()
    sections = {x.strip() for x in args.sections.split(",")}
    with torch.no_grad():
        st_h = st_clean(model, clean_ids, len(hf.transformer.h), kw)
        raw_h = raw_clean(hf, clean_ids, mask, kw)
        worst = max((a - b).abs().max().item() for a, b in zip(st_h, raw_h))
        if worst != 0.0:
            print(f"NOTE: seethrough's clean block outputs differ from raw hooks' by up to {worst:.2e}")
        env = (hf, model, clean_ids, corr_ids, mask, good, bad, kw, st_h, raw_h)
        if "1" in sections:
            section_methods(args, env, targets)
        if "2" in sections:
            section_chunks(args, env)
    if targets.results:
        targets.print_summary()
    print(f"load average at end: {H.loadavg()}")
    if args.quick:
        print("(--quick: numbers from a smoke run are not meaningful)")
    return 1 if (args.strict and not targets.all_passed) else 0


if __name__ == "__main__":
    sys.exit(main())
