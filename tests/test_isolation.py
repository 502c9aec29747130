"""Workers walled off by the OS, and nothing of a request outliving it.

Three levels, all with real processes:

* :func:`seethrough.remote.server.isolation.isolate` run in a forked child of
  this test: a real ``connect`` to a port this test listens on fails, the
  secret this test put in the environment is gone, writes outside the private
  ``/tmp`` fail (checked from this side too), the uid is not root and cannot
  become root again, and the process limit stops a fork loop;
* :class:`seethrough.remote.server.forking.RequestForker` in a helper process
  that loads a tiny GPT-2: processes a request starts (even daemonised ones)
  are gone after it, a timeout and a crash cost only the request process, and
  state changes a body could make without the sandbox noticing (tokenizer
  lists, configs and their private keys, class attributes, module attributes,
  grad mode, the RNG) do not reach the next request, whose logits and
  tokenization equal a freshly loaded HuggingFace model's;
* real servers on loopback: the worker's namespaces, uid and environment seen
  from outside, the fork model's answers against a plain HuggingFace forward
  and greedy ``generate``, the time limit and a SIGKILL costing only the
  request process, and ``--isolation required`` against ``best-effort`` where
  a seccomp filter makes the OS refuse ``unshare``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from seethrough.remote.server import framing, isolation, testing
from seethrough.remote.server.forking import RequestForker
from fixtures.threads import single_thread

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker isolation needs Linux")]

ROOT = os.geteuid() == 0
SECRET = "sk-test-secret-do-not-leak-4242"
PROMPT = "The quick brown fox"


# -- helpers ---------------------------------------------------------------------------------------


def in_child(function: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Run ``function`` in a forked child of this process; return its JSON-able result."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(reader)
            # This test process may have run torch on several threads: OpenMP's pool does not
            # survive fork, so the child computes on one (as the server's model process does).
            torch.set_num_threads(1)
            result = {"ok": function()}
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            import traceback

            result = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
            status = 1
        try:
            os.write(writer, json.dumps(result, default=str).encode())
        finally:
            os._exit(status)
    os.close(writer)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([reader], [], [], 1.0)
            if ready:
                chunk = os.read(reader, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "no result"}')
    assert "error" not in result, result["error"]
    return result["ok"]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            stack += children
    return found


def _net(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def model_processes(server: testing.ServerProcess) -> list[int]:
    """The server's worker (model) processes: the first descendants in a network namespace of their own."""
    own, out = _net(os.getpid()), []
    for pid in descendants(server.process.pid):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if _net(pid) != own and _net(parent) == own:
                out.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


