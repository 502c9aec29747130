"""Load test of the API's front door: honest traffic with the known abuses running at once.

Starts a real server (``python -m seethrough.remote.server``, a random 2-layer
GPT-2, under ``prlimit --nofile=N:N``, 1,024 by default) and drives it from one
asyncio process with its own minimal HTTP/1.1 client:

* ``--clients`` honest clients (200) over ``--keys`` API keys (20), each key
  from its own loopback address (127.0.1.K): submit a light trace, poll its
  status until it finishes, download the result, delete it, repeat; a 429 or
  503 is honoured by sleeping its ``Retry-After``;
* a probe: ``GET /v1/health`` from 127.0.0.1 every 0.1 s on a fresh
  connection, and an honest key of its own submitting one trace every 0.5 s;
* the abuses, from a second process (``--no-abuse`` to leave them out):
  2,000 connections that never
  send a byte (one address) plus 1,000 over 40 addresses, reopened as the
  server closes them; 8 uploads of ``--upload-mb`` MB (one key) that hold
  their last byte; 8 submissions at a time of a 0.3 MB body that is expensive
  to check and refused (one key).

It prints a table: throughput, p50/p99 latency of health and of the honest
probe's submission (time to 202) and whole request (submit to result), the
API process's RSS (start, peak, end), and the honest side's errors other
than 429/503, which must be none.

    python bench/front_door.py --duration 60
    python bench/front_door.py --duration 20 --clients 100   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from seethrough.models import offline
from seethrough.remote import wire
from seethrough.remote.client.connection import CONTENT_TYPE
from seethrough.remote.protocol import Request
from seethrough.remote.server.testing import ServerProcess

LIGHT = "out = model.transformer.h[0].output[0][0, -1].sum().save()\n"


class LimitedServer(ServerProcess):
    nofile = 1024

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--"] + super().command()


def body(source: str, **fields) -> bytes:
    fields.setdefault("envoys", {"model": ""})
    fields.setdefault("args", ["The quick brown fox"])
    request = Request(model="gpt2", kind="trace", source=source, filename="bench.py", first_line=1,
                      client_version="0.1.0", **fields)
    return wire.pack(request.to_wire(), max_bytes=1 << 28, level=1)


def expensive_body() -> bytes:
    source = "".join(f"v{i} = model.transformer.h[0].output[0][{i % 7}] * {i}\n" for i in range(18000))
    return body(source, args=["hi", torch.zeros(50_000_000), [0] * 2_000_000],
                envoys={"model": "", "bad": "transformer.nope"})


# -- a minimal HTTP/1.1 client ------------------------------------------------------------------


class HTTPError(Exception):
    pass


async def http(port: int, method: str, path: str, *, source: str = "127.0.0.1", key: str | None = None,
               data: bytes = b"", timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (Connection: close); returns status, headers, body."""
    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
            if key:
                head += f"X-API-Key: {key}\r\n"
            if method == "POST":
                head += f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(data)}\r\n"
            writer.write(head.encode() + b"\r\n" + data)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head_bytes, _, rest = raw.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 "):
            raise HTTPError(f"no response ({raw[:60]!r})")
        headers = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, rest

    return await asyncio.wait_for(go(), timeout)


