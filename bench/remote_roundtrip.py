"""What does ``remote=True`` cost over loopback, compared with the same trace run locally?

Run from the repository root:

    python bench/remote_roundtrip.py            # full run (a few minutes, most of it loading models)
    python bench/remote_roundtrip.py --quick    # smoke run for CI (numbers not meaningful)

Sections (see bench/README.md):

1. Round trip: GPT-2 small (``GPT2Config()``, 124M, random weights, the real
   tokenizer) saved to a temporary folder and served by a seethrough server
   that this script starts on a loopback port (``--threads`` torch threads in
   its worker, like this process).  The same small trace — save two block
   outputs — runs locally and remotely, interleaved; a third condition fetches
   an already finished result again (``GET /result`` + unpacking), the
   *transfer time* of the answer.  Target: remote - local - transfer <= 30 ms.
   The same pair of traces on a tiny GPT-2 (2 blocks, 32 wide), whose forward
   takes a few milliseconds, shows the fixed cost of a round trip by itself.
   Also the bytes on the wire (request and response) against the bytes of the
   saved tensors.
2. Post-request verification: the time the server's check that a request left
   the model unchanged takes (``seethrough.remote.server.guard``) on GPT-2
   small and on SmolLM2-135M, with read-only weights (the default) and with a
   checksum of every weight (``--no-read-only-weights``); and the full state
   fingerprint (``fingerprint.py``) that workers which cannot fork (CUDA) run
   after each request.
3. Per-request cost of the worker model: the same small trace on GPT-2 small
   and SmolLM2-135M sent to servers that differ only in how a worker runs a
   request — the old model (requests run in the long-lived worker: the code
   of ``--baseline-src``, or ``--request-process reuse --isolation off`` of
   this code when not given), a process forked per request without isolation,
   and the new default (a process forked per request from an isolated
   worker).  Target: new - old <= 20 ms per request.

Timing rules (bench/_harness.py): conditions interleaved in shuffled order
each round, medians after warm-up rounds, ``--threads`` (default 1).  Samples
are wall-clock time here (the remote condition's work happens in other
processes, which the calling thread's CPU clock would not see).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

import seethrough  # noqa: E402
from seethrough.remote.client import connection as remote_client  # noqa: E402
from seethrough.remote import wire  # noqa: E402

TARGET_OVERHEAD_MS = 30.0  # remote - local - transfer
TARGET_FORK_MS = 20.0  # per request: fork per request + isolation, over the old worker model
PROMPT = "The Eiffel Tower is in the city of"  # a short prompt: the forward does not drown the overhead
KEY = "bench-key"


# -- the trace body (the same code runs locally and remotely) -----------------------------


def two_blocks(model, prompt, **options):
    with model.trace(prompt, **options):
        early = model.transformer.h[2].output.save()
        late = model.transformer.h[9].output.save()
    return early, late


def two_blocks_tiny(model, prompt, **options):
    with model.trace(prompt, **options):
        early = model.transformer.h[0].output.save()
        late = model.transformer.h[1].output.save()
    return early, late


# -- section 1 ---------------------------------------------------------------------------


class WireCounter:
    """Counts the bytes the client sends and receives (request body, result body)."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.received: list[int] = []
        self._submit = remote_client.RemoteClient.submit
        self._result = remote_client.RemoteClient.result_bytes

    def __enter__(self) -> "WireCounter":
        counter = self

        def submit(client, payload):
            counter.sent.append(len(payload))
            return counter._submit(client, payload)

        def result_bytes(client, job_id):
            data = counter._result(client, job_id)
            counter.received.append(len(data))
            return data

        remote_client.RemoteClient.submit = submit
        remote_client.RemoteClient.result_bytes = result_bytes
        return self

    def __exit__(self, *exc) -> None:
        remote_client.RemoteClient.submit = self._submit
        remote_client.RemoteClient.result_bytes = self._result


