"""A request's life cycle on a real server: cancel, Ctrl+C, another key's ids, expiry.

The session's shared server (``tests/test_server.py``: two keys, the random
2-layer GPT-2, one worker that forks a process per request) runs real
requests; a body that prints ``started`` and then loops for ever stands for
a long request.  The worker's request processes are found in ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seethrough.remote.client.connection import RemoteClient, RemoteJob
from seethrough.remote.server.jobs import JobStore
from test_server import ALICE, BOB, call, follow, gpt2_workers, make_request, packed, post, reference, server  # noqa: F401
from fixtures.signals import takes_ctrl_c

pytestmark = [pytest.mark.timeout(300)]

ENDLESS = "print('started')\nwhile True:\n    pass\n"


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (zombies left out)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])


def looping_process(worker: int) -> int:
    """The worker's request process that is running the endless loop (the one burning CPU)."""
    first = {pid: cpu_ticks(pid) for pid in children(worker)}
    time.sleep(0.3)
    return max(first, key=lambda pid: cpu_ticks(pid) - first[pid])


def started(server, job_id: str, key: str = ALICE) -> None:
    """Wait until the request has printed 'started' (it is running its loop)."""
    for name, data in RemoteClient(server.url, key).events(job_id, timeout=120):
        if name == "log" and data.get("text") == "started":
            return
        assert name not in ("completed", "error"), (name, data)
    raise AssertionError("the request ended without printing 'started'")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_cancelling_a_running_request_kills_its_process_and_the_next_one_starts(server, reference):
    worker = gpt2_workers(server)[0]["pid"]
    running = post(server, packed(make_request(ENDLESS))).json()["id"]
    waiting = post(server, packed(make_request())).json()["id"]
    started(server, running)
    assert call(server, "GET", f"/v1/requests/{waiting}").json()["status"] == "queued"
    looping = looping_process(worker)
    usage = call(server, "GET", "/v1/usage").json()["jobs"]
    reply = call(server, "DELETE", f"/v1/requests/{running}")
    assert reply.status == 200 and reply.json() == {"id": running, "deleted": True, "cancelled": True}
    assert call(server, "GET", "/v1/usage").json()["jobs"] == usage - 1  # the quota is freed at once
    for suffix in ("", "/events", "/result"):
        assert call(server, "GET", f"/v1/requests/{running}{suffix}").status == 404
    # Within a second the looping request process is gone and the queued request runs.
    wait_for(lambda: call(server, "GET", f"/v1/requests/{waiting}").json()["status"] != "queued", 1.0,
             "the queued request starts after the cancel")
    wait_for(lambda: looping not in children(worker), 1.0, "the cancelled request's process is gone")
    outcome = follow(server, waiting)
    assert torch.equal(outcome.values["h0"], reference["h0"])
    after = gpt2_workers(server)[0]
    assert after["pid"] == worker  # the loaded model process lives on: only the request's process died
    call(server, "DELETE", f"/v1/requests/{waiting}")


def test_cancelling_a_queued_request_takes_it_out_of_the_queue(server):
    blocker = post(server, packed(make_request(ENDLESS))).json()["id"]
    queued = post(server, packed(make_request())).json()["id"]
    third = post(server, packed(make_request())).json()["id"]
    started(server, blocker)
    assert call(server, "GET", f"/v1/requests/{third}").json()["position"] == 2
    client = RemoteClient(server.url, ALICE)
    assert RemoteJob(client, queued).cancel() is True
    assert call(server, "GET", f"/v1/requests/{queued}").status == 404
    wait_for(lambda: call(server, "GET", f"/v1/requests/{third}").json().get("position") == 1, 5.0,
             "the request behind the cancelled one moves up")
    assert RemoteJob(client, blocker).cancel() is True
    assert follow(server, third).error is None
    assert RemoteJob(client, third).cancel() is False  # finished: forgotten, nothing to cancel
    assert call(server, "GET", f"/v1/requests/{third}").status == 404


def test_a_follower_of_a_cancelled_request_hears_why(server):
    job_id = post(server, packed(make_request(ENDLESS))).json()["id"]
    started(server, job_id)
    client = RemoteClient(server.url, ALICE)
    stream = client.events(job_id, timeout=60)
    assert next(stream)[0] == "status"
    assert RemoteJob(client, job_id).cancel() is True
    events = list(stream)
    assert events[-1][0] == "error" and events[-1][1]["type"] == "RequestCancelledError"
    assert "cancelled" in events[-1][1]["message"]


