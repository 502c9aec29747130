"""``seethrough serve --ray``: workers as Ray actors on a real two-node Ray cluster on loopback.

The cluster is Ray's own test utility (:class:`ray.cluster_utils.Cluster`):
a head node and a second node, each a real raylet with 2 CPUs on this machine,
started and stopped by this module (Ray replaces 127.0.0.1 by the machine's own
address, so the nodes register with that; nothing leaves the machine).  A real seethrough server (a subprocess,
``--ray HEAD_ADDRESS --workers-per-model 2``) places a random 2-layer GPT-2's
workers on it.  Values are compared with the same body run locally (torch
with one thread on both sides, so bitwise equal); faults are real: the actor
process is SIGKILLed, a node is removed from the cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from ray.cluster_utils import Cluster

import seethrough
from fixtures.network import load_is_all_correct
from seethrough.remote.client.connection import RemoteClient
from seethrough.remote.server import testing
from seethrough.remote.server.ray_backend import device_map_for
from seethrough.remote.server.settings import SettingsError, parse_args
from seethrough.remote.server.worker import WorkerOptions, load_kwargs
from test_remote import assert_same, generate_body, session_body, trace_body
from test_server import ALICE, BOB, call, follow, make_request, packed, post, run
from fixtures.threads import one_thread  # noqa: F401 - autouse: the server's one torch thread

pytestmark = [pytest.mark.timeout(600)]

TIMEOUT_S = 10
# Ray notices a lost node after health checks fail: make that take seconds, not half a minute.
_FAST_FAILURE = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
_NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024**2, "include_dashboard": False}



# -- without a cluster -------------------------------------------------------------------------


def test_ray_options_parse_and_refuse_misuse():
    settings = parse_args(["--ray", "auto", "--workers-per-model", "3", "--cpus-per-worker", "2",
                           "--gpus-per-worker", "4"])
    assert (settings.ray, settings.workers_per_model, settings.cpus_per_worker, settings.gpus_per_worker) == (
        "auto", 3, 2.0, 4.0)
    assert parse_args(["--ray", "10.0.0.5:6379"]).ray == "10.0.0.5:6379"
    assert parse_args([]).ray is None
    with pytest.raises(SettingsError, match="--gpus-per-worker is a Ray resource request: use it with --ray"):
        parse_args(["--gpus-per-worker", "1"])
    with pytest.raises(SettingsError, match="--ray 'somewhere'.*HOST:PORT"):
        parse_args(["--ray", "somewhere"])
    with pytest.raises(SettingsError, match="--cpus-per-worker must be positive"):
        parse_args(["--ray", "local", "--cpus-per-worker", "0"])
    with pytest.raises(SettingsError, match="whole number"):
        parse_args(["--ray", "local", "--gpus-per-worker", "1.5"])


def test_gpus_per_worker_decide_how_the_worker_loads(gpt2_dir):
    """G > 1: the model is spread with device_map="auto" over the GPUs Ray assigned (CUDA_VISIBLE_DEVICES);
    one GPU or a share of one: loaded on it; none: CPU.  The kwargs reach the worker's real load path
    (here on CPU, where "auto" has only the CPU to fill: the weights must equal a plain HF load)."""
    from transformers import AutoModelForCausalLM

    from seethrough.remote.server.worker import _load

    assert [device_map_for(g) for g in (0, 0.25, 1, 2, 8)] == [None, "cuda", "cuda", "auto", "auto"]
    base = WorkerOptions(name="gpt2", source=str(gpt2_dir), memory_limit=None, read_only_weights=False,
                         max_request_bytes=1 << 20, max_unpacked_bytes=1 << 20, max_result_bytes=1 << 20,
                         max_log_lines=10, max_log_bytes=1 << 10)
    assert load_kwargs(base) == {}
    spread = WorkerOptions(**{**base.__dict__, "device_map": "auto"})
    assert load_kwargs(spread) == {"device_map": "auto"}
    model, _, info = _load(spread)
    plain = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert info["parameters"] == sum(p.numel() for p in plain.parameters())
    for (name, mine), (_, theirs) in zip(model._model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_a_plain_server_never_imports_ray(gpt2_dir):
    """Ray is an optional extra: importing seethrough and running a server without --ray leaves it unloaded."""
    script = textwrap.dedent(f"""
        import sys
        import seethrough
        from seethrough.remote.server.app import create_app
        from seethrough.remote.server.service import ServerRuntime
        from seethrough.remote.server.settings import parse_args
        runtime = ServerRuntime(parse_args(["--model", "gpt2={gpt2_dir}", "--threads", "1"]))
        runtime.start()
        create_app(runtime)
        health = runtime.health()
        runtime.stop()
        assert health["gpt2"]["state"] == "idle", health
        loaded = sorted(name for name in sys.modules if name == "ray" or name.startswith("ray."))
        print("RAY MODULES:", loaded)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RAY MODULES: []" in done.stdout, done.stdout


