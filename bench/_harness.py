"""Shared timing harness for the benchmarks in ``bench/``.

Deliberately independent of seethrough (it imports only torch and the
standard library), so that ``compare_nnsight.py`` can use exactly the same
measurement code in a separate environment where seethrough is not installed.

The rules every benchmark here follows:

* **interleaved conditions**: each round runs every condition once, in a
  freshly shuffled order, so slow drifts of a shared, noisy machine (another
  process waking up, frequency changes) hit all conditions alike;
* **medians of many rounds**, after warm-up rounds that are not recorded;
* **explicit torch threads** (``--threads``, default 1);
* **no_grad for every condition** (the caller wraps the measurement);
* ratios against raw PyTorch hooks measured in the same process.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch


# -- command line and environment -------------------------------------------------


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N) (default 1)")
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run (CI), not a measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and round order")
    parser.add_argument(
        "--rounds-scale",
        type=float,
        default=1.0,
        help="multiply every section's round count by this (e.g. 2 for a steadier, longer run)",
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="what a sample measures: 'cpu' = CPU time of the calling thread (time.thread_time; excludes the time "
        "the OS gives other processes, the main noise on a shared machine), 'wall' = time.perf_counter; "
        "'auto' (default) = cpu with --threads 1 (all work runs on the calling thread), wall otherwise",
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any target is missed")
    return parser


CLOCKS = {
    "cpu": (time.thread_time, "CPU time of the calling thread (time.thread_time)"),
    "wall": (time.perf_counter, "wall-clock time (time.perf_counter)"),
}
_clock_name = "wall"


def set_clock(name: str, threads: int) -> str:
    """Pick the clock every later :func:`measure` uses; returns its name."""
    global _clock_name
    _clock_name = ("cpu" if threads == 1 else "wall") if name == "auto" else name
    return _clock_name


def clock_description() -> str:
    return CLOCKS[_clock_name][1]


def setup_torch(threads: int, seed: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work already started)
        pass
    torch.manual_seed(seed)
    random.seed(seed)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def print_environment(title: str, threads: int, quick: bool, packages: Sequence[tuple[str, str]]) -> None:
    print(f"# {title}")
    print()
    versions = ", ".join(f"{name} {version}" for name, version in packages)
    print(f"python {platform.python_version()}, {versions}")
    print(
        f"cpu cores visible: {os.cpu_count()}, torch threads: {torch.get_num_threads()} (--threads {threads}), "
        f"interop threads: {torch.get_num_interop_threads()}, load average at start: {loadavg()}"
    )
    print(
        f"clock: {clock_description()}"
        + (
            "; with one torch thread all the work runs on the calling thread, so this is its cost without the "
            "time the OS hands to other processes (use --clock wall for wall-clock time)"
            if _clock_name == "cpu"
            else ""
        )
    )
    print("every condition runs under torch.no_grad() (raw forwards, raw hooks and traces alike); model.eval()")
    print(
        "method: each round runs every condition once in a shuffled order (interleaved); "
        "tables show medians over rounds after warm-up rounds"
    )
    if quick:
        print("** --quick: smoke run with few rounds; the numbers are NOT a measurement **")
    print()


# -- timing -------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-round times (seconds) of one condition."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Interquartile range divided by the median (a noise indicator)."""
        if len(self.times) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) / self.median


def measure(
    conditions: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    seed: int = 0,
    progress: str | None = None,
) -> dict[str, Samples]:
    """Run ``rounds`` interleaved rounds (after ``warmup`` unrecorded ones).

    Each round calls every condition once, in a new random order, and records
    the time of that one call on the clock chosen by :func:`set_clock`.
    Garbage collection stays enabled: what a condition allocates and what
    collecting it costs is part of its cost.
    """
    rng = random.Random(seed)
    names = list(conditions)
    samples = {name: Samples(name) for name in names}
    clock = CLOCKS[_clock_name][0]
    start = time.perf_counter()
    for r in range(warmup + rounds):
        rng.shuffle(names)
        record = r >= warmup
        for name in names:
            fn = conditions[name]
            t0 = clock()
            fn()
            t1 = clock()
            if record:
                samples[name].times.append(t1 - t0)
    if progress:
        print(f"  [{progress}: {warmup}+{rounds} rounds x {len(names)} conditions in {time.perf_counter() - start:.1f} s wall]", file=sys.stderr)
    return samples


