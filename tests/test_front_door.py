"""The API's front door under abuse: real server on loopback, real sockets, real processes.

Each test reproduces one abuse seen against the API process (idle
connections, slow large uploads, floods of expensive-to-check bodies, and
more kinds at the HTTP layer) and checks that it is refused or bounded while
another client is still served: ``/v1/health`` from another address answers
within 1 s throughout, and a clean request works afterwards.

Attackers connect from other loopback addresses (``127.0.0.2`` and up; Linux
routes all of 127/8 to the loopback device), the honest client from
``127.0.0.1``, as on a real network where they are different hosts.  The
server runs with a 1,024 open-file limit (hard and soft) to reproduce the
common default.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from seethrough.remote import wire
from seethrough.remote.client.connection import CONTENT_TYPE
from seethrough.remote.protocol import Request
from seethrough.remote.server import testing

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux loopback addresses")]

HONEST, FLOODER = "honest-key-0001", "flooder-key-0002"
HEALTH_DEADLINE_S = 1.0
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
ARGS = ["--threads", "1", "--timeout", "6", "--memory-limit", "1G", "--job-ttl", "600", "--spare-workers", "0",
        "--header-timeout", str(HEAD_TIMEOUT_S), "--keep-alive", "2", "--body-timeout", str(BODY_TIMEOUT_S),
        "--max-connections-per-address", "32", "--max-request-bytes", "256M", "--max-stored-bytes-per-key", "512M",
        "--check-workers", "2", "--check-timeout", "5"]


class LimitedServer(testing.ServerProcess):
    """A server started under ``prlimit --nofile=1024:1024`` (the common default)."""

    def command(self) -> list[str]:
        return ["prlimit", "--nofile=1024:1024", "--"] + super().command()


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("front-door-spool")


@pytest.fixture(scope="module")
def server(gpt2_dir, spool) -> Iterator[testing.ServerProcess]:
    with LimitedServer({"gpt2": str(gpt2_dir)}, api_keys=[HONEST, FLOODER], args=ARGS + ["--spool-dir", str(spool)]
                       ) as running:
        yield running


def rss_mb(server: testing.ServerProcess) -> float:
    """The API process's resident memory (MiB)."""
    with open(f"/proc/{server.process.pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- clients -----------------------------------------------------------------------------------


def connect(server: testing.ServerProcess, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from ``sock``."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buffer[:200]!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        size = int(headers["content-length"])
        while len(rest) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:size]
    return status, headers, rest


def health_time(server: testing.ServerProcess, timeout: float = 5.0) -> float:
    """Seconds a fresh connection from 127.0.0.1 takes to get 200 from /v1/health."""
    started = time.monotonic()
    with contextlib.closing(connect(server, timeout=timeout)) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, _ = read_response(sock)
    assert status == 200, status
    return time.monotonic() - started


class HealthWatch:
    """Polls /v1/health from 127.0.0.1 every 0.1 s in a thread; records the worst time and any failure."""

    def __init__(self, server: testing.ServerProcess) -> None:
        self.server = server
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.times.append(health_time(self.server, timeout=HEALTH_DEADLINE_S * 3))
            except (OSError, AssertionError, ValueError) as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            self._stop.wait(0.1)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert self.times, "health was not polled during the abuse"
        assert max(self.times) < HEALTH_DEADLINE_S, f"health took up to {max(self.times):.2f} s"


def request_body(source: str = "out = model.transformer.h[0].output.save()\n", **fields: Any) -> bytes:
    fields.setdefault("envoys", {"model": ""})
    fields.setdefault("args", ["The quick brown fox"])
    request = Request(model="gpt2", kind="trace", source=source, filename="body.py", first_line=1,
                      client_version="0.1.0", **fields)
    return wire.pack(request.to_wire(), max_bytes=1 << 28, level=1)


def submit(server: testing.ServerProcess, body: bytes, key: str = HONEST, timeout: float = 30.0) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", "/v1/requests", body=body,
                           headers={"X-API-Key": key, "Content-Type": CONTENT_TYPE})
        response = connection.getresponse()
        return response.status, {**json.loads(response.read() or b"{}"), "_headers": dict(response.getheaders())}
    finally:
        connection.close()