def retry_after(headers: dict[str, str]) -> float:
    try:
        return max(0.1, float(headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


@dataclass
class Stats:
    health: list[float] = field(default_factory=list)
    probe_submit: list[float] = field(default_factory=list)
    probe_total: list[float] = field(default_factory=list)
    completed: int = 0
    submitted: int = 0
    busy: Counter = field(default_factory=Counter)  # 429/503 seen by honest clients
    errors: Counter = field(default_factory=Counter)  # anything else on the honest side
    abuse: Counter = field(default_factory=Counter)
    rss: list[float] = field(default_factory=list)


async def honest_request(port: int, key: str, source: str, light: bytes, stats: Stats,
                         record: tuple[list, list] | None = None) -> None:
    started = time.monotonic()
    status, headers, reply = await http(port, "POST", "/v1/requests", source=source, key=key, data=light)
    if status in (429, 503):
        stats.busy[status] += 1
        await asyncio.sleep(retry_after(headers))
        return
    if status != 202:
        stats.errors[f"submit {status}"] += 1
        return
    stats.submitted += 1
    if record is not None:
        record[0].append(time.monotonic() - started)
    job = json.loads(reply)["id"]
    while True:
        status, headers, reply = await http(port, "GET", f"/v1/requests/{job}", source=source, key=key)
        if status != 200:
            stats.errors[f"status {status}"] += 1
            return
        state = json.loads(reply)["status"]
        if state in ("completed", "error"):
            break
        await asyncio.sleep(0.1)
    if state != "completed":
        stats.errors["request error"] += 1
    status, _, _ = await http(port, "GET", f"/v1/requests/{job}/result", source=source, key=key)
    if status != 200:
        stats.errors[f"result {status}"] += 1
    await http(port, "DELETE", f"/v1/requests/{job}", source=source, key=key)
    stats.completed += 1
    if record is not None:
        record[1].append(time.monotonic() - started)


async def honest_client(port: int, index: int, keys: int, light: bytes, stats: Stats, end: float) -> None:
    key, source = f"honest-{index % keys}", f"127.0.1.{index % keys + 1}"
    while time.monotonic() < end:
        try:
            await honest_request(port, key, source, light, stats)
        except (OSError, asyncio.TimeoutError, HTTPError, ValueError) as error:
            stats.errors[type(error).__name__] += 1
            await asyncio.sleep(0.5)


async def probe(port: int, light: bytes, stats: Stats, end: float) -> None:
    async def health() -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                status, _, _ = await http(port, "GET", "/v1/health", timeout=10)
                if status == 200:
                    stats.health.append(time.monotonic() - started)
                else:
                    stats.errors[f"health {status}"] += 1
            except (OSError, asyncio.TimeoutError, HTTPError) as error:
                stats.errors[f"health {type(error).__name__}"] += 1
            await asyncio.sleep(0.1)

    async def submissions() -> None:
        while time.monotonic() < end:
            try:
                await honest_request(port, "probe", "127.0.0.1", light, stats, (stats.probe_submit, stats.probe_total))
            except (OSError, asyncio.TimeoutError, HTTPError, ValueError) as error:
                stats.errors[f"probe {type(error).__name__}"] += 1
            await asyncio.sleep(0.5)

    await asyncio.gather(health(), submissions())


async def idle_flood(port: int, sources: list[str], count: int, stats: Stats, end: float) -> None:
    """``count`` connections that never send a byte, reopened as the server closes them."""
    async def one(source: str) -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                stats.abuse["idle: connect failed"] += 1
                await asyncio.sleep(0.5)
                continue
            try:
                first = await asyncio.wait_for(reader.read(64), max(0.1, end - time.monotonic()))
                stats.abuse["idle: refused 503" if first.startswith(b"HTTP/1.1 503") else "idle: closed"] += 1
            except (asyncio.TimeoutError, OSError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(2.0)  # an attacker holding connections, not a connection-rate flood

    await asyncio.gather(*(one(sources[index % len(sources)]) for index in range(count)))


async def slow_uploads(port: int, size: int, stats: Stats, end: float) -> None:
    chunk = b"\0" * (1 << 20)

    async def one() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.5", 0))
                writer.write((f"POST /v1/requests HTTP/1.1\r\nHost: x\r\nX-API-Key: uploader\r\nContent-Type: "
                              f"{CONTENT_TYPE}\r\nContent-Length: {size}\r\n\r\n").encode())
                sent = 0
                while sent < size - 1 and not reader.at_eof():
                    piece = chunk[:min(len(chunk), size - 1 - sent)]
                    writer.write(piece)
                    await writer.drain()
                    sent += len(piece)
                answer = await asyncio.wait_for(reader.read(64), max(0.1, end - time.monotonic()) + 30)
                stats.abuse[f"upload: {answer[9:12].decode(errors='replace') or 'closed'}"] += 1
                writer.close()
            except (OSError, asyncio.TimeoutError):
                stats.abuse["upload: cut"] += 1
            await asyncio.sleep(0.5)

    await asyncio.gather(*(one() for _ in range(8)))


async def check_flood(port: int, expensive: bytes, stats: Stats, end: float) -> None:
    async def one() -> None:
        while time.monotonic() < end:
            try:
                status, headers, _ = await http(port, "POST", "/v1/requests", source="127.0.0.7", key="flooder",
                                                data=expensive, timeout=120)
                stats.abuse[f"check flood: {status}"] += 1
                if status in (429, 503):
                    await asyncio.sleep(min(retry_after(headers), 2.0))
            except (OSError, asyncio.TimeoutError, HTTPError):
                stats.abuse["check flood: cut"] += 1

    await asyncio.gather(*(one() for _ in range(8)))


async def sample_rss(pid: int, stats: Stats, end: float) -> None:
    while time.monotonic() < end + 2:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            stats.rss.extend(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))
        await asyncio.sleep(0.25)


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f} ms"


async def attack(port: int, duration: float, upload_mb: int, kinds: set[str]) -> None:
    """The abuses, run in a process of their own (so they do not slow the measuring one)."""
    stats = Stats()
    expensive = expensive_body() if "check" in kinds else b""
    print("ready", flush=True)
    end = time.monotonic() + duration
    tasks = []
    if "idle" in kinds:
        tasks += [idle_flood(port, ["127.0.0.2"], 2000, stats, end),
                  idle_flood(port, [f"127.0.2.{n}" for n in range(1, 41)], 1000, stats, end)]
    if "upload" in kinds:
        tasks.append(slow_uploads(port, upload_mb * 1024 * 1024, stats, end))
    if "check" in kinds:
        tasks.append(check_flood(port, expensive, stats, end))
    abuse = asyncio.gather(*tasks)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(abuse, duration + 5)
    print(json.dumps(dict(stats.abuse)), flush=True)


async def drive(args: argparse.Namespace, server: ServerProcess, stats: Stats) -> float:
    light = body(LIGHT)
    attacker = None
    if args.abuse:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--attack-port", str(server.port), "--duration", str(args.duration),
            "--upload-mb", str(args.upload_mb), "--abuses", args.abuses, stdout=asyncio.subprocess.PIPE)
        await attacker.stdout.readline()  # "ready"
    print(f"server on port {server.port}; load for {args.duration:g} s ...", file=sys.stderr)
    start = time.monotonic()
    end = start + args.duration
    tasks = [sample_rss(server.process.pid, stats, end), probe(server.port, light, stats, end)]
    tasks += [honest_client(server.port, index, args.keys, light, stats, end) for index in range(args.clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration + 30)
    except asyncio.TimeoutError:
        stats.errors["honest client still waiting 30 s after the end"] += 1
    elapsed = time.monotonic() - start
    if attacker is not None:
        with contextlib.suppress(ValueError):
            stats.abuse.update(json.loads((await attacker.stdout.readline()) or b"{}"))
        await attacker.wait()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=200, help="honest clients (default 200)")
    parser.add_argument("--keys", type=int, default=20, help="API keys they share (default 20)")
    parser.add_argument("--upload-mb", type=int, default=250, help="size of each held upload (default 250)")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit (default 1024)")
    parser.add_argument("--no-abuse", dest="abuse", action="store_false", help="honest traffic only")
    parser.add_argument("--abuses", default="idle,upload,check",
                        help="which abuses run, comma-separated (default idle,upload,check)")
    parser.add_argument("--attack-port", type=int, default=None, help=argparse.SUPPRESS)  # the abuser process
    args = parser.parse_args()
    torch.set_num_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the abusers hold thousands of sockets
    if args.attack_port is not None:
        asyncio.run(attack(args.attack_port, args.duration, args.upload_mb, set(args.abuses.split(","))))
        return 0
    folder = tempfile.mkdtemp(prefix="seethrough-bench-front-door-")
    offline.save_random_gpt2(folder, n_layer=2, n_embd=32, n_head=4, n_positions=128)
    keys = [f"honest-{index}" for index in range(args.keys)] + ["probe", "uploader", "flooder"]
    LimitedServer.nofile = args.nofile
    server = LimitedServer({"gpt2": folder}, api_keys=keys, args=[
        "--threads", "1", "--memory-limit", "1G", "--spare-workers", "0", "--max-request-bytes", "256M"])
    stats = Stats()
    with server:
        elapsed = asyncio.run(drive(args, server, stats))
        log = server.log()
    problems = [line for line in log.splitlines() if "ERROR" in line or "Error" in line]
    if problems:
        print("server log, errors:\n  " + "\n  ".join(problems[-20:]), file=sys.stderr)
    rows = [
        ("duration", f"{elapsed:.0f} s, {args.clients} clients over {args.keys} keys, abuse: {args.abuses if args.abuse else 'none'}"),
        ("requests completed (submit, poll, result, delete)", f"{stats.completed} ({stats.completed / elapsed:.1f}/s)"),
        ("honest 429 / 503 (Retry-After honoured)", f"{stats.busy[429]} / {stats.busy[503]}"),
        ("health p50 / p99 / max", f"{pct(stats.health, .5)} / {pct(stats.health, .99)} / "
                                   f"{1000 * max(stats.health or [0]):.0f} ms ({len(stats.health)} probes)"),
        ("probe key: submit to 202, p50 / p99", f"{pct(stats.probe_submit, .5)} / {pct(stats.probe_submit, .99)}"),
        ("probe key: submit to result, p50 / p99", f"{pct(stats.probe_total, .5)} / {pct(stats.probe_total, .99)}"),
        ("API RSS start / peak / end", f"{stats.rss[0]:.0f} / {max(stats.rss):.0f} / {stats.rss[-1]:.0f} MiB"),
        ("honest errors other than 429/503", ", ".join(f"{k}: {v}" for k, v in stats.errors.items()) or "none"),
        ("abusers saw", ", ".join(f"{k}: {v}" for k, v in sorted(stats.abuse.items())) or "-"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure'.ljust(width)} | value\n{'-' * width}-|-{'-' * 60}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())