def paired_median_diff(a: Samples, b: Samples) -> float:
    """Median over rounds of (a - b) within the same round (a noise-robust cross-check
    of median(a) - median(b))."""
    return statistics.median(x - y for x, y in zip(a.times, b.times))


def paired_median_ratio(a: Samples, b: Samples) -> float:
    """Median over rounds of a / b within the same round (cross-check of the ratio of medians)."""
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def bootstrap_ci(
    samples: dict[str, Samples],
    stat: Callable[[dict[str, list[float]]], float],
    reps: int = 300,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """A percentile bootstrap interval for ``stat`` (a function of the per-condition
    time lists, e.g. a difference of medians).  Rounds are resampled as wholes, so the
    conditions of one round stay together (the interleaving is preserved)."""
    names = list(samples)
    n = min(len(samples[k].times) for k in names)
    rng = random.Random(seed)
    values = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        values.append(stat({k: [samples[k].times[i] for i in idx] for k in names}))
    values.sort()
    lo = values[int((1 - level) / 2 * reps)]
    hi = values[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi


def judge(value: float, ci: tuple[float, float], limit: float) -> tuple[bool, str]:
    """(passed, label) for an at-most-``limit`` target: the verdict follows the
    measured value; '(unresolved)' when the 95% interval reaches across the limit."""
    ok = value <= limit
    unresolved = ci[0] <= limit < ci[1]
    return ok, ("pass" if ok else "MISS") + (" (unresolved)" if unresolved else "")


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx = statistics.fmean(xs)
    my = statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den


# -- raw PyTorch hook references -----------------------------------------------------


def hooks_saving(module: torch.nn.Module, blocks: Sequence[torch.nn.Module], *args: object) -> list:
    """The reference: register a forward hook on each block that keeps its output,
    run the module, remove the hooks (nothing left behind, as with a trace)."""
    saved: list = []

    def hook(mod: torch.nn.Module, inputs: object, output: object) -> None:
        saved.append(output)

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        module(*args)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def hooks_zeroing(module: torch.nn.Module, block: torch.nn.Module, *args: object) -> object:
    """Reference for an edit: a hook that zeroes one block's output in place."""

    def hook(mod: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output[:] = 0

    handle = block.register_forward_hook(hook)
    try:
        return module(*args)
    finally:
        handle.remove()


# -- models ---------------------------------------------------------------------------


class MLP2(torch.nn.Module):
    """The 2-layer MLP of the fixed-cost measurements (4 modules in all)."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def gpt2_small() -> torch.nn.Module:
    """GPT-2 small (124M, ``GPT2Config()``), random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config()).eval()


TINY_VOCAB = 256
TINY_POSITIONS = 128


def gpt2_tiny(n_layer: int) -> torch.nn.Module:
    """A 64-wide GPT-2 with ``n_layer`` blocks (12 -> 164 modules, 2 -> 34), random
    weights.  A small vocabulary keeps the LM head from dominating the forward;
    it does not change the module count."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=TINY_POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def token_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g)


def count_modules(module: torch.nn.Module) -> int:
    return len(list(module.modules()))


# -- memory -----------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size (from /proc/self/statm; falls back to the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


# -- output ------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}x"


def fmt_spread(x: float) -> str:
    return "n/a" if x != x else f"{x:.0%}"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "-"
    return "pass" if ok else "MISS"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> None:
    """A plain-text table; ``align`` has one char per column ('l' or 'r')."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(parts) + " |"

    print(line(headers))
    print("|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|")
    for row in rows:
        print(line(row))
    print()


class Targets:
    """Collects pass/miss verdicts for the summary and ``--strict``."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str, bool]] = []

    def check(self, what: str, detail: str, ok: bool, label: str | None = None) -> str:
        label = label or verdict(ok)
        self.results.append((what, detail, ok, label))
        return label

    def print_summary(self) -> None:
        print("## Targets")
        print()
        print_table(["target", "measured (95% interval)", "result"], [(w, d, lab) for w, d, _, lab in self.results], align="llr")
        if any("unresolved" in lab for _, _, _, lab in self.results):
            print(
                "'(unresolved)': the 95% bootstrap interval (rounds resampled) reaches across the target, "
                "so this run's noise does not settle the verdict; rerun on a quieter machine or with --rounds-scale 2+."
            )
            print()

    @property
    def all_passed(self) -> bool:
        return all(ok for _, _, ok, _ in self.results)
