"""nnsight, measured the way bench/trace_overhead.py measures seethrough.

Runs in a separate environment that has nnsight and NOT seethrough (this file
never imports seethrough); see bench/README.md:

    /work/nnsight-venv/bin/python bench/compare_nnsight.py            # full run
    /work/nnsight-venv/bin/python bench/compare_nnsight.py --quick    # smoke run

Same harness (bench/_harness.py), same models, inputs, seeds and conditions:

1. GPT-2 small (124M, random weights) at 1x32 and 1x128 tokens: raw forward,
   raw hooks saving every block output (the reference), nnsight traces with no
   access, one save, every block saved, one in-place edit.
2. Fixed costs in microseconds: empty and one-save traces on the 2-layer MLP
   (and, as extra context, on the 64-wide GPT-2s with 2 and 12 blocks).

nnsight installs a controller in every wrapped module's ``forward`` and leaves
it there, so the raw forward and raw-hook references run on an identical,
never-wrapped copy of the module (the bare model); the wrapped module called
outside any trace is shown as a separate row.

In transformers v5 a GPT-2 block returns the hidden-state tensor itself, so
``model.transformer.h[i].output`` is that tensor under nnsight too (no ``[0]``).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

import nnsight  # noqa: E402
from nnsight import NNsight  # noqa: E402

if "seethrough" in sys.modules:  # pragma: no cover - a guard for the comparison's fairness
    raise SystemExit("compare_nnsight.py must run without seethrough imported")


# -- the trace bodies (nnsight captures them from this source file too) --------------


def nn_empty(model, x):
    with model.trace(x):
        pass


def nn_save_block(model, x, i):
    with model.trace(x):
        h = model.transformer.h[i].output.save()
    return h


def nn_save_first_blocks(model, x, k):
    with model.trace(x):
        # nnsight hands back only saved values: a list of saved tensors is not
        # itself saved, so the list is saved (its elements come back with it).
        hs = nnsight.save([model.transformer.h[i].output for i in range(k)])
    return hs


def nn_zero_block(model, x, i):
    with model.trace(x):
        model.transformer.h[i].output[:] = 0


def nn_mlp_save(model, x):
    with model.trace(x):
        h = model.act.output.save()
    return h


def check_semantics() -> None:
    """The conditions do what they say under nnsight (block output is a tensor, saves
    are real tensors, the edit changes the logits, an empty trace runs the model)."""
    g = H.gpt2_tiny(2)
    bare = copy.deepcopy(g)
    model = NNsight(g)
    x = H.token_ids(H.TINY_VOCAB, 8, 0)
    calls = []
    handle = g.register_forward_hook(lambda *a: calls.append(1))
    nn_empty(model, x)
    handle.remove()
    assert calls, "nnsight's empty trace did not run the model"
    h = nn_save_block(model, x, 1)
    assert isinstance(h, torch.Tensor), type(h)
    ref = H.hooks_saving(bare, [bare.transformer.h[1]], x)[0]
    assert torch.equal(h, ref), "saved block output differs from the raw hook's"
    hs = nn_save_first_blocks(model, x, 2)
    assert len(hs) == 2 and all(isinstance(t, torch.Tensor) for t in hs)
    saved = []
    hook = g.register_forward_hook(lambda m, a, o: saved.append(o.logits))
    nn_zero_block(model, x, 0)
    hook.remove()
    edited = H.hooks_zeroing(bare, bare.transformer.h[0], x).logits
    assert torch.allclose(saved[0], edited), "nnsight's edit differs from the raw-hook edit"


def section_gpt2_small(args) -> None:
    print("## 1. GPT-2 small (124M, GPT2Config(), random weights) under nnsight")
    print()
    module = H.gpt2_small()
    bare = copy.deepcopy(module)
    model = NNsight(module)
    blocks = list(bare.transformer.h)
    n = len(blocks)
    lengths = (32,) if args.quick else (32, 128)
    rounds = 3 if args.quick else max(20, int(25 * args.rounds_scale))
    warmup = 1 if args.quick else 2
    print(
        f"{H.count_modules(bare)} modules; the one save / the edit are block 5's output (zeroed in place); raw forward "
        f"and raw hooks run on a never-wrapped copy; raw hooks are registered before and removed after each forward. "
        f"{rounds} rounds after {warmup} warm-up."
    )
    print()
    for length in lengths:
        x = H.token_ids(bare.config.vocab_size, length, args.seed)
        conditions = {
            "raw forward": lambda: bare(x),
            "raw hooks, every block saved (reference)": lambda: H.hooks_saving(bare, blocks, x),
            "raw hook, one edit": lambda: H.hooks_zeroing(bare, blocks[5], x),
            "wrapped module outside a trace": lambda: module(x),
            "trace, no access": lambda: nn_empty(model, x),
            "trace, 1 save": lambda: nn_save_block(model, x, 5),
            "trace, every block saved": lambda: nn_save_first_blocks(model, x, n),
            "trace, one edit": lambda: nn_zero_block(model, x, 5),
        }
        s = H.measure(conditions, rounds, warmup, seed=args.seed, progress=f"nnsight GPT-2 small 1x{length}")
        ref_s = s["raw hooks, every block saved (reference)"]
        ref, raw = ref_s.median, s["raw forward"].median
        rows = []
        ref_name = "raw hooks, every block saved (reference)"
        for name in conditions:
            med = s[name].median
            ci = H.bootstrap_ci(s, lambda t, name=name: statistics.median(t[name]) / statistics.median(t[ref_name]), seed=args.seed)
            rows.append(
                (
                    name,
                    H.fmt_ms(med),
                    H.fmt_ratio(med / ref),
                    "" if name == ref_name else f"{H.fmt_ratio(ci[0])} .. {H.fmt_ratio(ci[1])}",
                    H.fmt_ratio(H.paired_median_ratio(s[name], ref_s)),
                    H.fmt_ratio(med / raw),
                    H.fmt_spread(s[name].spread),
                    "<= 1.05x" if name == "trace, every block saved" else "-",
                    H.judge(med / ref, ci, 1.05)[1] if name == "trace, every block saved" else "-",
                )
            )
        print(f"### batch 1 x {length} tokens")
        print()
        H.print_table(
            ["condition", "median", "vs reference", "95% interval", "paired", "vs raw forward", "spread", "target (seethrough's)", "result"],
            rows,
            align="lrrrrrrrr",
        )


def section_fixed_costs(args) -> None:
    print("## 2. Fixed costs on tiny models under nnsight (microseconds)")
    print()
    print(
        "fixed cost = median(trace) - median(raw forward of the never-wrapped copy), same input, interleaved, with its "
        "95% bootstrap interval (rounds resampled); 'paired' = median over rounds of the same difference within a round."
    )
    print()
    torch.manual_seed(args.seed)
    mlp = H.MLP2().eval()
    g2, g12 = H.gpt2_tiny(2), H.gpt2_tiny(12)
    bare_mlp, bare2, bare12 = copy.deepcopy(mlp), copy.deepcopy(g2), copy.deepcopy(g12)
    m_mlp, m2, m12 = NNsight(mlp), NNsight(g2), NNsight(g12)
    xm = torch.randn(1, 16, generator=torch.Generator().manual_seed(args.seed))
    xt = H.token_ids(H.TINY_VOCAB, 32, args.seed)

    rounds = 200 if args.quick else int(3000 * args.rounds_scale)
    s_mlp = H.measure(
        {
            "raw forward": lambda: bare_mlp(xm),
            "wrapped module outside a trace": lambda: mlp(xm),
            "empty trace": lambda: nn_empty(m_mlp, xm),
            "one-save trace": lambda: nn_mlp_save(m_mlp, xm),
        },
        rounds,
        20 if args.quick else 200,
        seed=args.seed,
        progress="nnsight MLP fixed costs",
    )
    rounds_g = 30 if args.quick else int(1000 * args.rounds_scale)
    s_g = H.measure(
        {
            "2L raw forward": lambda: bare2(xt),
            "2L wrapped module outside a trace": lambda: g2(xt),
            "2L empty trace": lambda: nn_empty(m2, xt),
            "2L one-save trace": lambda: nn_save_block(m2, xt, 1),
            "12L raw forward": lambda: bare12(xt),
            "12L wrapped module outside a trace": lambda: g12(xt),
            "12L empty trace": lambda: nn_empty(m12, xt),
            "12L one-save trace": lambda: nn_save_block(m12, xt, 6),
        },
        rounds_g,
        5 if args.quick else 30,
        seed=args.seed,
        progress="nnsight tiny GPT-2 fixed costs",
    )

    rows = []
    costs = {}
    for label, s, prefix in (
        (f"2-layer MLP ({H.count_modules(bare_mlp)} modules)", s_mlp, ""),
        (f"GPT-2 64-wide, 2 blocks ({H.count_modules(bare2)} modules)", s_g, "2L "),
        (f"GPT-2 64-wide, 12 blocks ({H.count_modules(bare12)} modules)", s_g, "12L "),
    ):
        raw = s[prefix + "raw forward"]
        rows.append((label, "raw forward (never-wrapped copy)", H.fmt_us(raw.median), "", "", "", H.fmt_spread(raw.spread), "", ""))
        for cond in ("wrapped module outside a trace", "empty trace", "one-save trace"):
            name = prefix + cond
            c = s[name]
            d = c.median - raw.median
            ci = H.bootstrap_ci(
                s,
                lambda t, name=name, raw_name=prefix + "raw forward": statistics.median(t[name]) - statistics.median(t[raw_name]),
                seed=args.seed,
            )
            costs[name] = d
            target, result = "-", "-"
            if prefix == "" and cond == "one-save trace":
                target, result = "<= 100 us", H.judge(d * 1e6, (ci[0] * 1e6, ci[1] * 1e6), 100)[1]
            rows.append(
                (
                    label,
                    cond,
                    H.fmt_us(c.median),
                    H.fmt_us(d),
                    f"{H.fmt_us(ci[0])} .. {H.fmt_us(ci[1])}",
                    H.fmt_us(H.paired_median_diff(c, raw)),
                    H.fmt_spread(c.spread),
                    target,
                    result,
                )
            )
    H.print_table(
        ["model", "condition", "median", "fixed cost", "95% interval", "paired", "spread", "target (seethrough's)", "result"],
        rows,
        align="llrrrrrrr",
    )
    e2, e12 = costs["2L empty trace"], costs["12L empty trace"]

    def independence(t):
        a = statistics.median(t["2L empty trace"]) - statistics.median(t["2L raw forward"])
        b = statistics.median(t["12L empty trace"]) - statistics.median(t["12L raw forward"])
        return b / a if a > 0 else float("inf")

    ci = H.bootstrap_ci(s_g, independence, seed=args.seed)
    print(
        f"empty-trace fixed cost, 12 blocks / 2 blocks: {H.fmt_us(e12)} / {H.fmt_us(e2)} = "
        f"{(e12 / e2 if e2 > 0 else float('inf')):.2f}x (95% interval {ci[0]:.2f}x .. {ci[1]:.2f}x; seethrough's target: <= 1.2x)"
    )
    print()


def main() -> int:
    parser = H.common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2", help="comma-separated sections to run (1 GPT-2 small, 2 fixed costs)")
    args = parser.parse_args()
    H.setup_torch(args.threads, args.seed)
    H.set_clock(args.clock, args.threads)
    H.quiet_transformers()
    import transformers

    H.print_environment(
        "nnsight trace overhead (for comparison with seethrough)",
        args.threads,
        args.quick,
        [("torch", torch.__version__), ("transformers", transformers.__version__), ("nnsight", nnsight.__version__)],
    )
    sections = {s.strip() for s in args.sections.split(",")}
    with torch.no_grad():
        check_semantics()
        print("semantics check passed: block output is a tensor, saves equal raw-hook outputs, the edit matches a raw-hook edit")
        print()
        if "1" in sections:
            section_gpt2_small(args)
        if "2" in sections:
            section_fixed_costs(args)
    print(f"load average at end: {H.loadavg()}")
    if args.quick:
        print("(--quick: a smoke run; the numbers are not a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
