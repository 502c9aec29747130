"""The seethrough server over real HTTP: auth, malformed input, sandbox escapes, limits, load.

A real server (``python -m seethrough.remote.server``) runs on a loopback port
for the whole session (:func:`seethrough.remote.server.testing.shared_server`;
``tests/test_remote.py`` shares it), serving a random 2-layer GPT-2 and
SmolLM2 cut to 4 layers.  Requests are built here with the protocol's own
``Request`` and wire format (or crafted byte by byte for the malformed ones)
and sent with ``http.client``; results are compared with the plain
HuggingFace forward of the same folder in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from fixtures.network import load_is_all_correct
from seethrough.remote import wire
from seethrough.remote.client.connection import CONTENT_TYPE, RemoteClient
from seethrough.remote.protocol import Request
from seethrough.remote.server import testing
from seethrough.remote.server.jobs import JobStore
from seethrough.remote.server.scheduler import FairQueue, QueueFull
from seethrough.remote.server.settings import SettingsError, load_api_keys, parse_args, parse_size
from fixtures.threads import single_thread

pytestmark = [pytest.mark.timeout(300)]

ALICE, BOB = "alice-key-1234", "bob-key-5678"
TIMEOUT_S = 8
SERVER_ARGS = [
    "--threads", "1", "--timeout", str(TIMEOUT_S), "--memory-limit", "1G", "--max-request-bytes", "4M",
    "--max-unpacked-bytes", "32M", "--max-log-lines", "200", "--spare-workers", "1", "--job-ttl", "600",
    "--start-method", "forkserver",
]
PROMPT = "The quick brown fox"
CHECK_SOURCE = "h0 = model.transformer.h[0].output.save()\nlogits = model.output.logits.save()\n"


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server(gpt2_dir, smollm2_small_dir) -> testing.ServerProcess:
    return testing.shared_server({"gpt2": str(gpt2_dir), "smollm2": str(smollm2_small_dir)},
                                 api_keys=[ALICE, BOB], args=SERVER_ARGS)


@pytest.fixture(scope="session")
def reference(gpt2_dir) -> dict[str, torch.Tensor]:
    """The plain HuggingFace forward of the served GPT-2 on PROMPT (no seethrough)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokens = AutoTokenizer.from_pretrained(gpt2_dir)(PROMPT, return_tensors="pt")
    seen: dict[str, torch.Tensor] = {}
    handle = model.transformer.h[0].register_forward_hook(lambda m, a, o: seen.setdefault("h0", o))
    try:
        with single_thread(), torch.no_grad():  # the server's workers run with --threads 1
            seen["logits"] = model(**tokens).logits
    finally:
        handle.remove()
    return seen


# -- HTTP helpers ----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def detail(self) -> str:
        return str(self.json().get("detail"))


def call(server: testing.ServerProcess, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None, key: str | None = ALICE) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        sent = dict(headers or {})
        if key is not None:
            sent["X-API-Key"] = key
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def post(server, body: bytes, key: str | None = ALICE, content_type: str | None = CONTENT_TYPE) -> Reply:
    headers = {"Content-Type": content_type} if content_type else {}
    return call(server, "POST", "/v1/requests", body, headers, key)


def make_request(source: str = CHECK_SOURCE, *, model: str = "gpt2", args: list | None = None, **fields: Any) -> Request:
    fields.setdefault("envoys", {"model": ""})
    return Request(model=model, kind=fields.pop("kind", "trace"), source=source, filename=fields.pop("filename", "body.py"),
                   first_line=fields.pop("first_line", 1), client_version="0.1.0",
                   args=[PROMPT] if args is None else args, **fields)


def packed(request: Request | dict, level: int = 1) -> bytes:
    value = request.to_wire() if isinstance(request, Request) else request
    return wire.pack(value, max_bytes=1 << 26, level=level)


@dataclass
class Outcome:
    events: list[tuple[str, dict]]
    answer: dict

    @property
    def error(self) -> dict | None:
        return self.answer.get("error")

    @property
    def values(self) -> dict:
        assert self.error is None, f"the request failed: {self.error}"
        return self.answer["values"]

    @property
    def logs(self) -> list[str]:
        return [data["text"] for name, data in self.events if name == "log"]


def follow(server, job_id: str, key: str = ALICE) -> Outcome:
    client = RemoteClient(server.url, key)
    events = list(client.events(job_id, timeout=120))
    return Outcome(events, wire.unpack(client.result_bytes(job_id), max_bytes=1 << 30))


