"""The server's intake under abuse: bombs, floods, quotas, and what health shows.

A real server on loopback (its own, with small quotas) serves the random
2-layer GPT-2; requests are built with the protocol's ``Request`` and the
wire format, as in ``tests/test_server.py``.  Memory figures are read from
``/proc/<pid>/status`` of the API process itself; results are compared with
the plain HuggingFace forward.
"""

from __future__ import annotations

import re
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from seethrough.remote import wire
from seethrough.remote.server import testing
from seethrough.remote.server.jobs import JobStore, QuotaExceeded
from test_server import ALICE, BOB, call, follow, make_request, packed, post, run
from fixtures.threads import single_thread

pytestmark = [pytest.mark.timeout(300)]

QUOTA_BYTES = 3 * 1024**2
QUOTA_JOBS = 12
TORCH = {"torch": "torch"}
BIG = "big = torch.arange(600 * 1024, dtype=torch.float32).sin().save()\n"  # 2.4 MB that do not compress


@pytest.fixture(scope="module")
def spool(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def guarded(gpt2_dir, spool):
    args = ["--threads", "1", "--timeout", "20", "--memory-limit", "2G", "--max-request-bytes", "8M",
            "--max-unpacked-bytes", "600M", "--max-source-bytes", "256K", "--check-workers", "1",
            "--check-timeout", "4", "--max-stored-bytes-per-key", str(QUOTA_BYTES),
            "--max-jobs-per-key", str(QUOTA_JOBS), "--job-ttl", "600", "--start-method", "forkserver",
            "--spool-dir", str(spool)]
    with testing.ServerProcess({"gpt2": str(gpt2_dir)}, api_keys=[ALICE, BOB, "carol-key"], args=args) as server:
        yield server


@pytest.fixture(scope="module")
def plain_logits(gpt2_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokens = AutoTokenizer.from_pretrained(gpt2_dir)("The quick brown fox", return_tensors="pt")
    with single_thread():  # as the server's workers: bitwise-equal values
        with torch.no_grad():
            return model(**tokens).logits


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def delete_all(server, key: str, ids: list[str]) -> None:
    for job_id in ids:
        call(server, "DELETE", f"/v1/requests/{job_id}", key=key)


# -- wire.inspect: the bounded reader the intake uses --------------------------------------------


def test_inspect_gives_the_shapes_of_unpack_without_the_data():
    value = {"a": torch.randn(3, 4), "b": [1, (torch.arange(5),)], "c": torch.zeros(2, dtype=torch.bool), "s": "x"}
    frame = wire.pack(value, max_bytes=1 << 20)
    full, light = wire.unpack(frame, max_bytes=1 << 20), wire.inspect(frame, max_bytes=1 << 20)
    assert light["s"] == "x" and light["b"][0] == 1
    for got, real in ((light["a"], full["a"]), (light["b"][1][0], full["b"][1][0]), (light["c"], full["c"])):
        assert got.device.type == "meta" and got.shape == real.shape and got.dtype == real.dtype


def test_inspect_holds_a_bounded_amount_of_memory_however_far_a_frame_inflates():
    frame = wire.pack({"bomb": torch.zeros(50_000_000)}, max_bytes=1 << 30)  # 200 MB of zeros
    assert len(frame) < 1_000_000
    tracemalloc.start()
    try:
        light = wire.inspect(frame, max_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert light["bomb"].shape == (50_000_000,)
    assert peak < 8 * 1024**2, f"inspect peaked at {peak:,} bytes"
    with pytest.raises(wire.WireSizeError, match="decompresses to more than"):
        wire.inspect(frame, max_bytes=1 << 30, max_unpacked_bytes=10_000_000)


def test_inspect_refuses_what_unpack_refuses():
    good = wire.pack({"t": torch.ones(4)}, max_bytes=1 << 20)
    bad_frames = [b"", b"NOPE" + good[4:], good[:-3], good + b"junk", good[:8] + b"\x00" * 8]
    for frame in bad_frames:
        with pytest.raises(wire.WireError):
            wire.unpack(frame, max_bytes=1 << 20)
        with pytest.raises(wire.WireError):
            wire.inspect(frame, max_bytes=1 << 20)


# -- the job store: disk and quotas --------------------------------------------------------------


def test_store_keeps_bodies_and_results_on_disk_under_a_quota(tmp_path):
    store = JobStore(60, 10, 1000, spool_dir=str(tmp_path), max_stored_bytes_per_key=1000, max_jobs_per_key=3)
    first = store.create("k", "gpt2", "f.py", b"b" * 400)
    assert first.request_path.read_bytes() == b"b" * 400 and first.payload == b"b" * 400
    with pytest.raises(QuotaExceeded, match="over the limit of 1,000 bytes"):
        store.create("k", "gpt2", "f.py", b"c" * 700)
    other = store.create("someone else", "gpt2", "f.py", b"c" * 700)  # quotas are per key
    store.finish(first, b"r" * 300, None)
    assert not first.request_path.exists() and first.result == b"r" * 300
    assert store.usage("k") == {"jobs": 1, "max_jobs": 3, "bytes": 300, "max_bytes": 1000}
    second = store.create("k", "gpt2", "f.py", b"x")
    store.finish(second, b"r" * 900, None)  # would pass the quota: replaced by an error saying so
    answer = wire.unpack(second.result, max_bytes=1 << 20)
    assert answer["error"]["type"] == "ResultTooLargeError" and "900 bytes" in answer["error"]["message"]
    assert second.error is not None and second.status == "error"
    store.create("k", "gpt2", "f.py", b"x")
    with pytest.raises(QuotaExceeded, match="already has 3 requests"):
        store.create("k", "gpt2", "f.py", b"x")
    store.discard(first)
    assert not first.result_path.exists() and store.usage("k")["jobs"] == 2
    first_time = other.created
    store.finish(other, b"", None)
    other.finished = first_time - 3600
    assert store.expire() == 1 and not other.result_path.exists()
    store.close()
    assert tmp_path.exists()  # a folder the operator named is left in place


def test_a_store_removes_its_own_spool_when_closed():
    store = JobStore(60, 10, 1000)
    job = store.create(None, "gpt2", "f.py", b"body")
    folder = job.spool
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct(job.request_path.stat().st_mode & 0o777) == "0o600"
    store.close()
    assert not folder.exists()


# -- the running server ---------------------------------------------------------------------------


def test_a_decompression_bomb_does_not_grow_the_api_process(guarded, plain_logits):
    before = rss(guarded.process.pid)
    bomb = torch.zeros(100_000_000)  # 400 MB inflated, ~0.4 MB on the wire
    request = make_request("n = bomb.shape[0]\nlogits = model.output.logits.save()\n", variables={"bomb": bomb})
    body = packed(request, level=9)
    assert len(body) < 1_000_000
    reply = post(guarded, body)
    assert reply.status == 202, reply.body[:300]
    outcome = follow(guarded, reply.json()["id"])
    assert torch.equal(outcome.values["logits"], plain_logits)
    refused = post(guarded, packed(make_request("import os\n", variables={"bomb": bomb}), level=9))
    assert refused.status == 400 and "sandbox" in refused.detail
    grown = rss(guarded.process.pid) - before
    assert grown < 100 * 1024**2, f"the API process grew by {grown / 2**20:.0f} MiB"
    delete_all(guarded, ALICE, [reply.json()["id"]])


def test_a_source_bomb_is_refused_and_the_api_stays_responsive(guarded):
    huge = "x = 1\n" * 1_300_000  # 7.8 MB of code in a request of a few KB
    body = packed(make_request(huge))
    assert len(body) < 100_000
    reply = post(guarded, body)
    assert reply.status == 413 and "--max-source-bytes" in reply.detail and "the trace body" in reply.detail

    # Under the size cap but slow to check: it runs in a checker process with a deadline,
    # and the event loop keeps answering meanwhile.
    nested = "y = " + "(" * 90 + "1" + ")" * 90 + "\n"
    slow = packed(make_request(nested * 2400))
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert call(guarded, "GET", "/v1/health", key=None).status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    watcher = threading.Thread(target=probe)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: post(guarded, slow), range(4)))
    finally:
        done.set()
        watcher.join()
    assert all(reply.status in (202, 400, 413, 503) for reply in replies), [r.status for r in replies]
    assert latencies and max(latencies) < 5.0, f"health took up to {max(latencies):.1f} s during the checks"
    delete_all(guarded, ALICE, [r.json()["id"] for r in replies if r.status == 202])


def test_two_hundred_floods_are_bounded_and_another_key_still_gets_right_answers(guarded, plain_logits):
    before = rss(guarded.process.pid)
    body = packed(make_request())
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: post(guarded, body, key=BOB), range(200)))
    statuses = [reply.status for reply in replies]
    assert set(statuses) <= {202, 429, 503}, set(statuses)
    assert statuses.count(202) <= QUOTA_JOBS and statuses.count(429) >= 100
    refusal = next(reply for reply in replies if reply.status == 429)
    assert "API key" in refusal.detail
    outcome = run(guarded, key="carol-key")
    assert torch.equal(outcome.values["logits"], plain_logits)
    accepted = [reply.json()["id"] for reply in replies if reply.status == 202]
    for job_id in accepted:
        follow(guarded, job_id, BOB)
    delete_all(guarded, BOB, accepted)
    assert call(guarded, "GET", "/v1/usage", key=BOB).json()["jobs"] == 0
    grown = rss(guarded.process.pid) - before
    assert grown < 100 * 1024**2, f"the API process grew by {grown / 2**20:.0f} MiB"


