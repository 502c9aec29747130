"""What does seethrough add to HuggingFace ``generate``?

Run from the repository root:

    python bench/generation.py            # full run (several minutes on 2 shared cores)
    python bench/generation.py --quick    # smoke run for CI (numbers not meaningful)

20 new tokens, greedy (``do_sample=False``), batch 1, on SmolLM2-135M-Instruct
(the full 30-layer offline model) and GPT-2 small (``GPT2Config()``, random
weights, real tokenizer).  Conditions, interleaved within every round:

* ``raw generate``: ``hf.generate(**inputs, max_new_tokens=20, do_sample=False)``
  (the reference);
* ``raw generate + hook edit``: the same with a forward hook on one decoder
  block doing the edit at every step (``output[:, -1] += steer``), so the
  edit's own cost is separated from seethrough's;
* ``seethrough generate``: ``with model.generate(...) as tracer:`` with an
  empty body (saving only ``tracer.result``);
* ``seethrough generate + edit every step``: ``for step in tracer.iter[:]:
  block.output[:, -1] += steer``.

Target: both seethrough conditions <= 1.15x raw generate.  Before timing,
the script checks once that the edited seethrough run yields exactly the
greedy tokens of the hooked raw run (and the plain one those of raw
generate), and that every run produces 20 new tokens.

The generate bodies below must live in a real source file: seethrough reads a
``with model.generate(...)`` body from its source.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

import seethrough  # noqa: E402
from seethrough import LanguageModel  # noqa: E402

TARGET = 1.15  # x raw generate
NEW_TOKENS = 20
PROMPT = "The capital of France is"


# -- the generate bodies -------------------------------------------------------------------
# `blocks(model)` would hide the module path from the body; spell it out per architecture.


def st_plain(model, inputs, gen_kwargs):
    with model.generate(inputs, **gen_kwargs) as tracer:
        tokens = tracer.result.save()
    return tokens


def st_edit_llama(model, inputs, gen_kwargs, layer, steer):
    with model.generate(inputs, **gen_kwargs) as tracer:
        for step in tracer.iter[:]:
            model.model.layers[layer].output[:, -1] += steer
        tokens = tracer.result.save()
    return tokens


def st_edit_gpt2(model, inputs, gen_kwargs, layer, steer):
    with model.generate(inputs, **gen_kwargs) as tracer:
        for step in tracer.iter[:]:
            model.transformer.h[layer].output[:, -1] += steer
        tokens = tracer.result.save()
    return tokens


# -- raw references ------------------------------------------------------------------------


def raw_generate(hf, enc, gen_kwargs):
    return hf.generate(**enc, **gen_kwargs)


def raw_generate_hooked(hf, enc, gen_kwargs, block, steer):
    """HF generate with a forward hook doing the edit at every step; the hook is
    registered before and removed after the call (nothing left behind, as with seethrough)."""

    def hook(module, inputs, output):
        output[:, -1] += steer  # transformers v5: a decoder block returns the hidden-state tensor

    handle = block.register_forward_hook(hook)
    try:
        return hf.generate(**enc, **gen_kwargs)
    finally:
        handle.remove()


# -- one model -----------------------------------------------------------------------------


def build(name: str, seed: int):
    """(label, hf model, tokenizer, edited block, edit body, layer index, hidden size)."""
    if name == "smollm2":
        from seethrough.models.offline import load_smollm2

        hf, tok = load_smollm2()
        layer = 10
        return (
            f"SmolLM2-135M-Instruct (full, {hf.config.num_hidden_layers} layers, 4-bit-dequantized weights)",
            hf, tok, hf.model.layers[layer], st_edit_llama, layer, hf.config.hidden_size,
        )
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        from seethrough.models.offline import gpt2_tokenizer

        tok = gpt2_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = GPT2LMHeadModel(GPT2Config(pad_token_id=tok.pad_token_id)).eval()
        layer = 6
        return (
            "GPT-2 small (GPT2Config(), random weights, real tokenizer)",
            hf, tok, hf.transformer.h[layer], st_edit_gpt2, layer, hf.config.n_embd,
        )
    raise ValueError(name)


def check(label, hf, tok, model, enc, gen_kwargs, block, edit_body, layer, steer) -> str:
    """Once, outside timing: the conditions do what they claim."""
    prompt_len = enc["input_ids"].shape[1]
    raw = raw_generate(hf, enc, gen_kwargs)
    hooked = raw_generate_hooked(hf, enc, gen_kwargs, block, steer)
    plain = st_plain(model, enc["input_ids"], gen_kwargs)
    edited = edit_body(model, enc["input_ids"], gen_kwargs, layer, steer)
    problems = []
    for what, out in (("raw", raw), ("raw + hook", hooked), ("seethrough", plain), ("seethrough + edit", edited)):
        if not isinstance(out, torch.Tensor):
            problems.append(f"{what}: result is a {type(out).__name__}, not a tensor")
        elif out.shape != (1, prompt_len + NEW_TOKENS):
            problems.append(f"{what}: {tuple(out.shape)} tokens, expected (1, {prompt_len + NEW_TOKENS})")
    if not problems:
        if not torch.equal(plain, raw):
            problems.append("seethrough generate (no edit) tokens differ from raw generate")
        if not torch.equal(edited, hooked):
            first = int((edited != hooked).nonzero()[0, 1]) if edited.shape == hooked.shape else -1
            problems.append(f"edited seethrough tokens differ from the hooked raw run (first at index {first})")
    if problems:
        raise SystemExit(f"{label}: check FAILED:\n  " + "\n  ".join(problems))
    changed = not torch.equal(hooked, raw)
    text = lambda t: repr(tok.decode(t[0, prompt_len:]))  # noqa: E731
    return (
        f"check passed: greedy tokens of seethrough + edit == raw generate + hook "
        f"({'the edit changes the text' if changed else 'NOTE: the edit does not change the greedy tokens'}); "
        f"seethrough without edit == raw generate; all runs give {NEW_TOKENS} new tokens.\n"
        f"  unedited: {text(raw)}\n  edited:   {text(hooked)}"
    )


def section(name: str, args, targets: H.Targets) -> None:
    label, hf, tok, block, edit_body, layer, hidden = build(name, args.seed)
    model = LanguageModel(hf, tokenizer=tok)
    enc = tok(PROMPT, return_tensors="pt")
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ids = enc["input_ids"]
    gen_kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tok.pad_token_id}
    g = torch.Generator().manual_seed(args.seed + 1)
    steer = torch.randn(hidden, generator=g) * args.steer_scale

    print(f"## {label}")
    print()
    info = check(label, hf, tok, model, enc, gen_kwargs, block, edit_body, layer, steer)
    print(
        f"prompt {PROMPT!r} ({ids.shape[1]} tokens), {NEW_TOKENS} new tokens, greedy, batch 1; "
        f"edit: block {layer} output[:, -1] += steer (random vector, norm {steer.norm():.1f}) at every step."
    )
    print(info)
    print()

    ref = "raw generate (reference)"
    hook_name = "raw generate + hook edit"
    plain_name = "seethrough generate"
    edit_name = "seethrough generate + edit every step"
    conditions = {
        ref: lambda: raw_generate(hf, enc, gen_kwargs),
        hook_name: lambda: raw_generate_hooked(hf, enc, gen_kwargs, block, steer),
        plain_name: lambda: st_plain(model, ids, gen_kwargs),
        edit_name: lambda: edit_body(model, ids, gen_kwargs, layer, steer),
    }
    rounds = args.rounds or (2 if args.quick else max(5, int(16 * args.rounds_scale)))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    s = H.measure(conditions, rounds, warmup, seed=args.seed, progress=f"generate {name}")
    print(f"{rounds} rounds after {warmup} warm-up round(s) (plus the untimed check runs); load average now: {H.loadavg()}")
    print()

    def ratio_of(a, b):
        return lambda t: statistics.median(t[a]) / statistics.median(t[b])

    rows = []
    for cname in conditions:
        med = s[cname].median
        ratio = med / s[ref].median
        ci = H.bootstrap_ci(s, ratio_of(cname, ref), seed=args.seed)
        target, result = "-", "-"
        if cname in (plain_name, edit_name):
            target = f"<= {TARGET:.2f}x"
            ok, lab = H.judge(ratio, ci, TARGET)
            result = targets.check(
                f"{name}: {cname} <= {TARGET}x raw generate",
                f"{H.fmt_ratio(ratio)} ({H.fmt_ratio(ci[0])} .. {H.fmt_ratio(ci[1])})",
                ok,
                lab,
            )
        rows.append(
            (
                cname,
                f"{med * 1e3:.1f} ms",
                H.fmt_ratio(ratio),
                "" if cname == ref else f"{H.fmt_ratio(ci[0])} .. {H.fmt_ratio(ci[1])}",
                "" if cname == ref else H.fmt_ratio(H.paired_median_ratio(s[cname], s[ref])),
                H.fmt_ratio(med / s[hook_name].median) if cname == edit_name else "-",
                f"{(med - s[ref].median) / NEW_TOKENS * 1e3:+.2f} ms",
                H.fmt_spread(s[cname].spread),
                target,
                result,
            )
        )
    H.print_table(
        ["condition", "median", "vs raw generate", "95% interval", "paired", "vs raw + hook", "extra per token",
         "spread", "target", "result"],
        rows,
        align="lrrrrrrrrr",
    )
    print(
        "'vs raw + hook' separates seethrough's cost from the edit's own (the edit done by a plain forward hook); "
        "'extra per token' = (median - median of raw generate) / 20."
    )
    print()
    del model, hf


def main() -> int:
    parser = H.common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="recorded rounds per model (default 16, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="unrecorded warm-up rounds (default 1, --quick 0)")
    parser.add_argument("--models", default="smollm2,gpt2", help="comma-separated: smollm2, gpt2 (default both)")
    parser.add_argument("--steer-scale", type=float, default=4.0, help="the edit adds randn(hidden) * this")
    args = parser.parse_args()
    H.setup_torch(args.threads, args.seed)
    H.set_clock(args.clock, args.threads)
    H.quiet_transformers()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    H.print_environment(
        "seethrough generate vs HuggingFace generate",
        args.threads,
        args.quick,
        [("torch", torch.__version__), ("transformers", transformers.__version__), ("seethrough", seethrough.__version__)],
    )
    targets = H.Targets()
    with torch.no_grad():
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            section(name, args, targets)
    targets.print_summary()
    print(f"load average at end: {H.loadavg()}")
    if args.quick:
        print("(--quick: verdicts from a smoke run are not meaningful)")
    return 1 if (args.strict and not targets.all_passed) else 0


if __name__ == "__main__":
    sys.exit(main())