def run(server, request: Request | dict | str = CHECK_SOURCE, key: str = ALICE, **fields: Any) -> Outcome:
    if isinstance(request, str):
        request = make_request(request, **fields)
    reply = post(server, packed(request), key)
    assert reply.status == 202, (reply.status, reply.body[:500])
    return follow(server, reply.json()["id"], key)


def assert_intact(server, reference) -> None:
    """The served GPT-2 still computes exactly what the reference forward does."""
    values = run(server).values
    assert torch.equal(values["h0"], reference["h0"])
    assert torch.equal(values["logits"], reference["logits"])


def gpt2_workers(server) -> list[dict]:
    return server.health()["models"]["gpt2"]["workers"]


# -- basics and auth -----------------------------------------------------------------------------


def test_health_is_open_and_describes_the_workers(server):
    reply = call(server, "GET", "/v1/health", key=None)
    assert reply.status == 200
    health = reply.json()
    assert health["status"] == "ok" and health["version"] == "0.1.0" and health["protocol"] == 1
    assert set(health["models"]) == {"gpt2", "smollm2"}
    worker = health["models"]["gpt2"]["workers"][0]
    assert worker["pid"] > 0 and worker["state"] in ("idle", "busy")
    assert health["models"]["gpt2"]["read_only_weights"] is True


def test_a_good_request_matches_the_plain_forward(server, reference):
    outcome = run(server)
    names = [name for name, _ in outcome.events]
    assert names[0] == "status" and outcome.events[0][1]["status"] == "queued"
    assert ("status", {"status": "running"}) in outcome.events and names[-1] == "completed"
    assert torch.equal(outcome.values["h0"], reference["h0"])
    assert torch.equal(outcome.values["logits"], reference["logits"])


def test_missing_key_is_401_on_every_private_endpoint(server):
    for method, path in (("POST", "/v1/requests"), ("GET", "/v1/models"), ("GET", "/v1/requests/abc"),
                         ("GET", "/v1/requests/abc/events"), ("GET", "/v1/requests/abc/result"),
                         ("GET", "/v1/models/gpt2/tokenizer")):
        reply = call(server, method, path, b"" if method == "POST" else None, key=None)
        assert reply.status == 401, (method, path, reply.status)
        assert "X-API-Key" in reply.detail


def test_unknown_key_is_403(server):
    reply = post(server, packed(make_request()), key="mallory")
    assert reply.status == 403
    assert "not accepted" in reply.detail
    assert call(server, "GET", "/v1/models", key="mallory").status == 403


def test_another_key_cannot_read_your_request(server):
    reply = post(server, packed(make_request()), key=ALICE)
    job_id = reply.json()["id"]
    follow(server, job_id, ALICE)
    for suffix in ("", "/events", "/result"):
        foreign = call(server, "GET", f"/v1/requests/{job_id}{suffix}", key=BOB)
        assert foreign.status == 404, suffix  # as an id that does not exist: nothing says it does
        assert "no request with id" in foreign.detail
        assert call(server, "GET", f"/v1/requests/{job_id}{suffix}", key=ALICE).status == 200


def test_status_of_a_finished_request(server):
    job_id = post(server, packed(make_request())).json()["id"]
    follow(server, job_id)
    status = call(server, "GET", f"/v1/requests/{job_id}").json()
    assert status["id"] == job_id and status["status"] == "completed" and status["model"] == "gpt2"


def test_models_list_configs_modules_and_structure(server, gpt2_dir):
    from transformers import AutoConfig

    models = {entry["name"]: entry for entry in call(server, "GET", "/v1/models").json()}
    assert set(models) == {"gpt2", "smollm2"}
    gpt2 = models["gpt2"]
    assert gpt2["architectures"] == ["GPT2LMHeadModel"]
    assert gpt2["config"]["n_layer"] == AutoConfig.from_pretrained(gpt2_dir).n_layer == 2
    assert "transformer.h.1.mlp.c_fc" in gpt2["modules"] and "lm_head" in gpt2["modules"]
    assert gpt2["repr"].startswith("GPT2LMHeadModel(")
    assert models["smollm2"]["config"]["num_hidden_layers"] == 4