def section_roundtrip(args, targets: H.Targets) -> None:
    from seethrough.models import offline
    from seethrough.remote.server.testing import ServerProcess

    print("## 1. Round trip over loopback: GPT-2 small, save 2 block outputs")
    print()
    folder = tempfile.mkdtemp(prefix="seethrough-bench-gpt2-")
    tiny_folder = tempfile.mkdtemp(prefix="seethrough-bench-gpt2-tiny-")
    started = time.perf_counter()
    offline.save_random_gpt2(folder, seed=args.seed)  # GPT2Config(): 124M parameters
    offline.save_random_gpt2(tiny_folder, seed=args.seed, n_layer=2, n_embd=32, n_head=4, n_positions=128)
    local = seethrough.LanguageModel(folder, dispatch=True)
    remote = seethrough.LanguageModel(folder)
    object.__setattr__(remote, "_remote_name", "gpt2-small")
    local_tiny = seethrough.LanguageModel(tiny_folder, dispatch=True)
    remote_tiny = seethrough.LanguageModel(tiny_folder)
    object.__setattr__(remote_tiny, "_remote_name", "gpt2-tiny")
    server_args = ["--threads", str(args.threads), "--log-level", "warning", "--start-method", args.start_method]
    server = ServerProcess({"gpt2-small": folder, "gpt2-tiny": tiny_folder}, api_keys=[KEY], args=server_args).start()
    print(f"model saved and server started in {time.perf_counter() - started:.0f} s "
          f"({args.start_method} workers, {args.threads} torch thread(s) on both sides); prompt of "
          f"{len(local.tokenizer(PROMPT)['input_ids'])} tokens")
    options = {"remote": True, "host": server.url, "api_key": KEY}
    try:
        local_values = two_blocks(local, PROMPT)
        with WireCounter() as counter:
            remote_values = two_blocks(remote, PROMPT, **options)
        assert all(torch.equal(a, b) for a, b in zip(local_values, remote_values)), "remote values differ from local"
        print("check passed: the remote run saves exactly the local values")
        with remote.trace(PROMPT, blocking=False, **options) as tracer:
            early = remote.transformer.h[2].output.save()
            late = remote.transformer.h[9].output.save()
        finished = tracer.job
        finished.result()

        def fetch_again():
            return wire.unpack(finished.client.result_bytes(finished.id), max_bytes=remote_client.MAX_RESULT_BYTES)

        rounds = max(5, int((8 if args.quick else 60) * args.rounds_scale))
        warmup = 2 if args.quick else 5
        with WireCounter() as counter:
            samples = H.measure(
                {"local trace": lambda: two_blocks(local, PROMPT),
                 "remote trace": lambda: two_blocks(remote, PROMPT, **options),
                 "transfer (fetch result)": fetch_again,
                 "tiny GPT-2: local trace": lambda: two_blocks_tiny(local_tiny, PROMPT),
                 "tiny GPT-2: remote trace": lambda: two_blocks_tiny(remote_tiny, PROMPT, **options)},
                rounds, warmup, seed=args.seed, progress="round trip",
            )
        local_ms = samples["local trace"].median * 1e3
        remote_ms = samples["remote trace"].median * 1e3
        transfer_ms = samples["transfer (fetch result)"].median * 1e3
        overhead = remote_ms - local_ms - transfer_ms
        paired = statistics.median(r - l - t for r, l, t in zip(samples["remote trace"].times, samples["local trace"].times,
                                                                  samples["transfer (fetch result)"].times)) * 1e3
        ci = H.bootstrap_ci(samples, lambda t: 1e3 * (statistics.median(t["remote trace"]) - statistics.median(t["local trace"])
                                                      - statistics.median(t["transfer (fetch result)"])), seed=args.seed)
        H.print_table(
            ["condition", "median", "spread"],
            [(name, f"{s.median * 1e3:.2f} ms", H.fmt_spread(s.spread)) for name, s in samples.items()],
        )
        ok, label = H.judge(overhead, ci, TARGET_OVERHEAD_MS)
        tiny = (samples["tiny GPT-2: remote trace"].median - samples["tiny GPT-2: local trace"].median) * 1e3
        tiny_paired = H.paired_median_diff(samples["tiny GPT-2: remote trace"], samples["tiny GPT-2: local trace"]) * 1e3
        H.print_table(
            ["quantity (GPT-2 small unless marked)", "value"],
            [("local median", f"{local_ms:.2f} ms"), ("remote median", f"{remote_ms:.2f} ms"),
             ("remote - local", f"{remote_ms - local_ms:.2f} ms"), ("transfer of the answer", f"{transfer_ms:.2f} ms"),
             ("remote - local - transfer", f"{overhead:.2f} ms (95%: {ci[0]:.2f} .. {ci[1]:.2f}; paired {paired:.2f})"),
             ("target", f"<= {TARGET_OVERHEAD_MS:.0f} ms: {label}"),
             ("tiny GPT-2: remote - local (fixed cost of a round trip)", f"{tiny:.2f} ms (paired {tiny_paired:.2f})")],
            align="lr",
        )
        targets.check("remote - local - transfer (GPT-2 small, 2 saves)",
                      f"{overhead:.2f} ms ({ci[0]:.2f} .. {ci[1]:.2f})", ok, label)
        stats = wire.payload_stats(local_values)
        request, response = statistics.median(counter.sent), statistics.median(counter.received)
        H.print_table(
            ["bytes", "count", "vs saved tensors"],
            [("saved tensors (2 x 1 x T x 768 float32)", f"{stats['tensor_bytes']:,}", "1.00x"),
             ("request on the wire (body source, inputs, names)", f"{request:,.0f}", f"{request / stats['tensor_bytes']:.3f}x"),
             ("response on the wire (the two tensors)", f"{response:,.0f}", f"{response / stats['tensor_bytes']:.3f}x")],
            align="lrr",
        )
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(tiny_folder, ignore_errors=True)


