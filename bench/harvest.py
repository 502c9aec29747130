"""Harvest throughput, memory and remote cost (see bench/README.md).

    python bench/harvest.py [--quick] [--threads 1] [--sections 1,2,3,4]

1. throughput: ``model.harvest`` vs a hand-written loop over the same
   micro-batches (HF forward under no_grad, forward hooks copying the same
   tensors with padding dropped), 1 and 4 kept modules, on SmolLM2 and a
   12-layer GPT-2 (random init from ``GPT2Config()``); interleaved rounds,
   medians; target >= 0.95x;
2. memory: peak RSS of a harvest of 1,000 and of 20,000 prompts, each in a
   fresh subprocess (a 2-layer GPT-2, prompts streamed from a generator);
   target: growth <= 50 MB;
3. remote on loopback (a real ``seethrough serve`` subprocess) vs local,
   wall clock; target >= 0.8x;
4. length bucketing vs unsorted order, tokens/s (reported, no target).

The last line is ``harvest_ratio=<x> rss_growth_mb=<y> remote_ratio=<z>``
(harvest_ratio: the lowest of section 1's ratios).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

WORDS = ("the river mountain city quiet bright history model signal layer market garden winter engine "
         "paper voice north stone light music number ocean forest letter window story science").split()


def texts(n: int, seed: int, low: int = 4, high: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "." for _ in range(n)]


def hand_loop(hf, tok, prompts, blocks, max_length, batch, pad_id):
    """The reference: the same micro-batches (input order, left padding), raw hooks."""
    rows = tok(prompts, truncation=True, max_length=max_length)["input_ids"]
    kept = [[] for _ in blocks]
    state = {}

    def hook_for(i):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            kept[i].append(value[state["mask"]])
        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            length = max(map(len, chunk))
            ids = torch.full((len(chunk), length), pad_id)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for r, row in enumerate(chunk):
                ids[r, length - len(row):] = torch.tensor(row)
                mask[r, length - len(row):] = 1
            state["mask"] = mask.bool()
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                hf(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(k) for k in kept]


def harvest_once(model, prompts, blocks_envoys, max_length, batch, folder, bucket=False, **options):
    shutil.rmtree(folder, ignore_errors=True)
    with model.harvest(prompts, to=folder, batch_size=batch, max_length=max_length, bucket=bucket,
                       window=len(prompts), progress=False, **options) as run:
        for i, envoy in enumerate(blocks_envoys):
            run.keep(f"b{i}", envoy.output)
    return run


def section_throughput(args, targets, tmp: Path) -> float:
    from seethrough import LanguageModel
    from seethrough.models import offline

    print("## 1. Throughput: harvest vs a hand-written hook loop (same micro-batches)\n")
    n, batch, max_length = (8, 4, 32) if args.quick else (16, 8, 64)
    prompts = texts(n, args.seed)
    models = []
    hf, tok = offline.load_smollm2()
    models.append(("SmolLM2-135M (30 layers)", hf, tok, lambda m: m.model.layers, lambda e: e.model.layers))
    gpt2 = h.gpt2_small()
    models.append(("GPT-2 12 layers (random)", gpt2, offline.gpt2_tokenizer(), lambda m: m.transformer.h, lambda e: e.transformer.h))
    rows, worst = [], float("inf")
    for title, hf, tok, blocks_of, envoys_of in models:
        model = LanguageModel(hf, tokenizer=tok)
        tokens = sum(len(r) for r in tok(prompts, truncation=True, max_length=max_length)["input_ids"])
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        depth = len(blocks_of(hf))
        for kept in (1, 4):
            picks = [depth // 2] if kept == 1 else [depth * k // 5 for k in range(1, 5)]
            raw_blocks = [blocks_of(hf)[i] for i in picks]
            envoys = [envoys_of(model)[i] for i in picks]
            # same values, checked before timing
            run = harvest_once(model, prompts, envoys, max_length, batch, tmp / "check")
            ref = hand_loop(hf, tok, prompts, raw_blocks, max_length, batch, pad_id)
            store = run.store
            assert all(torch.equal(store[f"b{i}"].tensor(), ref[i]) for i in range(kept)), "harvest != hand loop"
            conditions = {
                "harvest": lambda: harvest_once(model, prompts, envoys, max_length, batch, tmp / "timed"),
                "hand loop": lambda: hand_loop(hf, tok, prompts, raw_blocks, max_length, batch, pad_id),
            }
            samples = h.measure(conditions, rounds=3 if args.quick else max(3, int(5 * args.rounds_scale)), warmup=1,
                                seed=args.seed, progress=f"{title}, {kept} kept")
            ratio = samples["hand loop"].median / samples["harvest"].median  # throughput ratio
            ci = h.bootstrap_ci(samples, lambda t: __import__("statistics").median(t["hand loop"]) / __import__("statistics").median(t["harvest"]))
            worst = min(worst, ratio)
            ok = ratio >= 0.95
            label = ("pass" if ok else "MISS") + (" (unresolved)" if ci[0] < 0.95 <= ci[1] else "")
            targets.check(f"harvest/hand loop, {title}, {kept} kept", f"{ratio:.3f}x ({ci[0]:.3f}-{ci[1]:.3f})", ok, label)
            rows.append((title, kept, f"{tokens / samples['hand loop'].median:,.0f}", f"{tokens / samples['harvest'].median:,.0f}",
                         f"{ratio:.3f}x", f"{ci[0]:.3f}-{ci[1]:.3f}", h.fmt_spread(samples["harvest"].spread)))
    h.print_table(["model", "kept modules", "hand loop tok/s", "harvest tok/s", "ratio", "95% interval", "spread"], rows, align="lrrrrrr")
    print(f"{n} prompts, max_length {max_length}, micro-batches of {batch} (no bucketing, input order, as the loop); "
          "harvest includes writing its shard (safetensors + manifest); ratio = harvest tok/s / hand loop tok/s\n")
    return worst


def peak_rss() -> int:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_child(n: int) -> None:
    """Run in a subprocess: harvest ``n`` streamed prompts, print peak RSS (bytes)."""
    from seethrough import LanguageModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf = h.gpt2_tiny(2)
    model = LanguageModel(hf)

    def prompts():
        rng = random.Random(0)
        for _ in range(n):
            yield [rng.randrange(h.TINY_VOCAB) for _ in range(rng.randint(8, 64))]

    folder = tempfile.mkdtemp(prefix="harvest-rss-")
    try:
        with model.harvest(prompts(), to=folder, batch_size=64, window=256, progress=False) as run:
            run.keep("b1", model.transformer.h[1].output)
        print(json.dumps({"peak": peak_rss(), "tokens": run.summary["tokens"]}))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def section_memory(args, targets) -> float:
    print("## 2. Memory: peak RSS, 1,000 vs 20,000 prompts (fresh subprocess each)\n")
    sizes = (1000, 20000) if not args.quick else (200, 2000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = {}
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True, env=env, check=True)
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    growth = (results[sizes[1]]["peak"] - results[sizes[0]]["peak"]) / 1e6
    h.print_table(["prompts", "tokens", "peak RSS"], [(f"{n:,}", f"{r['tokens']:,}", f"{r['peak'] / 1e6:,.1f} MB") for n, r in results.items()], align="rrr")
    targets.check(f"peak RSS growth {sizes[0]:,} -> {sizes[1]:,} prompts <= 50 MB", f"{growth:+.1f} MB", growth <= 50)
    return growth


def section_remote(args, targets, tmp: Path) -> float:
    from seethrough import LanguageModel
    from seethrough.models import offline
    from seethrough.remote.server import testing

    print("## 3. Remote on loopback vs local (wall clock)\n")
    hf, tok = offline.load_smollm2(num_hidden_layers=4)
    folder = tmp / "smollm2-4"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    server = testing.ServerProcess({"smollm2": str(folder)}, args=["--threads", str(args.threads)]).start()
    try:
        model = LanguageModel(str(folder))
        object.__setattr__(model, "_remote_name", "smollm2")
        n = 16 if args.quick else 96
        prompts = texts(n, args.seed + 1)
        tokens = sum(len(r) for r in tok(prompts, truncation=True, max_length=64)["input_ids"])

        def once(folder, **options):
            shutil.rmtree(folder, ignore_errors=True)
            with model.harvest(prompts, to=folder, batch_size=16, max_length=64, window=len(prompts), progress=False, **options) as run:
                run.keep("resid2", model.model.layers[2].output)

        def local():
            once(tmp / "local")

        def remote():
            once(tmp / "remote", remote=True, host=server.url, in_flight=4)

        remote()
        local()
        from seethrough import load

        assert torch.equal(load(tmp / "local")["resid2"].tensor(), load(tmp / "remote")["resid2"].tensor()), "remote != local"

        saved = h._clock_name
        h.set_clock("wall", 2)
        try:
            samples = h.measure({"local": local, "remote": remote}, rounds=2 if args.quick else 4, warmup=1, seed=args.seed, progress="remote")
        finally:
            h._clock_name = saved
    finally:
        server.stop()
    ratio = samples["local"].median / samples["remote"].median
    h.print_table(["where", "tok/s", "spread"], [(k, f"{tokens / s.median:,.0f}", h.fmt_spread(s.spread)) for k, s in samples.items()], align="lrr")
    print(f"SmolLM2 cut to 4 layers, {n} prompts, micro-batches of 16, 4 requests in flight; server --threads {args.threads}\n")
    targets.check("remote/local throughput >= 0.8", f"{ratio:.3f}x", ratio >= 0.8)
    return ratio


def section_bucketing(args, tmp: Path) -> None:
    from seethrough import LanguageModel
    from seethrough.models import offline

    print("## 4. Length bucketing vs unsorted (reported)\n")
    hf, tok = offline.load_smollm2(num_hidden_layers=4)
    model = LanguageModel(hf, tokenizer=tok)
    n = 32 if args.quick else 96
    prompts = texts(n, args.seed + 2, low=2, high=60)
    tokens = sum(len(r) for r in tok(prompts, truncation=True, max_length=128)["input_ids"])
    envoys = [model.model.layers[2]]
    samples = h.measure(
        {"bucketed": lambda: harvest_once(model, prompts, envoys, 128, 16, tmp / "b", bucket=True),
         "unsorted": lambda: harvest_once(model, prompts, envoys, 128, 16, tmp / "u", bucket=False)},
        rounds=2 if args.quick else 4, warmup=1, seed=args.seed, progress="bucketing")
    h.print_table(["order", "tok/s", "spread"], [(k, f"{tokens / s.median:,.0f}", h.fmt_spread(s.spread)) for k, s in samples.items()], align="lrr")
    print(f"SmolLM2 cut to 4 layers, {n} prompts of 2-60 words, micro-batches of 16\n")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(int(sys.argv[2]))
        return
    parser = h.common_parser(__doc__.splitlines()[0])
    parser.add_argument("--sections", default="1,2,3,4")
    args = parser.parse_args()
    h.setup_torch(args.threads, args.seed)
    h.set_clock(args.clock, args.threads)
    h.quiet_transformers()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import safetensors
    import transformers

    h.print_environment("Harvest benchmark", args.threads, args.quick,
                        [("torch", torch.__version__), ("transformers", transformers.__version__), ("safetensors", safetensors.__version__)])
    sections = {int(s) for s in args.sections.split(",")}
    targets = h.Targets()
    ratio = growth = remote = float("nan")
    tmp = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    try:
        if 1 in sections:
            ratio = section_throughput(args, targets, tmp)
        if 2 in sections:
            growth = section_memory(args, targets)
        if 3 in sections:
            remote = section_remote(args, targets, tmp)
        if 4 in sections:
            section_bucketing(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets.print_summary()
    print(f"harvest_ratio={ratio:.3f} rss_growth_mb={growth:.1f} remote_ratio={remote:.3f}")
    if args.strict and not targets.all_passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