def test_tokenizer_files_rebuild_the_same_tokenizer(server, gpt2_dir, tmp_path):
    from transformers import AutoTokenizer

    files = call(server, "GET", "/v1/models/gpt2/tokenizer").json()["files"]
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path)
    assert rebuilt(PROMPT)["input_ids"] == AutoTokenizer.from_pretrained(gpt2_dir)(PROMPT)["input_ids"]
    missing = call(server, "GET", "/v1/models/nope/tokenizer")
    assert missing.status == 404 and "gpt2" in missing.detail


def test_openapi_docs_are_served(server):
    assert call(server, "GET", "/docs", key=None).status == 200
    schema = call(server, "GET", "/openapi.json", key=None).json()
    assert {"/v1/requests", "/v1/requests/{job_id}/events", "/v1/models", "/v1/health"} <= set(schema["paths"])


# -- malformed input -----------------------------------------------------------------------------


def raw_frame(tree: Any, blob: bytes = b"", *, magic: bytes = b"STWF", version: int = 1, flags: int = 0) -> bytes:
    """A wire frame built by hand (uncompressed), for input the packer would never make."""
    structure = msgpack.packb(tree, use_bin_type=True)
    sender = b"0.1.0"
    return struct.pack("<4sHBB", magic, version, flags, len(sender)) + sender + struct.pack("<Q", len(structure)) + structure + blob


def encoded(value: Any) -> Any:
    """The tagged structure of a value, as the wire packer writes it."""
    return wire._Encoder().encode(value, "value", 0)


def with_tensor_header(header: dict, data: bytes) -> bytes:
    """A request whose variable ``t`` refers to tensor 0 of a hand-made safetensors blob."""
    request = make_request("y = t\n").to_wire()
    tree = encoded(request)
    blob_header = json.dumps(header).encode()
    blob = struct.pack("<Q", len(blob_header)) + blob_header + data
    # point variables["t"] at tensor 0
    variables_index = tree.index("variables") + 1
    tree[variables_index] = [wire.TAG_DICT, "t", [wire.TAG_TENSOR, 0]]
    return raw_frame(tree, blob)


def request_dict(**changes: Any) -> dict:
    value = make_request().to_wire()
    value.update(changes)
    return value


def good_frame() -> bytes:
    return packed(make_request())