def test_results_live_on_disk_and_count_against_the_key(guarded, spool):
    reply = post(guarded, packed(make_request(BIG, modules=TORCH)), key=ALICE)
    job_id = reply.json()["id"]
    outcome = follow(guarded, job_id)
    assert torch.equal(outcome.values["big"], torch.arange(600 * 1024, dtype=torch.float32).sin())
    assert (spool / f"{job_id}.result").stat().st_size > 0
    usage = call(guarded, "GET", "/v1/usage", key=ALICE).json()
    assert usage["bytes"] >= (spool / f"{job_id}.result").stat().st_size and usage["max_bytes"] == QUOTA_BYTES
    # A second result this size would pass the 3 MiB quota: it comes back as an error saying so.
    second = post(guarded, packed(make_request(BIG.replace("sin", "cos"), modules=TORCH)), key=ALICE)
    answer = follow(guarded, second.json()["id"]).answer
    assert answer["error"]["type"] == "ResultTooLargeError" and "DELETE" in answer["error"]["message"]
    assert call(guarded, "DELETE", f"/v1/requests/{job_id}", key=BOB).status == 404
    assert call(guarded, "DELETE", f"/v1/requests/{job_id}", key=ALICE).json() == {"id": job_id, "deleted": True,
                                                                                   "cancelled": False}
    assert not (spool / f"{job_id}.result").exists()
    assert call(guarded, "GET", f"/v1/requests/{job_id}/result", key=ALICE).status == 404
    delete_all(guarded, ALICE, [second.json()["id"]])


