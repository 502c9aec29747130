"""The request process's warm-up gives way to the request (remote/server/forking.py, worker.py).

A request process warms up (a one-token forward) while it waits for its
payload; under steady load the payload arrives during the warm-up, which must
then stop rather than make the request wait.  Run in forked children of the
test process (see ``in_child`` in test_isolation.py), as the server runs them.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from seethrough.remote.server import framing
from seethrough.remote.server.forking import RequestForker
from seethrough.remote.server.worker import _warm_forward
from test_isolation import in_child


class Served:
    """What the worker's warm-up uses of a served wrapper: the module and its device."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._model = module
        self.device = torch.device("cpu")


def count_module_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    for each in module.modules():
        each.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_warm_up_forward_stops_when_the_request_arrives(gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    calls = count_module_calls(model)
    _warm_forward(Served(model), lambda: False)
    whole = calls[0]
    assert whole > 10  # a whole forward: every module ran once or more
    calls[0] = 0
    _warm_forward(Served(model), lambda: calls[0] >= 3)  # "arrives" after three module calls
    assert calls[0] == 3
    assert not torch.nn.modules.module._global_forward_pre_hooks  # its check is gone again
    # The model still computes as before (nothing left half-done).
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()(ids).logits)


def test_a_request_process_stops_preparing_when_its_payload_comes():
    def scenario() -> dict:
        seen: dict[str, Any] = {}

        def prepare(arrived: Any) -> None:
            # A warm-up that would run for a minute unless told the request is there.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not arrived():
                time.sleep(0.01)
            seen["stopped_by_arrival"] = arrived()

        def handler(payload: bytes, connection: Any) -> None:
            answer = json.dumps({"payload": payload.decode(), **seen}).encode()
            connection.send_bytes(framing.encode("answer", answer))

        forker = RequestForker(handler, timeout=30.0, memory_budget=1 << 30, max_message=1 << 20, prepare=prepare)
        relayed: list[bytes] = []
        time.sleep(1.0)  # the waiting process is inside its warm-up when the first request comes
        outcome = forker.run(b"first", relayed.append)
        second = forker.run(b"second", relayed.append)
        forker.close()
        answers = [json.loads(framing.decode(message).payload) for message in relayed]
        return {"kinds": [outcome.kind, second.kind], "answers": answers}

    got = in_child(scenario)
    assert got["kinds"] == ["answered", "answered"], got
    first, second = got["answers"]
    assert first == {"payload": "first", "stopped_by_arrival": True}
    # The second came before its process began to warm up: then it skips the warm-up.
    assert second["payload"] == "second" and second.get("stopped_by_arrival", True) is True