# -- the isolation function, in a child ------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="the full set of steps needs root here")
def test_an_isolated_process_has_no_network_no_secret_no_writable_files_and_no_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    outside = Path(tempfile.mkdtemp(prefix=".isolation-test-", dir=Path(__file__).parent))
    outside.chmod(0o777)  # writable by anyone: only the read-only mount can stop the write
    in_tmp = tmp_path / "written-by-the-worker.txt"

    def isolated() -> dict:
        report = isolation.isolate("required")
        out: dict[str, Any] = {"summary": report.summary(), "missing": report.missing}
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                out["connect"] = "connected"
        except OSError as error:
            out["connect"] = error.errno
        try:
            socket.getaddrinfo("example.com", 443)
            out["dns"] = "resolved"
        except OSError as error:
            out["dns"] = type(error).__name__
        out["environ"] = dict(os.environ)
        try:
            out["environ_block"] = Path("/proc/self/environ").read_bytes().decode("latin-1")
        except OSError as error:
            out["environ_block"] = f"unreadable: {error.errno}"
        writes = {}
        for path in (outside / "file.txt", in_tmp, Path("/etc/seethrough-test"), Path("/dev/shm/seethrough-test")):
            try:
                path.write_text("x")
                writes[str(path)] = "written"
            except OSError as error:
                writes[str(path)] = errno.errorcode.get(error.errno, str(error.errno))
        Path("/tmp/private.txt").write_text("private")
        writes["/tmp/private.txt"] = Path("/tmp/private.txt").read_text()
        out["writes"] = writes
        out["uid"], out["gid"], out["groups"] = os.getuid(), os.getgid(), os.getgroups()
        try:
            os.setuid(0)
            out["setuid0"] = "became root"
        except PermissionError:
            out["setuid0"] = "refused"
        out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)
        out["nproc"] = nproc
        forked, stopped = [], None
        for _ in range(nproc[0] + 10):  # a fork loop must hit the limit
            try:
                pid = os.fork()
            except OSError as error:
                stopped = errno.errorcode.get(error.errno)
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            forked.append(pid)
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        out["fork_loop"] = {"forked": len(forked), "stopped": stopped}
        out["network_is_isolated"] = isolation.network_is_isolated()
        return out

    try:
        got = in_child(isolated)
        assert not (outside / "file.txt").exists() and not in_tmp.exists()
        assert not Path("/tmp/private.txt").exists(), "the private /tmp leaked into the host's"
    finally:
        listener.close()
        for child in outside.iterdir():
            child.unlink()
        outside.rmdir()
    assert got["missing"] == {}, got["summary"]
    assert got["connect"] in (errno.ENETUNREACH, errno.EADDRNOTAVAIL), got["connect"]
    assert got["dns"] != "resolved" and got["network_is_isolated"]
    assert SECRET not in json.dumps(got["environ"]) and "SEETHROUGH_API_KEY" not in got["environ"]
    assert SECRET not in got["environ_block"]
    writes = got["writes"]
    assert writes[str(outside / "file.txt")] == "EROFS"
    assert writes[str(in_tmp)] == "ENOENT"  # the host's /tmp is not even visible
    assert writes["/etc/seethrough-test"] in ("EROFS", "EACCES") and writes["/dev/shm/seethrough-test"] == "EROFS"
    assert writes["/tmp/private.txt"] == "private"
    assert got["uid"] == got["gid"] >= isolation.UID_BASE and got["groups"] == [] and got["setuid0"] == "refused"
    assert got["nofile"][0] <= 4096 and got["nproc"][0] < 10_000
    assert got["fork_loop"]["stopped"] == "EAGAIN" and got["fork_loop"]["forked"] <= got["nproc"][0]


def test_best_effort_reports_and_off_does_nothing():
    def off() -> dict:
        report = isolation.isolate("off")
        return {"summary": report.summary(), "network": isolation.network_is_isolated()}

    got = in_child(off)
    assert "off" in got["summary"] and got["network"] is False
    with pytest.raises(ValueError, match="unknown isolation level"):
        isolation.isolate("sometimes")


# -- a process per request -----------------------------------------------------------------------------


def _forker(works: dict[str, Callable[[Any], None]], timeout: float = 30.0) -> RequestForker:
    """A forker whose request processes run ``works[payload]`` (the payload names the work)."""
    return RequestForker(lambda payload, connection: works[payload.decode()](connection), timeout=timeout,
                         memory_budget=1 << 30, max_message=1 << 26)


def _answer(connection: Any, **fields: Any) -> None:
    connection.send_bytes(framing.encode("answer", json.dumps(fields).encode()))