def clean_request_works(server: testing.ServerProcess) -> None:
    """An honest submission is accepted and completes (the check after every abuse)."""
    status, reply = submit(server, request_body())
    assert status == 202, (status, reply)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = server.get_json(f"/v1/requests/{reply['id']}", headers={"X-API-Key": HONEST})
        if state["status"] in ("completed", "error"):
            assert state["status"] == "completed", state.get("error")
            return
        time.sleep(0.05)
    raise AssertionError("the clean request did not finish within 60 s")


def open_idle(server: testing.ServerProcess, count: int, sources: list[str]) -> list[socket.socket]:
    """``count`` connections that never send a byte, spread over ``sources``."""
    sockets = []
    for index in range(count):
        try:
            sockets.append(connect(server, sources[index % len(sources)], timeout=5))
        except OSError:
            pass  # a refused or reset connect is the server doing its job
    return sockets


# -- 1. connections ------------------------------------------------------------------------------


@pytest.mark.slow
def test_idle_connection_flood_from_one_address_does_not_stall_health(server):
    with HealthWatch(server) as watch:
        idle = open_idle(server, 2000, ["127.0.0.2"])
        time.sleep(1.0)
        refused, held = 0, 0
        for sock in idle:  # past the per-address cap: an immediate 503, then closed
            sock.setblocking(False)
            try:
                refused += sock.recv(4096).startswith(b"HTTP/1.1 503")
            except BlockingIOError:
                held += 1  # admitted: nothing written yet
            except OSError:
                pass
        assert held <= 32 and refused >= 1500, (held, refused)
        time.sleep(HEAD_TIMEOUT_S + 0.5)  # the admitted ones are closed at the head deadline
        for sock in idle:
            sock.close()
    watch.check()
    clean_request_works(server)


@pytest.mark.slow
def test_idle_connections_from_many_addresses_past_the_total_cap(server):
    sources = [f"127.0.1.{host}" for host in range(1, 41)]  # 40 addresses x 25 = 1,000, over the 640 cap
    with HealthWatch(server) as watch:
        idle = open_idle(server, 1000, sources)
        time.sleep(1.0)
        for sock in idle:
            sock.close()
    watch.check()
    clean_request_works(server)


def test_a_head_sent_byte_by_byte_is_cut_at_the_deadline(server):
    sock = connect(server, "127.0.0.3")
    started = time.monotonic()
    closed_after = None
    try:
        for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        closed_after = time.monotonic() - started
    if closed_after is None:
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            assert sock.recv(100) == b""
        closed_after = time.monotonic() - started
    sock.close()
    assert closed_after < HEAD_TIMEOUT_S + 5
    assert health_time(server) < HEALTH_DEADLINE_S


def test_an_idle_keep_alive_connection_is_closed(server):
    with contextlib.closing(connect(server, "127.0.0.4")) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the server after --keep-alive 2


# -- 2. uploads ----------------------------------------------------------------------------------


def post_head(sock: socket.socket, key: str, length: int | None, extra: bytes = b"") -> None:
    sized = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    sock.sendall(b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nX-API-Key: " + key.encode() +
                 b"\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\n" + sized + extra + b"\r\n")


