"""Quotas on a server without API keys, and printed lines under the byte quota.

A real open server on loopback (no ``--api-keys``) with small quotas serves
the random 2-layer GPT-2.  Callers at other addresses are real connections
from other loopback addresses (``127.0.0.2``, ``127.0.0.3``: all of
``127.0.0.0/8`` reaches the server).
"""

from __future__ import annotations

import http.client
import json
import time

import pytest

from seethrough.remote.server import testing
from seethrough.remote.server.app import address_owner
from test_server import CONTENT_TYPE, Reply, follow, make_request, packed

pytestmark = [pytest.mark.timeout(300)]

QUOTA_BYTES = 1024**2
PRINT_1MB = "for i in range(1000):\n    print('x' * 1000)\n"


@pytest.fixture(scope="module")
def spool(tmp_path_factory):
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def open_server(gpt2_dir, spool):
    args = ["--threads", "1", "--timeout", "60", "--max-jobs-per-key", "2", "--max-stored-bytes-per-key", "1M",
            "--max-log-bytes", "4M", "--max-log-lines", "100000", "--job-ttl", "5", "--spool-dir", str(spool),
            "--start-method", "forkserver"]
    with testing.ServerProcess({"gpt2": str(gpt2_dir)}, args=args) as server:
        yield server


def send(server, method: str, path: str, body: bytes | None = None, key: str | None = None,
         source: str = "127.0.0.1") -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60, source_address=(source, 0))
    try:
        headers = {"Content-Type": CONTENT_TYPE} if body is not None else {}
        if key is not None:
            headers["X-API-Key"] = key
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def test_made_up_keys_do_not_make_new_quotas_on_an_open_server(open_server):
    body = packed(make_request())
    replies = [send(open_server, "POST", "/v1/requests", body, key=f"made-up-{n}") for n in range(6)]
    assert [reply.status for reply in replies] == [202, 202, 429, 429, 429, 429]
    assert "2 requests on the server" in replies[2].detail
    usage = send(open_server, "GET", "/v1/usage", key="yet-another").json()
    assert usage["jobs"] == 2 and usage["max_jobs"] == 2  # one quota, whatever the header says
    # Another address has its own quota; the first caller's results stay.
    other = send(open_server, "POST", "/v1/requests", body, source="127.0.0.2")
    assert other.status == 202
    assert send(open_server, "GET", "/v1/usage", source="127.0.0.2").json()["jobs"] == 1
    for reply in replies[:2] + [other]:
        job_id = reply.json()["id"]
        send(open_server, "GET", f"/v1/requests/{job_id}/events")
        assert send(open_server, "DELETE", f"/v1/requests/{job_id}").status == 200
    assert send(open_server, "GET", "/v1/usage").json()["jobs"] == 0


def test_address_owners():
    assert address_owner("10.1.2.3") == "address:10.1.2.3"
    assert address_owner("::ffff:10.1.2.3") == "address:10.1.2.3"
    assert address_owner("2001:db8::1") == address_owner("2001:db8::ffff:1") == "address:2001:db8::/64"
    assert address_owner("2001:db8:0:1::1") != address_owner("2001:db8::1")
    assert address_owner(None) == "address:?"


def test_printed_lines_count_against_the_byte_quota_and_stop_the_request(open_server, spool):
    first = send(open_server, "POST", "/v1/requests", packed(make_request(PRINT_1MB)), source="127.0.0.3")
    second = send(open_server, "POST", "/v1/requests", packed(make_request(PRINT_1MB)), source="127.0.0.3")
    outcomes = [follow(open_server, reply.json()["id"]) for reply in (first, second)]
    usage = send(open_server, "GET", "/v1/usage", source="127.0.0.3").json()
    # Error answers (a few KB) are always kept; printed lines never pass the quota.
    assert usage["max_bytes"] == QUOTA_BYTES and usage["bytes"] <= QUOTA_BYTES + 16 * 1024
    stopped = [outcome for outcome in outcomes if outcome.error is not None]
    assert stopped, [len(outcome.logs) for outcome in outcomes]
    for outcome in stopped:
        assert outcome.error["type"] == "QuotaExceededError"
        assert "1,048,576 bytes" in outcome.error["message"] and "--max-stored-bytes-per-key" in outcome.error["message"]
        assert outcome.events[-1][0] == "error"
    printed = sum(len(line) + 1 for outcome in outcomes for line in outcome.logs)
    assert printed <= QUOTA_BYTES
    # The lines wait in the spool, one file per request, not in the API process.
    files = [spool / f"{reply.json()['id']}.events" for reply in (first, second)]
    assert all(path.exists() for path in files)
    assert sum(path.stat().st_size for path in files) >= printed
    for reply in (first, second):
        send(open_server, "DELETE", f"/v1/requests/{reply.json()['id']}", source="127.0.0.3")
    assert not any(path.exists() for path in files)


def test_a_finished_request_is_gone_after_its_ttl(open_server):
    reply = send(open_server, "POST", "/v1/requests", packed(make_request()), source="127.0.0.4")
    job_id = reply.json()["id"]
    follow(open_server, job_id)
    assert send(open_server, "GET", f"/v1/requests/{job_id}/result", source="127.0.0.4").status == 200
    time.sleep(5.5)
    for suffix in ("", "/events", "/result"):
        gone = send(open_server, "GET", f"/v1/requests/{job_id}{suffix}", source="127.0.0.4")
        assert gone.status == 404 and "5 s ago" in gone.detail
    assert json.loads(send(open_server, "GET", "/v1/usage", source="127.0.0.4").body)["jobs"] == 0