def test_nothing_a_request_starts_outlives_it():
    def scenario() -> dict:
        relayed: list[bytes] = []

        def leave_processes(connection: Any) -> None:
            plain = subprocess.Popen(["sleep", "300"])
            session = subprocess.Popen(["sleep", "300"], start_new_session=True)
            # A daemon: fork, setsid, fork again, the middle process exits.
            reader, writer = os.pipe()
            middle = os.fork()
            if middle == 0:
                os.setsid()
                daemon = os.fork()
                if daemon == 0:
                    time.sleep(300)
                    os._exit(0)
                os.write(writer, str(daemon).encode())
                os._exit(0)
            os.waitpid(middle, 0)
            daemon_pid = int(os.read(reader, 64))
            _answer(connection, pids=[plain.pid, session.pid, daemon_pid], me=os.getpid())

        forker = _forker({"leave": leave_processes, "fine": lambda connection: _answer(connection, fine=True)})
        outcome = forker.run(b"leave", relayed.append)
        leftovers = forker.finish()
        pids = json.loads(framing.decode(relayed[-1]).payload)["pids"]
        after = {"kind": outcome.kind, "leftovers": leftovers, "alive": [alive(pid) for pid in pids],
                 "request_alive": alive(outcome.pid)}
        try:
            os.waitpid(outcome.pid, os.WNOHANG)
            after["reaped"] = False
        except ChildProcessError:
            after["reaped"] = True
        # The next request runs normally, and leaves nothing either.
        second = forker.run(b"fine", relayed.append)
        after["second"] = (second.kind, forker.finish())
        return after

    got = in_child(scenario)
    assert got["kind"] == "answered" and got["leftovers"] == 3, got
    assert got["alive"] == [False, False, False] and not got["request_alive"] and got["reaped"]
    assert got["second"] == ["answered", 0]