def test_another_keys_request_answers_as_one_that_does_not_exist(server):
    job_id = post(server, packed(make_request(ENDLESS)), key=ALICE).json()["id"]
    started(server, job_id)
    missing = "x" * len(job_id)
    for method, suffix in (("GET", ""), ("GET", "/events"), ("GET", "/result"), ("DELETE", "")):
        foreign = call(server, method, f"/v1/requests/{job_id}{suffix}", key=BOB)
        absent = call(server, method, f"/v1/requests/{missing}{suffix}", key=BOB)
        assert foreign.status == absent.status == 404, (method, suffix)
        assert foreign.detail.replace(job_id, "ID") == absent.detail.replace(missing, "ID"), (method, suffix)
    assert call(server, "GET", f"/v1/requests/{job_id}", key=ALICE).json()["status"] == "running"
    assert call(server, "DELETE", f"/v1/requests/{job_id}", key=ALICE).json()["cancelled"] is True


def test_ctrl_c_in_a_blocking_remote_trace_cancels_it_on_the_server(server, gpt2_dir, tmp_path):
    script = tmp_path / "endless.py"
    script.write_text(textwrap.dedent(f"""
        import seethrough
        model = seethrough.LanguageModel({str(gpt2_dir)!r}, remote_name="gpt2")
        with model.trace("The quick brown fox", remote=True, host={server.url!r}, api_key={ALICE!r}):
            print("started")
            while True:
                pass
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               text=True, preexec_fn=takes_ctrl_c)
    try:
        assert process.stdout.readline().strip() == "started"  # printed by the body, on the server
        worker = gpt2_workers(server)[0]["pid"]
        looping = looping_process(worker)
        assert server.health()["requests"]["running"] == 1
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    wait_for(lambda: server.health()["requests"]["running"] == 0, 5.0, "the server stops the request")
    wait_for(lambda: looping not in children(worker), 5.0, "its request process is killed")
    assert gpt2_workers(server)[0]["pid"] == worker
    assert post(server, packed(make_request())).status == 202  # and serves the next one


def test_a_result_past_its_ttl_is_never_served(tmp_path):
    store = JobStore(ttl=10, max_log_lines=5, max_log_bytes=1000, spool_dir=str(tmp_path))
    job = store.create("owner", "gpt2", "f.py", b"x")
    store.finish(job, b"result", None)
    assert store.get(job.id) is job
    assert store.get(job.id, now=job.finished + 10.5) is None  # the read checks the age; no sweep ran
    assert not job.result_path.exists() and store.usage("owner")["jobs"] == 0


def test_no_caller_can_evict_anothers_results_before_their_ttl(tmp_path):
    store = JobStore(ttl=600, max_log_lines=5, max_log_bytes=1000, spool_dir=str(tmp_path), max_jobs_per_key=3,
                     max_jobs=5)
    theirs = store.create("alice", "gpt2", "f.py", b"x")
    store.finish(theirs, b"alice's result", None)
    mine = []
    for _ in range(3):
        mine.append(store.create("mallory", "gpt2", "f.py", b"x"))
        store.finish(mine[-1], b"r", None)
    with pytest.raises(Exception, match="3 requests on the server"):
        store.create("mallory", "gpt2", "f.py", b"x")
    store.create("bob", "gpt2", "f.py", b"x")
    with pytest.raises(Exception, match="already holds 5 requests"):
        store.create("eve", "gpt2", "f.py", b"x")
    assert store.expire() == 0 and store.get(theirs.id).result == b"alice's result"


@pytest.mark.slow
def test_cancelling_in_a_worker_that_runs_requests_in_place_replaces_it(gpt2_dir, reference):
    from seethrough.remote.server import testing

    args = ["--threads", "1", "--timeout", "60", "--request-process", "reuse", "--start-method", "forkserver"]
    with testing.ServerProcess({"gpt2": str(gpt2_dir)}, api_keys=[ALICE], args=args) as in_place:
        before = gpt2_workers(in_place)[0]
        running = post(in_place, packed(make_request(ENDLESS))).json()["id"]
        waiting = post(in_place, packed(make_request())).json()["id"]
        started(in_place, running)
        assert call(in_place, "DELETE", f"/v1/requests/{running}").json()["cancelled"] is True
        outcome = follow(in_place, waiting)  # served by a fresh worker
        assert torch.equal(outcome.values["h0"], reference["h0"])
        after = gpt2_workers(in_place)[0]
        assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
        wait_for(lambda: gone(before["pid"]), 10.0, "the old worker is gone")
