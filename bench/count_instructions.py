"""Instructions per trace, counted by valgrind's callgrind: a measure load does not disturb.

Run from the repository root (needs ``valgrind``; several minutes, most of
them valgrind starting Python and torch)::

    python bench/count_instructions.py

It re-runs itself under ``valgrind --tool=callgrind --instr-atstart=no``;
inside, each condition is warmed up, then counted over N calls with
``callgrind_control`` switching the counting on and dumping the total, so
that imports and model building are not counted.  Printed per condition:
instructions per call, and the fixed cost of a trace (trace minus the raw
forward of the same model and input), with the 12-block / 2-block ratio of
the empty trace's fixed cost and the slope of each extra saved block output,
gross and beyond the same output saved by a raw forward hook (section 3's
reference: hooks registered, the forward run, the hooks removed).

The counts include the garbage collections the calls trigger, so the
12-block rows (30 calls each) move by a few percent between runs; the
differences this script is for (tens of thousands of instructions per trace)
are larger than that.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _conditions():
    """trace_overhead.py's models, inputs and trace bodies (its sections 2 and 3)."""
    import torch

    sys.path.insert(0, HERE)
    import trace_overhead as T

    torch.set_num_threads(1)
    models, _ = T.build_models(argparse.Namespace(seed=0))
    mlp, wrapped_mlp = models["mlp"]
    x_mlp, x_gpt2 = models["xm"], models["xt"]
    gpt2 = {2: models["g2"], 12: models["g12"]}
    blocks12 = list(gpt2[12][0].transformer.h)
    H = T.H  # the raw-hooks reference of trace_overhead.py's section 3
    return [
        ("mlp raw", lambda: mlp(x_mlp), 400),
        ("mlp empty", lambda: T.st_empty(wrapped_mlp, x_mlp), 400),
        ("mlp one-save", lambda: T.st_mlp_save(wrapped_mlp, x_mlp), 400),
        ("gpt2-2 raw", lambda: gpt2[2][0](x_gpt2), 60),
        ("gpt2-2 empty", lambda: T.st_empty(gpt2[2][1], x_gpt2), 60),
        ("gpt2-12 raw", lambda: gpt2[12][0](x_gpt2), 30),
        ("gpt2-12 empty", lambda: T.st_empty(gpt2[12][1], x_gpt2), 30),
        ("gpt2-12 save 1", lambda: T.st_save_first_blocks(gpt2[12][1], x_gpt2, 1), 30),
        ("gpt2-12 save 12", lambda: T.st_save_first_blocks(gpt2[12][1], x_gpt2, 12), 30),
        ("gpt2-12 hooks 1", lambda: H.hooks_saving(gpt2[12][0], blocks12[:1], x_gpt2), 30),
        ("gpt2-12 hooks 12", lambda: H.hooks_saving(gpt2[12][0], blocks12, x_gpt2), 30),
    ]


def _inside_valgrind() -> None:
    """Count each condition (this process runs under callgrind)."""
    import torch

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(os.getpid())], capture_output=True, check=False)

    with torch.no_grad():
        for name, call, calls in _conditions():
            for _ in range(20):
                call()
            control("-i", "on")
            control("-z")
            for _ in range(calls):
                call()
            control("-d", f"{name.replace(' ', '_')}:{calls}")
            control("-i", "off")
    sys.stdout.flush()
    os._exit(0)  # interpreter shutdown is not counted either


def _report(folder: str) -> None:
    per_call: dict[str, float] = {}
    dumps = glob.glob(os.path.join(folder, "out.*.*"))
    for path in sorted(dumps, key=lambda each: int(each.rsplit(".", 1)[1])):  # in the order counted
        text = open(path, encoding="utf-8").read()
        trigger = re.search(r"^desc: Trigger: .*dump (\S+):(\d+)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)$", text, re.M)
        if trigger and total:
            per_call[trigger.group(1).replace("_", " ")] = int(total.group(1)) / int(trigger.group(2))
    print("| condition | instructions per call | fixed cost (minus raw forward) |")
    print("|---|---:|---:|")
    raw = {"mlp": per_call.get("mlp raw"), "gpt2-2": per_call.get("gpt2-2 raw"), "gpt2-12": per_call.get("gpt2-12 raw")}
    fixed: dict[str, float] = {}
    for name, value in per_call.items():
        base = raw.get(name.split(" ")[0])
        if name.endswith("raw") or base is None:
            print(f"| {name} | {value / 1e3:,.1f}k | |")
        else:
            fixed[name] = value - base
            print(f"| {name} | {value / 1e3:,.1f}k | {fixed[name] / 1e3:,.1f}k |")
    if "gpt2-12 empty" in fixed and "gpt2-2 empty" in fixed:
        print(f"\nempty trace, 12-block / 2-block fixed cost: {fixed['gpt2-12 empty'] / fixed['gpt2-2 empty']:.2f}x")
    if "gpt2-12 save 12" in per_call and "gpt2-12 save 1" in per_call:
        slope = (per_call["gpt2-12 save 12"] - per_call["gpt2-12 save 1"]) / 11
        print(f"each extra saved block output (gross, PyTorch's own hook path included): {slope / 1e3:,.1f}k")
        if "gpt2-12 hooks 12" in per_call and "gpt2-12 hooks 1" in per_call:
            raw_slope = (per_call["gpt2-12 hooks 12"] - per_call["gpt2-12 hooks 1"]) / 11
            print(f"each extra output saved by a raw forward hook: {raw_slope / 1e3:,.1f}k; "
                  f"seethrough beyond the raw hook: {(slope - raw_slope) / 1e3:,.1f}k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        _inside_valgrind()
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (with callgrind_control) on PATH, e.g. `apt-get install valgrind`")
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={os.path.join(folder, 'out.%p')}",
                   sys.executable, os.path.abspath(__file__), "--inside"]
        print("counting under callgrind (several minutes) ...", flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _report(folder)


if __name__ == "__main__":
    main()