# -- a two-node cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, 2 CPUs each, on this machine."""
    nodes = Cluster(initialize_head=True, head_node_args={**_NODE, "_system_config": _FAST_FAILURE})
    second = nodes.add_node(**_NODE)
    nodes.wait_for_nodes()
    yield nodes, second
    nodes.shutdown()


@pytest.fixture(scope="module")
def server(cluster, gpt2_dir):
    nodes, _ = cluster
    process = testing.ServerProcess(
        {"gpt2": str(gpt2_dir)}, api_keys=[ALICE, BOB],
        args=["--ray", nodes.head_node.address, "--workers-per-model", "2", "--cpus-per-worker", "1", "--threads", "1",
              "--timeout", str(TIMEOUT_S), "--memory-limit", "1G", "--startup-timeout", "240"],
        startup_timeout=180,
    )
    with process:
        yield process


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> seethrough.LanguageModel:
    return seethrough.LanguageModel(str(gpt2_dir))


def workers(server) -> list[dict]:
    return server.health()["models"]["gpt2"]["workers"]


def on(server) -> dict:
    return {"remote": True, "host": server.url, "api_key": ALICE}


def wait_for_idle_workers(server, count: int = 2, timeout: float = 180.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = workers(server)
        if sum(w["state"] == "idle" for w in current) == count:
            return current
        time.sleep(0.5)
    raise AssertionError(f"workers not back within {timeout:.0f} s: {workers(server)}\n{server.log()[-4000:]}")


@pytest.mark.slow
def test_two_workers_land_on_both_nodes(server, cluster):
    nodes, second = cluster
    current = workers(server)
    assert len(current) == 2 and all(w["state"] == "idle" for w in current)
    assert {w["node"] for w in current} == {nodes.head_node.node_id, second.node_id}
    assert all(w["pid"] > 0 and w["actor_pid"] > 0 and w["node_ip"] == nodes.head_node.node_ip_address
               for w in current), current


@pytest.mark.slow
def test_trace_generate_session_match_local(server, gpt2):
    local, remote = trace_body(gpt2, {}), trace_body(gpt2, on(server))
    for name, a, b in zip(("first", "last", "shapes"), (local[0], *local[2:]), (remote[0], *remote[2:])):
        assert_same(a, b, name)
    assert_same(local[1].logits, remote[1].logits, "out.logits")
    for body in (generate_body, session_body):
        assert_same(body(gpt2, {}), body(gpt2, on(server)), body.__name__)


@pytest.mark.slow
def test_results_only_for_the_submitting_key(server):
    reply = post(server, packed(make_request()), key=ALICE)
    job_id = reply.json()["id"]
    assert follow(server, job_id, ALICE).error is None
    for suffix in ("", "/events", "/result"):
        foreign = call(server, "GET", f"/v1/requests/{job_id}{suffix}", key=BOB)
        assert foreign.status == 404 and "no request with id" in foreign.detail, suffix


@pytest.mark.slow
def test_an_endless_request_times_out_and_the_next_is_served(server, gpt2):
    before = {w["actor_pid"] for w in wait_for_idle_workers(server)}
    outcome = run(server, "while True:\n    pass\n")
    assert outcome.error["type"] == "TimeoutError" and f"limit of {TIMEOUT_S} s" in outcome.error["message"]
    after = wait_for_idle_workers(server)
    # the worker stops the request (its request process, or the actor, which is then replaced): never both
    assert len(before - {w["actor_pid"] for w in after}) <= 1
    assert_same(trace_body(gpt2, {})[0], trace_body(gpt2, on(server))[0], "after the timeout")


@pytest.mark.slow
def test_an_actor_killed_mid_request_fails_that_request_only(server, gpt2):
    wait_for_idle_workers(server)
    reply = post(server, packed(make_request("print('started')\nwhile True:\n    pass\n")))
    job_id = reply.json()["id"]
    events = []
    for name, data in RemoteClient(server.url, ALICE).events(job_id, timeout=120):
        events.append((name, data))
        if name == "log" and data["text"] == "started":
            busy = [w for w in workers(server) if w["busy"]]
            assert len(busy) == 1
            os.kill(busy[0]["actor_pid"], signal.SIGKILL)  # the Ray actor process, not only its worker
    kind, error = events[-1]
    assert kind == "error" and error["type"] == "WorkerCrashedError", events[-3:]
    assert "Ray actor" in error["message"] and "next request" in error["message"]
    assert_same(trace_body(gpt2, {})[0], trace_body(gpt2, on(server))[0], "the next request")
    wait_for_idle_workers(server)


@pytest.mark.slow
def test_8_clients_25_requests_each_over_two_workers(server, gpt2_dir):
    local = seethrough.LanguageModel(str(gpt2_dir))
    remote = seethrough.LanguageModel(str(gpt2_dir))
    prompts = [[f"client {c} request {r}: " + "word " * (r % 7) for r in range(25)] for c in range(8)]
    expected = {}
    for prompt in (p for row in prompts for p in row):
        with local.trace(prompt):
            expected[prompt] = local.transformer.h[1].output.save()
    load_is_all_correct(remote, server.url, (BOB, ALICE), expected, prompts, timeout=400)


@pytest.mark.slow
def test_a_node_leaving_mid_load_loses_no_request(server, cluster, gpt2):
    """Requests keep coming while the second node is removed: each completes with the right value or fails
    with a clear error; the lost worker comes back on the head node; the server keeps serving."""
    nodes, second = cluster
    wait_for_idle_workers(server)
    expected = trace_body(gpt2, {})[0]
    outcomes: list[tuple[str, object]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                outcomes.append(("ok", trace_body(gpt2, on(server))[0]))
            except seethrough.SeethroughError as error:
                outcomes.append(("error", error))
            except Exception as error:  # noqa: BLE001 - anything else is a failure the test reports
                outcomes.append(("unexpected", error))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(3)
    nodes.remove_node(second, allow_graceful=False)
    time.sleep(3)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in clients), "a client hung on a lost actor"
    assert outcomes and not [o for o in outcomes if o[0] == "unexpected"], outcomes
    for kind, value in outcomes:
        if kind == "ok":
            assert torch.equal(value, expected)
        else:
            assert "WorkerCrashedError" in type(value).__name__ + str(value) and "Ray actor" in str(value), value
    back = wait_for_idle_workers(server)
    assert {w["node"] for w in back} == {nodes.head_node.node_id}
    assert_same(expected, trace_body(gpt2, on(server))[0], "after the node left")
    health = server.health()
    assert health["status"] == "ok" and sum(w["restarts"] for w in back) >= 1


def test_an_unreachable_head_stops_the_command_with_a_clear_error(gpt2_dir):
    port = testing.free_port()
    done = subprocess.run([sys.executable, "-m", "seethrough.remote.server", "--model", f"gpt2={gpt2_dir}",
                           "--ray", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot reach the Ray head at 127.0.0.1:{port}" in done.stderr and "ray start --head" in done.stderr


@pytest.mark.parametrize("recorded", [None, "stale"])
def test_ray_auto_without_a_running_cluster_stops_with_one_clear_line(gpt2_dir, tmp_path, recorded):
    """`--ray auto` with no cluster on the machine, or with the record of one
    that has stopped (Ray alone: a long traceback, or minutes of waiting)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)  # where Ray looks for the cluster `ray start` recorded
    if recorded == "stale":
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{testing.free_port()}")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "seethrough.remote.server", "--model", f"gpt2={gpt2_dir}",
                           "--ray", "auto"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line]  # beside the no-keys warning
    assert len(lines) == 1, done.stderr
    assert ("no Ray cluster runs on this machine" if recorded is None else "does not answer") in lines[0]
    assert "ray start --head" in lines[0]
    assert time.monotonic() - started < 60  # not Ray's minutes of retries
