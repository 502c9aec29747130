"""The sandbox end to end: attacks sent to a real server, then clean requests.

A server of its own (``python -m seethrough.remote.server`` on a loopback
port, a random 2-layer GPT-2 with the real tokenizer) starts with a secret in
its environment.  Its first answers to a clean trace (activations, logits, an
activation's and a weight's gradient, a seeded draw, tokenizer and config
reads) and to a sampled generation are "a fresh server's answers"; they are
checked against plain HuggingFace and autograd in this process.  Then:

* the ``server=True`` subset of the attack corpus (``tests/sandbox_corpus.py``)
  and every request-option attack: each is refused (400 naming the construct
  or option, or an error naming the line) or contained (no canary file, no
  connection to the loopback listener, neither the secret nor the model
  folder in the reply, the printed lines or the error), and after each the
  clean trace gives exactly the fresh answer;
* the 30+ state mutations: after each, the clean trace and the clean
  generation give exactly the fresh server's answers.
"""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fixtures.network import connections, listener  # noqa: F401 - listener is a fixture
from test_sandbox import assert_clean_values_match_plain_hf
from seethrough.remote import wire
from seethrough.remote.client.connection import CONTENT_TYPE, RemoteClient
from seethrough.remote.protocol import Request
from seethrough.remote.server import testing
from sandbox_corpus import (ATTACKS, CLEAN_GENERATE_OPTIONS, CLEAN_GENERATE_SOURCE, CLEAN_SOURCE, MUTATIONS,
                            OPTION_ATTACKS, SECRET_ENV, STATE_FIELDS, Attack, Mutation, OptionAttack)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

KEY = "sandbox-key-1234"
PROMPT = "The quick brown fox"
SECRET = "s3cret-" + secrets.token_hex(8)
SERVER_ARGS = ["--threads", "1", "--timeout", "20", "--memory-limit", "1G", "--max-log-lines", "200",
               "--spare-workers", "0", "--job-ttl", "600", "--start-method", "forkserver"]
SERVER_ATTACKS = [attack for attack in ATTACKS if attack.server]




@pytest.fixture(scope="module")
def server(gpt2_dir):
    with testing.ServerProcess({"gpt2": str(gpt2_dir)}, api_keys=[KEY], args=SERVER_ARGS,
                               env={SECRET_ENV: SECRET}) as process:
        yield process


@dataclass
class Reply:
    status: int
    detail: str
    answer: dict
    logs: list[str]

    @property
    def text(self) -> str:
        return self.detail + repr(self.answer) + "\n".join(self.logs)


def send(server, request: Request) -> Reply:
    body = wire.pack(request.to_wire(), max_bytes=1 << 26)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/requests", body=body,
                           headers={"X-API-Key": KEY, "Content-Type": CONTENT_TYPE})
        response = connection.getresponse()
        status, raw = response.status, response.read()
    finally:
        connection.close()
    if status != 202:
        return Reply(status, str(json.loads(raw).get("detail")), {}, [])
    client = RemoteClient(server.url, KEY)
    job_id = json.loads(raw)["id"]
    events = list(client.events(job_id, timeout=120))
    answer = wire.unpack(client.result_bytes(job_id), max_bytes=1 << 30)
    return Reply(status, "", answer, [data["text"] for name, data in events if name == "log"])


def make(source: str, kind: str = "trace", **fields: Any) -> Request:
    fields.setdefault("args", [PROMPT] if kind != "session" else [])
    fields.setdefault("variables", {"x": torch.linspace(-1, 1, 3)})
    return Request(model="gpt2", kind=kind, source=source, filename="attack.py", first_line=1,
                   client_version="0.1.0", tracer_name="tracer" if kind != "session" else None,
                   envoys={"model": ""}, **fields)


def clean_trace(server) -> dict:
    reply = send(server, make(CLEAN_SOURCE))
    assert reply.status == 202 and "error" not in reply.answer, reply
    return reply.answer["values"]