# -- section 2 ---------------------------------------------------------------------------


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def section_guard(args) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from seethrough.remote.server.fingerprint import StateFingerprint
    from seethrough.remote.server.guard import ModelGuard, ReadOnlyWeights

    print("## 2. Post-request verification (the server's check that the model is unchanged)")
    print()
    repeats = 5 if args.quick else 25
    rows = []
    loaders = {"GPT-2 small (random)": lambda: (GPT2LMHeadModel(GPT2Config()).eval(), _gpt2_tokenizer()),
               "SmolLM2-135M-Instruct": lambda: _smollm2()}
    for name, load in loaders.items():
        module, tokenizer = load()
        parameters = sum(p.numel() for p in module.parameters())
        modules = len(list(module.modules()))
        checksum = ModelGuard(module, tokenizer, None)
        checksum_ms = _median_ms(checksum.check, max(3, repeats // 5))
        read_only = ReadOnlyWeights.apply(module)
        guarded = ModelGuard(module, tokenizer, read_only)
        assert guarded.check() == [], "the model looks changed right after protecting it"
        read_only_ms = _median_ms(guarded.check, repeats)
        fingerprint = StateFingerprint(module, tokenizer)
        assert fingerprint.changes() == [], "the state fingerprint differs right after taking it"
        fingerprint_ms = _median_ms(fingerprint.changes, max(3, repeats // 5))
        rows.append((name, f"{parameters / 1e6:.1f}M", modules, f"{read_only_ms:.2f} ms", f"{checksum_ms:.1f} ms",
                     f"{fingerprint_ms:.1f} ms"))
        del module, checksum, guarded, read_only, fingerprint
    H.print_table(["model", "parameters", "modules", "read-only weights (default)", "checksum every weight",
                   "state fingerprint (no fork)"], rows)
    print("read-only weights: the weights live in memory mapped read-only, so the check covers the module tree, "
          "every parameter's identity/dtype/device/shape/strides/address/version, the config, generation config and "
          "tokenizer (buffers are checksummed); with --no-read-only-weights every weight's bytes are checksummed too.")
    print()


def _gpt2_tokenizer():
    from transformers import AutoTokenizer

    from seethrough.models import offline

    folder = tempfile.mkdtemp(prefix="seethrough-bench-gpt2-tokenizer-")
    try:
        offline.save_random_gpt2(folder, n_layer=1, n_embd=8, n_head=2, n_positions=8)
        return AutoTokenizer.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- section 3 ---------------------------------------------------------------------------


def smollm_two_layers(model, prompt, **options):
    with model.trace(prompt, **options):
        early = model.model.layers[2].output.save()
        late = model.model.layers[20].output.save()
    return early, late


def section_worker_model(args, targets: H.Targets) -> None:
    from seethrough.models import offline
    from seethrough.remote.server.testing import ServerProcess

    print("## 3. Per-request cost of the worker model (fork per request + isolation vs the old model)")
    print()
    folder = tempfile.mkdtemp(prefix="seethrough-bench-gpt2-")
    offline.save_random_gpt2(folder, seed=args.seed)
    models = {"gpt2-small": folder, "smollm2": str(offline.smollm2_dir())}
    base = ["--threads", str(args.threads), "--log-level", "warning", "--start-method", args.start_method]
    if args.baseline_src:
        old = ("old (requests in the worker; code of --baseline-src)", base, {"PYTHONPATH": args.baseline_src})
    else:
        old = ("old (requests in the worker: --request-process reuse --isolation off)",
               base + ["--request-process", "reuse", "--isolation", "off"], {})
    setups = [old,
              ("fork per request, no isolation", base + ["--request-process", "fork", "--isolation", "off"], {}),
              ("new default: fork per request + isolation", base + ["--request-process", "fork",
                                                                   "--isolation", "required"], {})]
    servers = []
    started = time.perf_counter()
    try:
        for _, server_args, env in setups:
            servers.append(ServerProcess(models, api_keys=[KEY], args=server_args, env=env,
                                         startup_timeout=600).start())
        print(f"{len(servers)} servers started in {time.perf_counter() - started:.0f} s")
        wrappers = {}
        for name, source in models.items():
            wrapper = seethrough.LanguageModel(source)
            object.__setattr__(wrapper, "_remote_name", name)
            wrappers[name] = wrapper
        bodies = {"gpt2-small": two_blocks, "smollm2": smollm_two_layers}
        conditions = {}
        labels = [label for label, _, _ in setups]
        for (label, _, _), server in zip(setups, servers):
            options = {"remote": True, "host": server.url, "api_key": KEY}
            for name in models:
                reference = bodies[name](wrappers[name], PROMPT, **options)  # warm, and the same answer everywhere
                conditions[(name, label)] = (lambda body=bodies[name], wrapper=wrappers[name], options=options:
                                             body(wrapper, PROMPT, **options))
                wrappers.setdefault(f"{name}-reference", reference)
        for name in models:
            first = None
            for label, server in zip(labels, servers):
                values = bodies[name](wrappers[name], PROMPT, remote=True, host=server.url, api_key=KEY)
                first = values if first is None else first
                assert all(torch.equal(a, b) for a, b in zip(first, values)), f"{name}: {label} answers differently"
        print("check passed: every worker model returns exactly the same values")
        rounds = max(5, int((6 if args.quick else 40) * args.rounds_scale))
        samples = H.measure({f"{name} | {label}": fn for (name, label), fn in conditions.items()},
                            rounds, 2 if args.quick else 4, seed=args.seed, progress="worker model")
        rows = []
        for name in models:
            old_samples = samples[f"{name} | {labels[0]}"]
            for label in labels:
                mine = samples[f"{name} | {label}"]
                extra = (mine.median - old_samples.median) * 1e3
                paired = H.paired_median_diff(mine, old_samples) * 1e3
                rows.append((name, label, f"{mine.median * 1e3:.2f} ms", H.fmt_spread(mine.spread),
                             "-" if label == labels[0] else f"{extra:+.2f} ms (paired {paired:+.2f})"))
            new = samples[f"{name} | {labels[-1]}"]
            extra = (new.median - old_samples.median) * 1e3
            ci = H.bootstrap_ci({"new": new, "old": old_samples},
                                lambda t: 1e3 * (statistics.median(t["new"]) - statistics.median(t["old"])),
                                seed=args.seed)
            ok, label = H.judge(extra, ci, TARGET_FORK_MS)
            targets.check(f"fork per request + isolation, extra per request ({name})",
                          f"{extra:+.2f} ms ({ci[0]:+.2f} .. {ci[1]:+.2f})", ok, label)
        H.print_table(["model", "worker model", "median round trip", "spread", "vs old"], rows, align="llrrr")
        print("(a trace saving 2 layer outputs of a 9-token prompt; round trip = submit, run, fetch the result)")
        print()
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _smollm2():
    from seethrough.models import offline

    return offline.load_smollm2()


def main() -> int:
    parser = H.common_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="1,2,3",
                        help="comma-separated sections to run (1 round trip, 2 verification, 3 worker model)")
    parser.add_argument("--baseline-src", default=None, metavar="SRC",
                        help="section 3: a seethrough source tree (its src/ folder) from before the fork-per-request "
                             "worker model, run as the 'old' server (default: this code with --request-process reuse "
                             "--isolation off)")
    parser.add_argument("--start-method", default="spawn", choices=("spawn", "forkserver"),
                        help="how the server starts its worker (default spawn, the server's default)")
    args = parser.parse_args()
    H.setup_torch(args.threads, args.seed)
    H.set_clock("wall", args.threads)
    H.quiet_transformers()
    import transformers

    H.print_environment("seethrough remote round trip", args.threads, args.quick,
                        [("torch", torch.__version__), ("transformers", transformers.__version__),
                         ("seethrough", seethrough.__version__)])
    sections = {s.strip() for s in args.sections.split(",")}
    targets = H.Targets()
    print("(in this benchmark the traces run with autograd enabled on both sides, as a server worker runs them)")
    print()
    if "1" in sections:
        section_roundtrip(args, targets)
    if "2" in sections:
        with torch.no_grad():
            section_guard(args)
    if "3" in sections:
        section_worker_model(args, targets)
    if targets.results:
        targets.print_summary()
    print(f"load average at end: {H.loadavg()}")
    if args.quick:
        print("(--quick: verdicts from a smoke run are not meaningful)")
    return 1 if (args.strict and not targets.all_passed) else 0


if __name__ == "__main__":
    sys.exit(main())