def test_a_timeout_or_a_crash_costs_only_the_request_process():
    def scenario() -> dict:
        relayed: list[bytes] = []

        def endless(connection: Any) -> None:
            connection.send_bytes(framing.encode("log", text="started"))
            subprocess.Popen(["sleep", "300"], start_new_session=True)
            while True:
                time.sleep(0.01)

        def crash(connection: Any) -> None:
            connection.send_bytes(framing.encode("log", text="about to die"))
            os.kill(os.getpid(), signal.SIGKILL)

        def half_a_message(connection: Any) -> None:
            os.write(connection.fileno(), b"\x00\x10\x00\x00partial")  # a length prefix and too few bytes
            os._exit(0)

        forker = _forker({"timeout": endless, "crash": crash, "partial": half_a_message,
                          "fine": lambda connection: _answer(connection, fine=True)}, timeout=1.0)
        out = {}
        for name in ("timeout", "crash", "partial"):
            outcome = forker.run(name.encode(), relayed.append)
            out[name] = [outcome.kind, outcome.how, forker.finish(), alive(outcome.pid)]
        waiting = forker._ready[0]
        os.kill(waiting, signal.SIGKILL)  # the process waiting for the next request dies: another is forked
        while Path(f"/proc/{waiting}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        out["after"] = forker.run(b"fine", relayed.append).kind
        out["logs"] = [framing.decode(data).fields.get("text") for data in relayed
                       if framing.decode(data).type == "log"]
        return out

    got = in_child(scenario)
    assert got["timeout"][0] == "timeout" and got["timeout"][2] == 1 and not got["timeout"][3]
    assert got["crash"][0] == "crashed" and "SIGKILL" in got["crash"][1] and not got["crash"][3]
    assert got["partial"][0] == "crashed"
    assert got["after"] == "answered" and got["logs"] == ["started", "about to die"]


MUTATIONS = {
    "tokenizer list": "tokenizer.model_input_names.append('token_type_ids')",
    "tokenizer padding side": "tokenizer.padding_side = 'right' if tokenizer.padding_side == 'left' else 'left'",
    "tokenizer added token": "tokenizer.add_tokens(['zzqx'])",
    "config private key": "module.config._attn_implementation = 'no-such-attention'",
    "config update": "module.config.update({'n_layer': 1, 'layer_norm_epsilon': 0.5})",
    "generation config": "module.generation_config.update(max_length=3)",
    "module attribute": "module.transformer.h[0].attn.scale_attn_weights = False",
    "module list": "module.transformer.h.pop(0)",
    "class attribute": "torch.nn.Parameter.grad = property(lambda self: None)",
    "library class attribute": "type(module.transformer.h[0].attn).forward = lambda self, *a, **k: (a[0], None)",
    "grad mode": "torch.set_grad_enabled(False)",
    "rng": "torch.manual_seed(1234)",
    "dtype": "module.half()",
}


def test_state_a_request_changes_dies_with_its_process(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fresh = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    fresh_tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokens = fresh_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected_logits = fresh(**tokens).logits
    expected = {"keys": sorted(tokens), "ids": tokens["input_ids"].tolist(), "logits": expected_logits.flatten().tolist(),
                "draw": None}

    def scenario() -> dict:
        import seethrough

        torch.manual_seed(0)
        served = seethrough.LanguageModel(str(gpt2_dir), dispatch=True)
        module, tokenizer = served._model, served.tokenizer
        results: dict[str, Any] = {}

        def probe(connection: Any) -> None:
            encoded = tokenizer(PROMPT, return_tensors="pt")
            with torch.no_grad():
                logits = module(**encoded).logits
            grad_ok = torch.is_grad_enabled()
            weight = module.lm_head.weight
            _answer(connection, keys=sorted(encoded), ids=encoded["input_ids"].tolist(),
                    logits=logits.flatten().tolist(), grad_mode=grad_ok, draw=torch.rand(3).tolist(),
                    grad_attr=str(type(torch.nn.Parameter.__dict__.get("grad"))), dtype=str(weight.dtype))

        def mutate(statement: str, connection: Any) -> None:
            try:
                exec(statement, {"torch": torch, "module": module, "tokenizer": tokenizer})
            except Exception as error:  # noqa: BLE001 - a refused change is fine too
                _answer(connection, refused=str(error))
            else:
                _answer(connection, done=True)

        works = {name: (lambda connection, statement=statement: mutate(statement, connection))
                 for name, statement in MUTATIONS.items()}
        forker = _forker({**works, "probe": probe})
        for name in MUTATIONS:
            relayed: list[bytes] = []
            first = forker.run(name.encode(), relayed.append)
            after = forker.run(b"probe", relayed.append)
            results[name] = {"mutated": first.kind, "probe": after.kind,
                             **json.loads(framing.decode(relayed[-1]).payload)}
        return results

    got = in_child(scenario)
    draws = {json.dumps(result["draw"]) for result in got.values()}
    assert len(draws) == 1, "a request's RNG use reached the next request"
    for name, result in got.items():
        assert result["mutated"] == "answered" and result["probe"] == "answered", name
        assert result["keys"] == expected["keys"] and result["ids"] == expected["ids"], name
        assert result["logits"] == expected["logits"], f"{name}: the next request's logits differ from a fresh model's"
        assert result["grad_mode"] is True and result["dtype"] == "torch.float32", name
        assert result["grad_attr"] == "<class 'NoneType'>", name


# -- real servers ----------------------------------------------------------------------------------------


SERVER_ARGS = ["--threads", "1", "--timeout", "6", "--memory-limit", "1G", "--start-method", "forkserver"]


@pytest.fixture(scope="module")
def isolated_server(gpt2_dir):
    server = testing.ServerProcess({"gpt2": str(gpt2_dir)}, api_keys=["alice"], args=SERVER_ARGS,
                                   env={"SEETHROUGH_API_KEY": SECRET, "HF_TOKEN": SECRET})
    with server:
        yield server


def _remote(gpt2_dir):
    import seethrough

    remote = seethrough.LanguageModel(str(gpt2_dir))
    object.__setattr__(remote, "_remote_name", "gpt2")
    return remote


def test_the_server_says_what_is_isolated(isolated_server):
    log = isolated_server.log()
    line = next(text for text in log.splitlines() if "worker isolation" in text)
    assert "(best-effort)" in line
    if ROOT:
        assert "NOT isolated" not in line and "network" in line and "file system" in line and "user" in line


@pytest.mark.skipif(not ROOT, reason="reading another process's namespaces and environment needs root")
def test_the_served_worker_is_walled_off(isolated_server):
    workers = model_processes(isolated_server)
    assert len(workers) == 1, workers
    pid = workers[0]
    for namespace in ("net", "mnt"):
        assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}"), namespace
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert all(int(uid) >= isolation.UID_BASE for uid in uids), uids
    assert "CapEff:\t0000000000000000" in status
    assert SECRET.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    api_environ = Path(f"/proc/{isolated_server.process.pid}/environ").read_bytes()
    assert SECRET.encode() in api_environ  # the test did hand it to the server


def test_forked_requests_equal_a_plain_forward_and_generate(isolated_server, gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fresh = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokens = AutoTokenizer.from_pretrained(gpt2_dir)(PROMPT, return_tensors="pt")
    with single_thread():  # as the server's workers: bitwise-equal values
        with torch.no_grad():
            logits = fresh(**tokens).logits
            generated = fresh.generate(**tokens, max_new_tokens=5, do_sample=False, pad_token_id=0)
    remote = _remote(gpt2_dir)
    options = {"remote": True, "host": isolated_server.url, "api_key": "alice"}
    for _ in range(3):  # each in a fresh request process, each the same
        with remote.trace(PROMPT, **options):
            out = remote.output.logits.save()
        assert torch.equal(out, logits)
    with remote.generate(PROMPT, max_new_tokens=5, do_sample=False, **options) as tracer:
        pass
    assert torch.equal(tracer.result, generated)


def test_a_timeout_or_a_kill_costs_the_request_process_only(isolated_server, gpt2_dir):
    from seethrough.errors import SeethroughError

    remote = _remote(gpt2_dir)
    options = {"remote": True, "host": isolated_server.url, "api_key": "alice"}
    before = model_processes(isolated_server)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="request process was killed"):
        with remote.trace(PROMPT, **options):
            while True:
                pass
    assert time.monotonic() - started < 6 + 25
    assert model_processes(isolated_server) == before, "the worker should live on after a timeout"
    with remote.trace(PROMPT, blocking=False, **options) as tracer:
        print("started")
        while True:
            pass
    job = tracer.job
    deadline = time.monotonic() + 30
    victims: list[int] = []
    while time.monotonic() < deadline and not victims:
        if job.status() == "running":
            victims = [pid for worker in before for pid in descendants(worker)] if ROOT else []
        time.sleep(0.05)
    if victims:
        # The worker's children: the process running the body, and maybe the next one
        # forked ahead of time; kill them all (one may have ended in the meantime).
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with pytest.raises(SeethroughError, match="SIGKILL"):
            job.result()
    else:
        with pytest.raises(TimeoutError):
            job.result()
    assert model_processes(isolated_server) == before
    with remote.trace(PROMPT, **options):
        out = remote.output.logits.save()
    assert out.isfinite().all()


# -- --isolation required vs best-effort, where the OS refuses ------------------------------------------

_NO_UNSHARE = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
# seccomp: unshare(2) fails with EPERM; everything else is allowed.
program = b"".join(struct.pack("HBBI", *f) for f in (
    (0x20, 0, 0, 0),               # A = syscall number
    (0x15, 0, 1, 272),             # if A == __NR_unshare (x86_64)
    (0x06, 0, 0, 0x00050000 | 1),  #   return ERRNO(EPERM)
    (0x06, 0, 0, 0x7FFF0000),      # return ALLOW
))
buffer = ctypes.create_string_buffer(program)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(4, ctypes.addressof(buffer))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
os.execv(sys.argv[1], sys.argv[1:])
"""


class NoUnshareServer(testing.ServerProcess):
    """A server whose processes cannot call unshare(2) (a seccomp filter, inherited by its workers)."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", _NO_UNSHARE, *super().command()]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter names the x86_64 syscall number")