def clean_generation(server) -> dict:
    reply = send(server, make(CLEAN_GENERATE_SOURCE, "generate", generate=dict(CLEAN_GENERATE_OPTIONS)))
    assert reply.status == 202 and "error" not in reply.answer, reply
    return reply.answer["values"]


def assert_equal_values(got: dict, expected: dict, names) -> None:
    for name in names:
        a, b = got[name], expected[name]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), name
        elif isinstance(b, list) and b and isinstance(b[0], torch.Tensor):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), name
        else:
            assert a == b, name


@pytest.fixture(scope="module")
def fresh(server, gpt2_dir) -> tuple[dict, dict]:
    """The first answers of the just-started server, checked against HuggingFace and autograd."""
    trace, generation = clean_trace(server), clean_generation(server)
    assert_clean_values_match_plain_hf(trace, gpt2_dir)
    assert len(generation["steps"]) == 3 and generation["tokens"].shape == (1, 4 + 3)
    return trace, generation


def test_the_server_holds_the_secret(server):
    """The canary is real: the server process has the secret in its environment."""
    with open(f"/proc/{server.process.pid}/environ", "rb") as handle:
        assert SECRET.encode() in handle.read()


@pytest.mark.parametrize("attack", SERVER_ATTACKS, ids=lambda attack: attack.name)
def test_attack_is_contained_by_the_server(attack: Attack, server, fresh, listener, gpt2_dir, tmp_path):
    canary = tmp_path / "canary"
    source = (attack.source.replace("{canary}", str(canary)).replace("{port}", str(listener.getsockname()[1]))
              .replace("{secret}", SECRET_ENV))
    reply = send(server, make(source, attack.kind))
    assert SECRET not in reply.text, "the secret came back"
    assert str(gpt2_dir) not in reply.text, "the server's model folder came back"
    assert not canary.exists(), "a file was written"
    assert connections(listener) == 0, "a connection was made"
    if attack.static:
        assert reply.status == 400 and "sandbox" in reply.detail and attack.construct in reply.detail, reply
        assert f"line {attack.line}" in reply.detail
    elif attack.outcome == "refused":
        error = reply.answer.get("error")
        assert error is not None, f"the attack ran: {reply.answer}"
        assert error["type"] in ("SandboxViolation", "NameError", "KeyError", "ModulePathError"), error
        assert attack.says in error["message"], error
        assert error["line"] is not None
    else:
        assert "error" not in reply.answer, reply.answer
    assert_equal_values(clean_trace(server), fresh[0], STATE_FIELDS)


@pytest.mark.parametrize("attack", OPTION_ATTACKS, ids=lambda attack: attack.name)
def test_request_options_are_refused_with_400(attack: OptionAttack, server):
    reply = send(server, make("x = 1", attack.kind, generate=dict(attack.generate), kwargs=dict(attack.kwargs)))
    assert reply.status == 400, reply
    assert attack.says in reply.detail and "remove it" in reply.detail, reply.detail


def test_the_server_reports_a_fresh_seed_per_request(server):
    draws = [send(server, make("import torch\nr = torch.rand(4).save()")).answer["values"]["r"] for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mutation: mutation.name)
def test_nothing_persists_on_the_server(mutation: Mutation, server, fresh):
    send(server, make(mutation.source, mutation.kind))
    assert_equal_values(clean_trace(server), fresh[0], STATE_FIELDS)
    assert_equal_values(clean_generation(server), fresh[1], ("tokens", "steps"))


def test_a_refusal_at_run_time_reaches_the_user_with_their_line(server, gpt2_dir):
    from seethrough import LanguageModel
    from seethrough.remote.server.sandbox import SandboxViolation

    model = LanguageModel(str(gpt2_dir))
    object.__setattr__(model, "_remote_name", "gpt2")
    with pytest.raises(SandboxViolation) as info:
        with model.trace(PROMPT, remote=True, host=server.url, api_key=KEY):
            hidden = model.transformer.h[0].output.save()
            bpe = model.tokenizer.model
    message = str(info.value)
    assert "`.model` of a TokenizerView is not available in remote trace bodies" in message, message
    assert "bpe = model.tokenizer.model" in message and __file__ in message, message
