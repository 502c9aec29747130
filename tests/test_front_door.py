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
import socket
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from seethrough.remote import wire
from seethrough.remote.client import CONTENT_TYPE
from seethrough.remote.protocol import Request
from seethrough.remote.server import testing

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux loopback addresses")]

HONEST, FLOODER = "honest-key-0001", "flooder-key-0002"
HEALTH_DEADLINE_S = 1.0
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
ARGS = ["--threads", "1", "--timeout", "20", "--memory-limit", "1G", "--job-ttl", "600", "--spare-workers", "0",
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
        assert len(self.times) >= 3, "health was not polled during the abuse"
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
            assert state["status"] == "completed", state
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
    sources = [f"127.0.1.{host}" for host in range(1, 61)]  # 60 addresses x 30 = 1,800, over the ~640 cap
    with HealthWatch(server) as watch:
        idle = open_idle(server, 1800, sources)
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