def test_deleting_an_unfinished_request_cancels_it(guarded):
    reply = post(guarded, packed(make_request("for i in range(3):\n    time = torch.ones(400, 400) @ torch.ones(400, 400)\n"
                                              "h = model.transformer.h[0].output.save()\n", modules=TORCH)))
    job_id = reply.json()["id"]
    early = call(guarded, "DELETE", f"/v1/requests/{job_id}")
    assert early.status == 200 and early.json()["deleted"] is True  # cancelled, or forgotten if it finished first
    assert call(guarded, "GET", f"/v1/requests/{job_id}").status == 404
    assert call(guarded, "DELETE", f"/v1/requests/{job_id}").status == 404


def test_health_shows_counts_not_request_ids(guarded):
    reply = post(guarded, packed(make_request()))
    job_id = reply.json()["id"]
    text = call(guarded, "GET", "/v1/health", key=None).body.decode()
    assert job_id not in text
    health = call(guarded, "GET", "/v1/health", key=None).json()
    assert set(health["requests"]) >= {"queued", "running", "completed", "error"}
    assert all(set(worker) >= {"state", "busy"} and "running" not in worker
               for worker in health["models"]["gpt2"]["workers"])
    follow(guarded, job_id)
    delete_all(guarded, ALICE, [job_id])


def test_the_blocking_client_frees_its_result_on_the_server(guarded, gpt2_dir):
    from seethrough import LanguageModel

    model = LanguageModel(str(gpt2_dir), remote_name="gpt2")
    before = call(guarded, "GET", "/v1/usage", key="carol-key").json()["jobs"]
    with model.trace("The quick brown fox", remote=True, host=guarded.url, api_key="carol-key"):
        logits = model.output.logits.save()
    assert logits.shape[-1] == model.config.vocab_size
    assert call(guarded, "GET", "/v1/usage", key="carol-key").json()["jobs"] == before