@pytest.mark.slow
def test_slow_large_uploads_stay_on_disk_and_are_cut_off(server, spool):
    clean_request_works(server)
    start = rss_mb(server)
    size, chunk = 100 * 1024 * 1024, b"\0" * (1 << 20)
    peak = [start]
    outcomes: list[Any] = [None] * 8

    def upload(index: int) -> None:
        try:
            sock = connect(server, "127.0.0.5", timeout=60)
            post_head(sock, FLOODER, size)
            for _ in range(size // len(chunk) - 1):
                sock.sendall(chunk)
            sock.sendall(chunk[:-1])  # hold the last byte
            outcomes[index] = read_response(sock)[0]
            sock.close()
        except OSError as error:
            outcomes[index] = error

    with HealthWatch(server) as watch:
        threads = [threading.Thread(target=upload, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak.append(rss_mb(server))
            time.sleep(0.1)
    watch.check()
    # 4 are sending at once (--max-uploads-per-key), the rest are told 429 before their body is read;
    # the 4 that hold the last byte are cut off with 408 after --body-timeout.
    assert sorted(outcomes, key=str) == [408] * 4 + [429] * 4, outcomes
    assert max(peak) - start <= 150, f"API RSS went from {start:.0f} to {max(peak):.0f} MiB"
    time.sleep(0.5)
    assert rss_mb(server) - start <= 50, f"API RSS {rss_mb(server):.0f} MiB after, {start:.0f} before"
    assert not list(spool.glob("upload-*")), "a partial upload was left in the spool"
    clean_request_works(server)


def test_a_body_over_the_remaining_quota_is_refused_before_it_is_read(server, spool):
    """Two uploads in flight announce 2 x 250M of the key's 512M; a third is refused at its head."""
    held = [connect(server, "127.0.0.6", timeout=30) for _ in range(2)]
    try:
        for sock in held:
            post_head(sock, FLOODER, 250 * 1024 * 1024)
            sock.sendall(b"\0" * 65536)
        time.sleep(0.5)
        with contextlib.closing(connect(server, "127.0.0.6", timeout=30)) as third:
            post_head(third, FLOODER, 250 * 1024 * 1024)
            status, headers, body = read_response(third)  # answered before a byte of its body is sent
        assert status == 429 and "retry-after" in headers, (status, body)
        assert "uploads in flight" in json.loads(body)["detail"]
        chunked = connect(server, "127.0.0.6", timeout=30)
        with contextlib.closing(chunked):  # a chunked body is counted as it grows
            post_head(chunked, FLOODER, None)
            chunk = b"\0" * (1 << 20)
            status = None
            with contextlib.suppress(OSError):
                for _ in range(40):
                    chunked.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, _, body = read_response(chunked)
        assert status == 429 and "over the limit" in json.loads(body)["detail"], (status, body)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    assert not list(spool.glob("upload-*")), "a partial upload was left in the spool"
    clean_request_works(server)


# -- 3. fair intake ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expensive_body() -> bytes:
    """Cheap to send, expensive to check, refused at the end: a compressed 200 MB zero tensor, a
    2M-item list, ~1 MB of code, and a module path the model does not have."""
    import torch

    source = "".join(f"v{i} = model.transformer.h[0].output[0][{i % 7}] * {i}\n" for i in range(18000))
    return request_body(source, args=["hi", torch.zeros(50_000_000), [0] * 2_000_000],
                        envoys={"model": "", "bad": "transformer.nope"})


@pytest.mark.slow
def test_a_flood_of_expensive_checks_does_not_hold_up_another_key(server, expensive_body):
    assert len(expensive_body) < 1 << 20
    outcomes: list[Any] = [None] * 8

    def flood(index: int) -> None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120,
                                                    source_address=("127.0.0.7", 0))
            connection.request("POST", "/v1/requests", body=expensive_body,
                               headers={"X-API-Key": FLOODER, "Content-Type": CONTENT_TYPE})
            response = connection.getresponse()
            outcomes[index] = (response.status, response.getheader("Retry-After"))
            connection.close()
        except OSError as error:
            outcomes[index] = error

    with HealthWatch(server) as watch:
        threads = [threading.Thread(target=flood, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        accepted_in = []
        for _ in range(3):
            started = time.monotonic()
            status, reply = submit(server, request_body(), timeout=30)
            accepted_in.append(time.monotonic() - started)
            assert status == 202, (status, reply)
            time.sleep(0.5)
        for thread in threads:
            thread.join(120)
    watch.check()
    assert max(accepted_in) < 2.0, f"the honest key waited {max(accepted_in):.2f} s for a 202"
    statuses = [outcome[0] if isinstance(outcome, tuple) else outcome for outcome in outcomes]
    assert all(status in (400, 413, 429, 503) for status in statuses), outcomes
    refused_fast = [outcome for outcome in outcomes if outcome[0] in (429, 503)]
    assert refused_fast and all(retry is not None for _, retry in refused_fast), outcomes
    clean_request_works(server)


# -- more abuses at the HTTP layer, each followed by a clean request --------------------------------


def exchange(server: testing.ServerProcess, data: bytes, source: str = "127.0.0.9", timeout: float = 10.0) -> bytes:
    """Send ``data`` raw and read until the server closes (or ``timeout``)."""
    with contextlib.closing(connect(server, source, timeout=timeout)) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        return received


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def finished_job(server: testing.ServerProcess, source: str = "out = model.transformer.h[0].output.save()\n") -> str:
    status, reply = submit(server, request_body(source))
    assert status == 202, reply
    deadline = time.monotonic() + 60
    while (state := server.get_json(f"/v1/requests/{reply['id']}", headers={"X-API-Key": HONEST}))["status"] not in (
            "completed", "error"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state["status"] == "completed", state.get("error")
    return reply["id"]


def test_pipelined_requests_are_answered_in_order(server):
    requests = b"".join(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" for _ in range(300))
    raw = exchange(server, requests + b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200] * 300 + [404]
    clean_request_works(server)


def test_header_floods_are_refused(server):
    big = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert statuses(exchange(server, big)) == [431]
    many = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n"
    assert statuses(exchange(server, many)) == [431]  # 5,000 headers are over the 16 KiB head
    with contextlib.closing(connect(server, "127.0.0.9")) as sock:  # the same, a few bytes at a time
        with contextlib.suppress(OSError):
            for start in range(0, len(many), 1000):
                sock.sendall(many[start:start + 1000])
        assert read_response(sock)[0] == 431
    assert health_time(server) < HEALTH_DEADLINE_S
    clean_request_works(server)


def test_cookie_flood_on_many_connections(server):
    cookie = b"; ".join(b"c%d=%s" % (i, b"x" * 20) for i in range(600))  # ~15 KiB, under the head cap
    request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nCookie: " + cookie + b"\r\nConnection: close\r\n\r\n"
    with HealthWatch(server) as watch:
        threads = [threading.Thread(target=lambda: [exchange(server, request, "127.0.0.10") for _ in range(10)])
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    watch.check()
    clean_request_works(server)


@pytest.mark.parametrize("game", [
    b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hex
    b"5;" + b"e" * 20_000 + b"\r\nhello\r\n0\r\n\r\n",  # a chunk extension bigger than a head may be
    b"ffffffffffffffffffff\r\nabc",  # a chunk size past any limit
], ids=["not-hex", "huge-extension", "huge-size"])
def test_chunked_encoding_games_are_refused(server, spool, game):
    head = (b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nX-API-Key: " + FLOODER.encode() + b"\r\nContent-Type: " +
            CONTENT_TYPE.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    started = time.monotonic()
    codes = statuses(exchange(server, head + game, "127.0.0.11", timeout=BODY_TIMEOUT_S + 10))
    # refused as malformed, or (a chunk that claims more than will ever come) cut off at --body-timeout
    assert codes and all(code in (400, 408, 413) for code in codes), codes
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert not list(spool.glob("upload-*"))
    clean_request_works(server)


def test_smuggling_shapes_are_refused(server):
    both = (b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            b"X-API-Key: " + FLOODER.encode() + b"\r\n\r\n0\r\n\r\nGET /v1/usage HTTP/1.1\r\nHost: x\r\n\r\n")
    twice = (b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nabcdefg")
    negative = b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    # Transfer-Encoding wins over Content-Length (h11): the body is the empty chunked one, refused (no
    # Content-Type), and what follows is a request of its own, without the key of the first (401)
    assert statuses(exchange(server, both, "127.0.0.12")) == [415, 401]
    for data in (twice, negative):
        assert statuses(exchange(server, data, "127.0.0.12"))[:1] == [400], data[:60]
    assert statuses(exchange(server, preface, "127.0.0.12"))[:1] == [404]  # an HTTP/2 preface: no such route
    clean_request_works(server)


def test_event_streams_held_open_are_bounded(server):
    status, reply = submit(server, request_body("n = 0\nwhile True:\n    n = n + 1\n"))  # runs to --timeout 6
    assert status == 202
    path = f"/v1/requests/{reply['id']}/events".encode()
    streams, refused = [], 0
    with HealthWatch(server) as watch:
        for _ in range(60):  # 32 per address are kept; the rest are refused at once
            sock = connect(server, "127.0.0.13")
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: " + HONEST.encode() + b"\r\n\r\n")
            streams.append(sock)
        time.sleep(0.5)
        for sock in streams:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                refused += sock.recv(65536).startswith(b"HTTP/1.1 503")
        assert refused >= 60 - 32, refused
        time.sleep(7)  # the request is killed at its deadline: every stream ends with its error event
        ended = 0
        for sock in streams:
            sock.settimeout(5)
            data = b""
            with contextlib.suppress(OSError):
                while b"event: error" not in data and (chunk := sock.recv(65536)):
                    data += chunk
            ended += b"event: error" in data
            sock.close()
    watch.check()
    assert ended >= 30, ended
    clean_request_works(server)


def test_many_downloads_of_one_result_with_readers_that_stop(server):
    job = finished_job(server, "big = model.output.logits.save()\n")  # 4 x 50,257 floats: 0.8 MB
    start = rss_mb(server)
    request = b"GET /v1/requests/" + job.encode() + b"/result HTTP/1.1\r\nHost: x\r\nX-API-Key: " + HONEST.encode()
    stalled = []
    with HealthWatch(server) as watch:
        for index in range(30):  # readers that never read: the server's buffers fill and it waits
            sock = connect(server, f"127.0.2.{index + 1}")
            sock.sendall(request + b"\r\n\r\n")
            stalled.append(sock)
        sizes = []

        def download() -> None:
            status, headers, body = read_response_from(server, request + b"\r\nConnection: close\r\n\r\n")
            sizes.append((status, len(body)))

        threads = [threading.Thread(target=download) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        peak = rss_mb(server)
    for sock in stalled:
        sock.close()
    watch.check()
    assert len(sizes) == 20 and all(status == 200 and size > 700_000 for status, size in sizes), sizes[:3]
    assert peak - start < 100, f"API RSS {start:.0f} -> {peak:.0f} MiB"
    clean_request_works(server)


def read_response_from(server: testing.ServerProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with contextlib.closing(connect(server, "127.0.0.14", timeout=30)) as sock:
        sock.sendall(data)
        return read_response(sock)


def test_id_enumeration_under_load(server):
    own = finished_job(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=("127.0.0.15", 0))
    seen = []
    with HealthWatch(server) as watch:
        for index in range(1500):  # one keep-alive connection, as fast as it goes
            guess = own[:-2] + f"{index:02x}"[-2:] if index % 2 else f"job-{index}"
            connection.request("GET", f"/v1/requests/{guess}", headers={"X-API-Key": FLOODER})
            response = connection.getresponse()
            response.read()
            seen.append(response.status)
            if response.status not in (403, 404):
                break
    connection.close()
    watch.check()
    # an id that exists but belongs to another key is 403, never its status; everything else 404
    assert set(seen) <= {403, 404}, sorted(set(seen))
    clean_request_works(server)


def test_expect_continue_without_a_body_and_a_body_cut_short(server, spool):
    expect = (b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nX-API-Key: " + FLOODER.encode() + b"\r\nContent-Type: " +
              CONTENT_TYPE.encode() + b"\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    started = time.monotonic()
    raw = exchange(server, expect, "127.0.0.16", timeout=BODY_TIMEOUT_S + 10)
    assert statuses(raw)[-1] == 408 and time.monotonic() - started < BODY_TIMEOUT_S + 5, raw[:300]
    short = expect.replace(b"Expect: 100-continue\r\n", b"") + b"\0" * 1000
    with contextlib.closing(connect(server, "127.0.0.16")) as sock:  # 1,000 of 1,000,000 bytes, then gone
        sock.sendall(short)
        time.sleep(0.3)
    time.sleep(0.5)
    assert not list(spool.glob("upload-*"))
    clean_request_works(server)


def test_wrong_key_flood_is_refused_fast(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=("127.0.0.17", 0))
    seen = set()
    with HealthWatch(server) as watch:
        for index in range(1000):
            connection.request("POST", "/v1/requests", body=b"x" * 100,
                               headers={"X-API-Key": f"guess-{index}", "Content-Type": CONTENT_TYPE})
            response = connection.getresponse()
            response.read()
            seen.add(response.status)
    connection.close()
    watch.check()
    assert seen == {403}
    clean_request_works(server)