def test_required_refuses_to_start_where_the_os_refuses_and_best_effort_says_what_is_missing(gpt2_dir):
    required = NoUnshareServer({"gpt2": str(gpt2_dir)}, args=SERVER_ARGS + ["--isolation", "required"],
                               startup_timeout=120)
    with pytest.raises(RuntimeError) as failure:
        required.start()
    text = str(failure.value)
    assert "exited with status 1" in text and "--isolation required" in text and "network" in text, text
    best_effort = NoUnshareServer({"gpt2": str(gpt2_dir)}, args=SERVER_ARGS + ["--isolation", "best-effort"],
                                  startup_timeout=120)
    with best_effort:
        line = next(text for text in best_effort.log().splitlines() if "worker isolation" in text)
        assert "NOT isolated: network" in line and "file system" in line.split("NOT isolated")[1], line
        assert "environment" in line.split("NOT isolated")[0], line
        # It serves anyway, in the fork model.
        remote = _remote(gpt2_dir)
        with remote.trace(PROMPT, remote=True, host=best_effort.url):
            out = remote.output.logits.save()
        assert out.isfinite().all()


# -- where fork is impossible: the state fingerprint -----------------------------------------------------


def test_a_tokenizer_saved_with_padding_on_is_not_a_change_once_plain_use_turns_it_off(smollm2_small_dir, tmp_path):
    """A tokenizer sets its fast backend's padding and truncation from the
    arguments of every call: a folder whose tokenizer was saved right after a
    padded call loads with them on, and the first plain request turns them
    off.  That is no change to any later call (the server must not discard
    the request and reload); a real change to the backend still is."""
    import shutil

    from transformers import AutoTokenizer

    import seethrough
    from seethrough.remote.server.fingerprint import StateFingerprint
    from seethrough.remote.server.worker import _warm_up

    folder = tmp_path / "saved-padded"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (smollm2_small_dir / name).exists():
            shutil.copy(smollm2_small_dir / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_small_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer(["a", "a longer prompt"], padding="max_length", max_length=8, truncation=True)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "tokenizer.json").read_text())
    assert saved["padding"] is not None and saved["truncation"] is not None  # the case at hand

    served = seethrough.LanguageModel(str(folder), dispatch=True)
    _warm_up(served)
    fingerprint = StateFingerprint(served._model, served.tokenizer)
    with served.trace(PROMPT):
        served.output.save()
    backend = served.tokenizer.backend_tokenizer
    assert backend.padding != saved["padding"] or backend.truncation != saved["truncation"]  # plain use changed them
    assert fingerprint.changes() == []
    served.tokenizer.add_tokens(["zzqx"])
    assert "tokenizer backend" in fingerprint.changes()


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_the_state_fingerprint_sees_every_mutation_and_nothing_else(which, gpt2_dir, smollm2_small_dir):
    folder = str(gpt2_dir if which == "gpt2" else smollm2_small_dir)

    def scenario() -> dict:
        import seethrough
        from seethrough.remote.server.fingerprint import StateFingerprint
        from seethrough.remote.server.worker import _warm_up

        served = seethrough.LanguageModel(folder, dispatch=True)
        module, tokenizer = served._model, served.tokenizer
        _warm_up(served)
        fingerprint = StateFingerprint(module, tokenizer)
        # Plain use (a traced forward, a generation) changes nothing it looks at.
        with served.trace(PROMPT):
            served.output.save()
        with served.generate(PROMPT, max_new_tokens=3, do_sample=False):
            pass
        out: dict[str, Any] = {"plain use": fingerprint.changes()}

        def mutate(statement: str, connection: Any) -> None:
            try:
                exec(statement, {"torch": torch, "module": module, "tokenizer": tokenizer})
            except Exception as error:  # noqa: BLE001
                _answer(connection, changes=None, refused=str(error))
                return
            _answer(connection, changes=fingerprint.changes())

        statements = {}
        for name, statement in MUTATIONS.items():
            if which != "gpt2" and "transformer" in statement:
                statement = (statement.replace("transformer.h", "model.layers")
                             .replace(".attn.scale_attn_weights", ".self_attn.is_causal")
                             .replace("[0].attn", "[0].self_attn"))
            statements[name] = statement
        forker = _forker({name: (lambda connection, statement=statement: mutate(statement, connection))
                          for name, statement in statements.items()})
        for name in MUTATIONS:
            relayed: list[bytes] = []
            forker.run(name.encode(), relayed.append)
            out[name] = json.loads(framing.decode(relayed[-1]).payload)["changes"]
        return out

    got = in_child(scenario)
    assert got.pop("plain use") == []
    got.pop("rng")  # the RNG is restored around each request by the sandbox, not fingerprinted
    got.pop("dtype")  # parameters: the guard's business (ModelGuard)
    got.pop("module list")  # the module tree: the guard's business
    for name, changes in got.items():
        assert changes, f"the fingerprint missed: {name}"
