"""Scale-out: requests/s and latency for 1 and 2 workers, built-in server vs ``--ray``.

Real servers (``python -m seethrough.remote.server``) on a loopback port,
started one at a time (so an idle one never competes with the one being
measured), each serving two models with ``--threads 1`` per worker:

* ``smollm2``: SmolLM2-135M-Instruct, all 30 layers, offline — the *heavy*
  request (a trace of an 18-token prompt saving the last layer's last token),
  for throughput: ``--clients`` closed-loop clients send requests for
  ``--seconds``;
* ``gpt2``: a random 2-layer GPT-2 — the *light* request (a 5-token trace),
  sent by one client one after another, for the fixed cost of a request
  through the server (where the Ray path's extra cost shows).

The Ray rows use ``--ray local`` (a private Ray instance started by the
server on this machine; ``--cpus-per-worker 0.5`` so both models' workers
fit on 2 logical CPUs).  Requests are prebuilt wire bytes posted with
``http.client`` and followed to their result, so client-side tracing does
not compete with the servers for the CPU.  Every result is checked against
the first one of its kind.

Targets: 2 workers >= 1.6x the throughput of 1 (needs a free core per
worker: on a shared 2-core machine it may miss), and the Ray path adds
<= 5 ms to a request's median latency.  ``--quick`` is a smoke run.

    PYTHONPATH=src python bench/scale_out.py [--quick] [--seconds 30] [--clients 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from seethrough.models import offline
from seethrough.remote import wire
from seethrough.remote.client.connection import RemoteClient
from seethrough.remote.protocol import Request
from seethrough.remote.server import testing

HEAVY_PROMPT = "The history of the city goes back many centuries, to a small village by the river."  # 18 tokens
LIGHT_PROMPT = "The quick brown fox"


def payload(model: str, prompt: str, source: str) -> bytes:
    request = Request(model=model, kind="trace", source=source, filename="bench.py", first_line=1,
                      client_version="0.1.0", args=[prompt], envoys={"model": ""})
    return wire.pack(request.to_wire(), max_bytes=1 << 26)


HEAVY = ("smollm2", HEAVY_PROMPT, "last = model.model.layers[-1].output[:, -1].save()\n")
LIGHT = ("gpt2", LIGHT_PROMPT, "h = model.transformer.h[1].output.save()\n")


def one_request(client: RemoteClient, body: bytes) -> tuple[float, dict]:
    started = time.perf_counter()
    job_id = client.submit(body)["id"]
    for _event, _data in client.events(job_id, timeout=300):
        pass
    answer = wire.unpack(client.result_bytes(job_id), max_bytes=1 << 30)
    elapsed = time.perf_counter() - started
    client.delete(job_id)
    if answer.get("error"):
        raise RuntimeError(f"request failed: {answer['error'].get('type')}: {answer['error'].get('message')}")
    return elapsed, answer["values"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(url: str, args: argparse.Namespace, reference: dict) -> dict:
    client = RemoteClient(url, None, timeout=300)
    light, heavy = payload(*LIGHT), payload(*HEAVY)
    for _ in range(args.warmup):
        for body, kind in ((light, "light"), (heavy, "heavy")):
            _, values = one_request(client, body)
            if reference.setdefault(kind, values) is not values and not same(values, reference[kind]):
                raise RuntimeError(f"a {kind} result differs from the first one")
    # the fixed cost: one client, one light request after another
    sequential = []
    for _ in range(args.light_requests):
        elapsed, values = one_request(client, light)
        if not same(values, reference["light"]):
            raise RuntimeError("a light result differs from the first one")
        sequential.append(elapsed)
    # throughput: closed-loop clients sending heavy requests
    latencies: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        mine = RemoteClient(url, None, timeout=300)
        try:
            while not stop.is_set():
                elapsed, values = one_request(mine, heavy)
                if not same(values, reference["heavy"]):
                    raise RuntimeError("a heavy result differs from the first one")
                if not stop.is_set():
                    latencies.append(elapsed)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=loop) for _ in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    stop.set()
    duration = time.perf_counter() - started
    for thread in threads:
        thread.join(timeout=300)
    if failures:
        raise failures[0]
    return {"rps": len(latencies) / duration, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "n": len(latencies), "light_p50": statistics.median(sequential), "light_p95": percentile(sequential, 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each throughput run (default 30)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients in the throughput run (default 4)")
    parser.add_argument("--light-requests", type=int, default=100, help="sequential light requests (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="unrecorded requests of each kind first (default 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the numbers are not a measurement")
    parser.add_argument("--no-ray", action="store_true", help="only the built-in server")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.light_requests, args.warmup = 4.0, 10, 2
    folder = Path(tempfile.mkdtemp(prefix="seethrough-bench-"))
    gpt2 = offline.save_random_gpt2(folder / "gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=128)
    models = {"smollm2": str(offline.smollm2_dir()), "gpt2": str(gpt2)}
    backends = [("built-in", [])] + ([] if args.no_ray else [("ray", ["--ray", "local", "--cpus-per-worker", "0.5"])])
    reference: dict = {}
    rows = []
    for backend, extra in backends:
        for workers in (1, 2):
            server_args = ["--threads", "1", "--workers-per-model", str(workers), "--timeout", "600", *extra]
            with testing.ServerProcess(models, args=server_args, startup_timeout=600,
                                       env={"OMP_NUM_THREADS": "1"}) as server:
                print(f"measuring {backend}, {workers} worker(s) ...", file=sys.stderr, flush=True)
                rows.append((backend, workers, measure(server.url, args, reference)))
    print(f"\nscale-out on {len(__import__('os').sched_getaffinity(0))} CPU(s): heavy = SmolLM2-135M trace of a "
          f"18-token prompt, {args.clients} clients for {args.seconds:g} s; light = random 2-layer GPT-2, "
          "one client, sequential\n")
    print("| server   | workers | heavy req/s | heavy p50 ms | heavy p95 ms | light p50 ms | light p95 ms |")
    print("|----------|--------:|------------:|-------------:|-------------:|-------------:|-------------:|")
    for backend, workers, r in rows:
        print(f"| {backend:<8} | {workers:>7} | {r['rps']:>11.2f} | {1e3 * r['p50']:>12.1f} | {1e3 * r['p95']:>12.1f} "
              f"| {1e3 * r['light_p50']:>12.1f} | {1e3 * r['light_p95']:>12.1f} |")
    by = {(b, w): r for b, w, r in rows}
    print()
    for backend in dict.fromkeys(b for b, _, _ in rows):
        ratio = by[(backend, 2)]["rps"] / by[(backend, 1)]["rps"]
        print(f"{backend}: 2 workers give {ratio:.2f}x the throughput of 1 (target >= 1.6x: "
              f"{'met' if ratio >= 1.6 else 'missed'})")
    if ("ray", 1) in by:
        for workers in (1, 2):
            extra_ms = 1e3 * (by[("ray", workers)]["light_p50"] - by[("built-in", workers)]["light_p50"])
            print(f"ray path, {workers} worker(s): {extra_ms:+.1f} ms per light request at the median "
                  f"(target <= 5 ms: {'met' if extra_ms <= 5 else 'missed'})")
    if args.quick:
        print("(--quick: a smoke run; these numbers are not a measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