def non_utf8_source() -> bytes:
    frame = packed(make_request("x = 'MARKER-MARKER'\n"), level=0)
    return frame.replace(b"MARKER-MARKER", b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4\xf3")


def zip_bomb() -> bytes:
    compressor = zlib.compressobj(9)
    body = struct.pack("<Q", 8) + msgpack.packb([0]) + b""
    payload = compressor.compress(body)
    zeros = bytes(1 << 20)
    for _ in range(48):  # 48 MiB of zeros: over the server's 32M unpacked limit
        payload += compressor.compress(zeros)
    payload += compressor.flush()
    return struct.pack("<4sHBB", b"STWF", 1, 1, 5) + b"0.1.0" + payload


def deep_nesting() -> bytes:
    tree: Any = [wire.TAG_LIST]
    for _ in range(200):
        tree = [wire.TAG_LIST, tree]
    return raw_frame(tree)


@dataclass
class Bad:
    name: str
    body: Any  # bytes, or a callable returning bytes
    status: int
    says: str
    content_type: str | None = CONTENT_TYPE


MALFORMED = [
    Bad("empty body", b"", 400, "empty"),
    Bad("truncated header", lambda: good_frame()[:7], 400, "truncated"),
    Bad("truncated body", lambda: good_frame()[:-25], 400, "truncated"),
    Bad("text/plain content type", lambda: good_frame(), 415, "application/x-seethrough", "text/plain"),
    Bad("JSON with a JSON content type", b'{"source": "x = 1"}', 415, "application/x-seethrough", "application/json"),
    Bad("no content type", lambda: good_frame(), 415, "without a Content-Type", None),
    Bad("JSON instead of wire", b'{"protocol": 1, "kind": "trace"}', 400, "not a seethrough wire frame"),
    Bad("garbage bytes", bytes(range(256)) * 4, 400, "not a seethrough wire frame"),
    Bad("wrong magic", lambda: b"XXXX" + good_frame()[4:], 400, "instead of b'STWF'"),
    Bad("wrong wire version", lambda: good_frame()[:4] + struct.pack("<H", 7) + good_frame()[6:], 400, "version 7"),
    Bad("unknown header flags", lambda: good_frame()[:6] + b"\x80" + good_frame()[7:], 400, "unknown flags"),
    Bad("corrupt compressed body", lambda: good_frame()[:20] + b"\x00" * 40, 400, "compressed"),
    Bad("oversize payload", lambda: b"STWF" + bytes(5 * 1024 * 1024), 413, "limit"),
    Bad("zip bomb", zip_bomb, 413, "decompresses to more than"),
    Bad("unknown model", lambda: packed(make_request(model="llama-405b")), 404, "serves: 'gpt2', 'smollm2'"),
    Bad("bad kind", lambda: packed(request_dict(kind="train")), 400, "`kind`"),
    Bad("missing body", lambda: packed({k: v for k, v in request_dict().items() if k != "body"}), 400, "`body`"),
    Bad("not a dict", lambda: packed([1, 2, 3]), 400, "`request` must be dict"),
    Bad("non-UTF-8 source", non_utf8_source, 400, "malformed structure"),
    Bad("source as bytes", lambda: packed(request_dict(body={"source": b"x = 1", "filename": "f.py", "first_line": 1})),
        400, "`body.source` must be str"),
    Bad("syntax error", lambda: packed(make_request("x = (1,\n")), 400, "syntax error"),
    Bad("sandbox violation", lambda: packed(make_request("import os\n")), 400, "`import os`"),
    Bad("sandbox violation in a helper", lambda: packed(make_request("y = helper()\n", functions={
        "helper": "def helper():\n    return open('/etc/passwd').read()\n"})), 400, "helper function `helper`"),
    Bad("tensor with a bad dtype", lambda: with_tensor_header({"0": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}},
                                                              bytes(32)), 400, "unsupported dtype"),
    Bad("tensor with a negative shape", lambda: with_tensor_header({"0": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                                                   bytes(4)), 400, "invalid shape"),
    Bad("tensor shape larger than its data", lambda: with_tensor_header(
        {"0": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, bytes(16)), 400, "claims shape"),
    Bad("huge claimed tensor size", lambda: with_tensor_header(
        {"0": {"dtype": "F64", "shape": [2**40, 2**40], "data_offsets": [0, 2**62]}}, bytes(16)), 400, "claims bytes"),
    Bad("safetensors header longer than the data", lambda: raw_frame(encoded(request_dict()), struct.pack("<Q", 10**12) + b"{}"),
        400, "safetensors header claims"),
    Bad("wrong field type", lambda: packed(request_dict(variables=[1, 2])), 400, "`variables` must be dict"),
    Bad("bad variable name", lambda: packed(request_dict(variables={"__class__": 1})), 400, "invalid variable name"),
    Bad("negative first_line", lambda: packed(request_dict(body={"source": "x = 1", "filename": "f.py", "first_line": -3})),
        400, "first_line"),
    Bad("protocol version mismatch", lambda: packed(request_dict(protocol=99, client_version="9.9.9")), 400,
        "protocol 1 (seethrough 0.1.0); the client sent protocol 99 (seethrough 9.9.9)"),
    Bad("unknown module path", lambda: packed(make_request(envoys={"model": "", "block": "transformer.h.9"})), 400,
        "transformer.h.9"),
    Bad("deep nesting", deep_nesting, 400, "nested deeper"),
    Bad("non-allowed module binding", lambda: packed(make_request(modules={"os": "os"})), 400, "`modules.os`"),
]


assert len(MALFORMED) >= 25 and len({bad.name for bad in MALFORMED}) == len(MALFORMED), "the corpus shrank"


@pytest.mark.parametrize("bad", MALFORMED, ids=lambda bad: bad.name)
def test_malformed_input_gets_a_clear_4xx(server, bad):
    body = bad.body() if callable(bad.body) else bad.body
    reply = post(server, body, content_type=bad.content_type)
    assert reply.status == bad.status, (reply.status, reply.body[:400])
    assert bad.says in reply.detail, reply.detail
    assert len(reply.detail) > 40  # a sentence that explains, not a code


def test_server_serves_after_the_malformed_corpus(server, reference):
    assert_intact(server, reference)


def test_unknown_ids_routes_and_methods(server):
    reply = call(server, "GET", "/v1/requests/does-not-exist")
    assert reply.status == 404 and "no request with id" in reply.detail
    assert call(server, "GET", "/v1/requests/does-not-exist/result").status == 404
    assert call(server, "GET", "/v1/nothing-here").status == 404
    assert call(server, "PUT", "/v1/requests").status == 405


def test_declared_oversize_body_is_refused_before_reading(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/requests")
        connection.putheader("X-API-Key", ALICE)
        connection.putheader("Content-Type", CONTENT_TYPE)
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert "limit" in json.loads(response.read())["detail"]
    finally:
        connection.close()


# -- sandbox escapes -------------------------------------------------------------------------------


@dataclass
class Escape:
    name: str
    source: str
    outcome: str  # "refused" (400 before running), "error" (runs, fails), "crash" / "changed" (worker replaced)
    says: str = ""


W = "model.transformer.h[0].mlp.c_fc.weight"
ESCAPES = [
    Escape("import os", "import os\nos.system('touch {canary}')\n", "refused", "import os"),
    Escape("import sys", "import sys\n", "refused", "import sys"),
    Escape("import subprocess", "import subprocess\nsubprocess.run(['touch', '{canary}'])\n", "refused", "subprocess"),
    Escape("from os import system", "from os import system\n", "refused", "os"),
    Escape("__import__", "m = __import__('os')\n", "refused", "__import__"),
    Escape("fork bomb", "import os\nwhile True:\n    os.fork()\n", "refused", "import os"),
    Escape("fork via torch", "import torch\ntorch.multiprocessing.Process()\n", "refused", "torch.multiprocessing"),
    Escape("class walk", "x = ().__class__.__bases__[0].__subclasses__()\n", "refused", "__class__"),
    Escape("globals of a lambda", "g = (lambda: 0).__globals__\n", "refused", "__globals__"),
    Escape("generator frame", "g = (i for i in [1])\nf = g.gi_frame\n", "refused", "gi_frame"),
    Escape("traceback frame", "try:\n    1 / 0\nexcept Exception as e:\n    f = e.with_traceback(None).tb_frame\n",
           "refused", "tb_frame"),
    Escape("builtins lookup", "b = __builtins__\n", "refused", "__builtins__"),
    Escape("builtins by name", "b = globals()['__builtins__']\n", "refused", "globals"),
    Escape("open a file", "data = open('/etc/passwd').read()\n", "refused", "open"),
    Escape("write a file", "open('{canary}', 'w').write('x')\n", "refused", "open"),
    Escape("pickle", "import pickle\n", "refused", "pickle"),
    Escape("marshal", "import marshal\n", "refused", "marshal"),
    Escape("eval", "eval('1 + 1')\n", "refused", "eval"),
    Escape("exec", "exec('import os')\n", "refused", "exec"),
    Escape("getattr by string", "m = getattr(model, '_model')\n", "refused", "getattr"),
    Escape("format string walk", "s = '{0.__class__}'.format(1)\n", "refused", "format"),
    Escape("type()", "t = type(1)\n", "refused", "type"),
    Escape("private attribute", "m = model._model\n", "refused", "_model"),
    Escape("class definition", "class A:\n    pass\n", "refused", "class"),
    Escape("numpy", "a = model.transformer.h[0].mlp.c_fc.weight.numpy()\n", "refused", "numpy"),
    Escape("untyped storage", f"s = {W}.untyped_storage()\n", "refused", "untyped_storage"),
    Escape("torch.save to a file", "import torch\ntorch.save(torch.ones(1), '{canary}')\n", "error", "torch.save"),
    Escape("torch.ops", "import torch\nop = torch.ops.aten\n", "error", "torch.ops"),
    Escape("uninitialized memory", "import torch\nt = torch.Tensor(100)\n", "error", "uninitialized"),
    Escape("monkeypatch forward", "model.transformer.h[0].forward = print\n", "refused", "forward"),
    Escape("register a hook", "model.transformer.h[0].register_forward_hook(print)\n", "refused", "register_forward_hook"),
    Escape("write weights by slice", f"{W}[:] = 0\n", "error", "not available in remote trace bodies"),
    Escape("write weights by slice without grad", f"import torch\nwith torch.no_grad():\n    {W}[:] = 0\n",
           "error", "not available in remote trace bodies"),
    Escape("write weights via .data", f"{W}.data.zero_()\n", "error", "not available in remote trace bodies"),
    Escape("fill weights via .data slice", f"{W}.data[0, 0] = 1.5\n", "error", "not available in remote trace bodies"),
    Escape("copy_ into weights", f"import torch\nwith torch.no_grad():\n    {W}.copy_({W} * 0)\n", "error", "not available in remote trace bodies"),
    Escape("out= into weights", f"import torch\nwith torch.no_grad():\n    torch.add({W}, 1, out={W})\n",
           "crash", "read-only"),
    Escape("drop a layer", "layer = model.transformer.h.pop(0)\n", "error", "not available in remote trace bodies"),
    Escape("to float16", "import torch\nmodel.to(torch.float16)\n", "error", "not available in remote trace bodies"),
    Escape("half()", "model.half()\n", "error", "not available in remote trace bodies"),
    Escape("requires_grad_", f"{W}.requires_grad_(False)\n", "error", "not available in remote trace bodies"),
    Escape("config.update", "model.config.update({'n_layer': 1})\n", "error", "not available in remote trace bodies"),
    Escape("generation_config.update", "model.generation_config.update(max_length=3)\n", "error", "not available in remote trace bodies"),
    Escape("recursion bomb", "def f(n):\n    return f(n + 1)\nf(0)\n", "error", "recursion"),
    Escape("giant tensor", "import torch\nbig = torch.zeros(2 ** 31)\n", "error", "memory"),
    Escape("giant list", "big = [0] * (10 ** 9)\n", "error", "memory"),
    Escape("giant string", "big = 'x' * (10 ** 10)\n", "error", "memory"),
]


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    yield path
    assert not path.exists(), "an escape wrote the canary file"


assert len(ESCAPES) >= 30 and len({escape.name for escape in ESCAPES}) == len(ESCAPES), "the corpus shrank"


@pytest.mark.slow
@pytest.mark.parametrize("escape", ESCAPES, ids=lambda escape: escape.name)
def test_escape_is_refused_or_contained(server, reference, escape, canary):
    source = escape.source.replace("{canary}", str(canary))
    before = [worker["pid"] for worker in gpt2_workers(server)]
    reply = post(server, packed(make_request(source)))
    if escape.outcome == "refused":
        assert reply.status == 400, (reply.status, reply.body[:300])
        assert "sandbox" in reply.detail and escape.says in reply.detail, reply.detail
        assert "line " in reply.detail
    else:
        assert reply.status == 202, reply.body[:300]
        outcome = follow(server, reply.json()["id"])
        error = outcome.error
        assert error is not None, f"the escape ran without an error: {outcome.answer}"
        assert outcome.events[-1] == ("error", error)
        text = f"{error['type']}: {error['message']}"
        assert escape.says.lower() in text.lower(), text
        if escape.outcome == "crash":
            assert error["type"] == "WorkerCrashedError" and "SIGSEGV" in error["message"], text
        elif escape.outcome == "changed":
            assert error["type"] == "WeightsModifiedError" and "results were discarded" in error["message"], text
        else:
            assert [worker["pid"] for worker in gpt2_workers(server)] == before, "the worker should have survived"
    assert_intact(server, reference)


@pytest.mark.slow
def test_rng_seed_and_grad_mode_do_not_leak_into_the_next_request(server):
    """A body's seed lasts for its request; every request starts from a fresh seed."""
    draw = "import torch\nr = torch.rand(4).save()\n"
    first = run(server, draw).values["r"]
    seeded = run(server, "import torch\ntorch.manual_seed(1234)\ntorch.set_grad_enabled(False)\nr = torch.rand(4).save()\n")
    assert torch.equal(seeded.values["r"], torch.rand(4, generator=torch.Generator().manual_seed(1234)))
    after = run(server, draw).values["r"]
    # each request draws from a fresh seed: not the seeded stream, not the previous request's draws
    assert not torch.equal(after, seeded.values["r"]) and not torch.equal(after, first)
    grad = ("h = model.transformer.h[0].output\nloss = model.output.logits.sum()\n"
            "with loss.backward():\n    g = h.grad.save()\n")
    assert run(server, grad).values["g"].abs().sum() > 0


@pytest.mark.slow
def test_print_flood_is_capped(server, reference):
    outcome = run(server, "for i in range(100000):\n    print('line', i)\n")
    assert outcome.error is None
    logs = outcome.logs
    assert len(logs) == 201, len(logs)
    assert logs[0] == "line 0" and logs[199] == "line 199"
    assert "output cut here" in logs[-1]
    assert_intact(server, reference)


@pytest.mark.slow
def test_infinite_loop_times_out_and_only_its_request_process_is_killed(server, reference):
    before = gpt2_workers(server)[0]
    started = time.monotonic()
    outcome = run(server, "while True:\n    pass\n")
    elapsed = time.monotonic() - started
    assert outcome.error["type"] == "TimeoutError"
    assert f"limit of {TIMEOUT_S} s" in outcome.error["message"] and "--timeout" in outcome.error["message"]
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + 30
    assert_intact(server, reference)
    after = gpt2_workers(server)[0]
    # The worker forks a process per request: the time limit kills that one; the loaded model stays.
    assert after["pid"] == before["pid"] and after["restarts"] == before["restarts"]


@pytest.mark.slow
def test_a_worker_killed_mid_request_fails_that_request_only(server, reference):
    reply = post(server, packed(make_request("print('started')\nwhile True:\n    pass\n")))
    job_id = reply.json()["id"]
    client = RemoteClient(server.url, ALICE)
    events = []
    for name, data in client.events(job_id, timeout=120):
        events.append((name, data))
        if name == "log" and data["text"] == "started":
            os.kill(gpt2_workers(server)[0]["pid"], signal.SIGKILL)
    error = events[-1][1]
    assert events[-1][0] == "error" and error["type"] == "WorkerCrashedError"
    assert "SIGKILL" in error["message"] and "next request" in error["message"]
    assert_intact(server, reference)


# -- the model guard, in this process ------------------------------------------------------------


@pytest.fixture
def fresh_gpt2(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), AutoTokenizer.from_pretrained(gpt2_dir)


def test_guard_sees_every_kind_of_change_without_read_only_memory(fresh_gpt2):
    from seethrough.remote.server.guard import ModelGuard

    module, tokenizer = fresh_gpt2
    changes = {
        ".data write (no version bump)": lambda m: m.transformer.h[0].mlp.c_fc.weight.data[3, 4].add_(1.0),
        "in-place write": lambda m: m.transformer.h[1].attn.c_proj.bias.detach().mul_(2),
        "dtype": lambda m: m.half(),
        "structure": lambda m: m.transformer.h.pop(0),
        "config": lambda m: m.config.update({"n_layer": 1}),
        "generation config": lambda m: m.generation_config.update(max_length=3),
        "requires_grad": lambda m: m.lm_head.weight.requires_grad_(False),
        "training mode": lambda m: m.transformer.h[0].train(),
    }
    for what, change in changes.items():
        guard = ModelGuard(module, tokenizer, None)
        assert guard.check() == [], what
        change(module)
        assert guard.check(), f"the guard missed a {what} change"
        module, tokenizer = type(module).from_pretrained(module.name_or_path).eval(), tokenizer


def test_guard_restores_buffers_and_clears_gradients(fresh_gpt2):
    from seethrough.remote.server.guard import ModelGuard

    module, tokenizer = fresh_gpt2
    module.register_buffer("scale", torch.ones(4))
    guard = ModelGuard(module, tokenizer, None)
    module.scale.mul_(3)
    module.lm_head.weight.grad = torch.ones_like(module.lm_head.weight)
    torch.set_grad_enabled(False)
    try:
        assert guard.check() == []
        assert torch.equal(module.scale, torch.ones(4)) and module.lm_head.weight.grad is None
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_read_only_weights_keep_values_and_alignment(fresh_gpt2):
    from seethrough.remote.server.guard import ModelGuard, ReadOnlyWeights

    module, tokenizer = fresh_gpt2
    before = {name: (p.detach().clone(), p.data_ptr() % 4096) for name, p in module.named_parameters()}
    protected = ReadOnlyWeights.apply(module)
    assert protected is not None and len(protected.protected) == len(before)
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name][0]) and p.data_ptr() % 4096 == before[name][1] and protected.covers(p)
    guard = ModelGuard(module, tokenizer, protected)
    assert guard.check() == []
    ids = tokenizer("read only", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert module(ids).logits.isfinite().all()
    assert guard.check() == []


# -- queueing, load ----------------------------------------------------------------------------


def test_fair_queue_takes_turns_between_keys():
    queue = FairQueue(max_total=100, max_per_key=10)
    positions = [queue.put("alice", f"a{i}") for i in range(4)]
    assert positions == [1, 2, 3, 4]
    assert queue.put("bob", "b0") == 2 and queue.put("carol", "c0") == 3
    assert queue.positions() == ["a0", "b0", "c0", "a1", "a2", "a3"]
    assert [queue.get(0) for _ in range(6)] == ["a0", "b0", "c0", "a1", "a2", "a3"]
    assert queue.get(0.01) is None
    for i in range(10):
        queue.put("alice", i)
    with pytest.raises(QueueFull, match="API key"):
        queue.put("alice", 10)


def test_finished_jobs_expire():
    store = JobStore(ttl=10, max_log_lines=5, max_log_bytes=1000)
    old = store.create("owner", "gpt2", "f.py", b"x")
    new = store.create("owner", "gpt2", "f.py", b"x")
    running = store.create("owner", "gpt2", "f.py", b"x")
    store.finish(old, b"result", None)
    store.finish(new, b"result", None)
    old.finished -= 60
    assert store.expire() == 1
    assert store.get(old.id) is None and store.get(new.id) is new and store.get(running.id) is running


def test_log_lines_are_capped_in_the_store():
    store = JobStore(ttl=10, max_log_lines=3, max_log_bytes=1000)
    job = store.create(None, "gpt2", "f.py", b"x")
    for i in range(10):
        store.log(job, f"line {i}")
    texts = [data["text"] for name, data in job.events if name == "log"]
    assert texts[:3] == ["line 0", "line 1", "line 2"] and "output cut here" in texts[3] and len(texts) == 4


def test_settings_parse_sizes_and_refuse_bad_options(tmp_path):
    assert parse_size("2G") == 2 * 1024**3 and parse_size("512M") == 512 * 1024**2 and parse_size("100") == 100
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalice\n\nbob  # trailing comment\n")
    settings = parse_args(["--model", "gpt2=/models/gpt2", "--api-keys", str(keys), "--memory-limit", "off"])
    assert settings.api_keys == {"alice", "bob"} and settings.memory_limit is None
    assert settings.models[0].name == "gpt2" and settings.models[0].source == "/models/gpt2"
    for argv, says in ((["--model", "a=x", "--model", "a=y"], "given twice"), (["--model", "a=x", "--timeout", "0"], "positive"),
                       (["--model", "a=x", "--memory-limit", "lots"], "cannot read the size")):
        with pytest.raises(SettingsError, match=says):
            parse_args(argv)
    keys.write_text("# nothing\n")
    with pytest.raises(SettingsError, match="holds no keys"):
        parse_args(["--model", "a=x", "--api-keys", str(keys)])


def test_bad_options_exit_with_status_2(capsys):
    from seethrough.remote.server import main

    assert main(["--model", "a=x", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_that_cannot_load_stops_the_command_with_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "seethrough.remote.server", "--model", f"broken={tmp_path}",
                           "--port", str(testing.free_port())], capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot load model 'broken' from '{tmp_path}'" in done.stderr


@pytest.mark.slow
def test_queue_is_fair_between_keys_over_http(server):
    slow = "total = 0\nfor i in range(2000000):\n    total = total + i\n"
    alice = [post(server, packed(make_request(slow)), ALICE).json() for _ in range(5)]
    bob = post(server, packed(make_request(slow)), BOB).json()
    assert bob["position"] <= 2, (alice, bob)  # behind at most one of alice's queued requests
    finished = {}
    for job in alice + [bob]:
        key = BOB if job is bob else ALICE
        follow(server, job["id"], key)
        finished[job["id"]] = call(server, "GET", f"/v1/requests/{job['id']}", key=key).json()["finished"]
    assert finished[bob["id"]] < finished[alice[-1]["id"]]
    assert sum(finished[job["id"]] < finished[bob["id"]] for job in alice) <= 2


@pytest.mark.slow
def test_load_8_clients_25_requests_each_all_correct(server, gpt2_dir):
    import seethrough

    local = seethrough.LanguageModel(str(gpt2_dir))
    remote = seethrough.LanguageModel(str(gpt2_dir))
    object.__setattr__(remote, "_remote_name", "gpt2")
    prompts = [[f"client {c} request {r}: " + "word " * (r % 7) for r in range(25)] for c in range(8)]
    expected: dict[str, torch.Tensor] = {}
    with single_thread():  # as the server's workers: bitwise-equal values
        for prompt in (p for row in prompts for p in row):
            with local.trace(prompt):
                out = local.transformer.h[1].output.save()
            expected[prompt] = out
    load_is_all_correct(remote, server.url, (BOB, ALICE), expected, prompts, timeout=240)


def test_the_readme_keys_file_example_loads(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    example = readme.split("# keys.txt: one key per person\n", 1)[1].split("```", 1)[0]
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys.txt: one key per person\n" + example, encoding="utf-8")
    assert load_api_keys(keys) == {"alice-7d1f0c2b9e", "bob-4a9e33f071"}
    keys.write_text("alice bob\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="line 1: an API key must be one printable word"):
        load_api_keys(keys)
