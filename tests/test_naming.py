"""Models addressed as users name them, and the client's settings read when used.

A real server on loopback serves the random GPT-2 folder (as ``gpt2``) and
the full SmolLM2 by its repo id (as ``smollm2``); the client reaches each by
its served name, its repo id and its folder, and the saved values equal a
plain local run of the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.config import DEFAULT_HOST
from seethrough.remote.client.connection import ModelNotServedError, RemoteClient
from seethrough.remote.server import testing
from seethrough.remote.server.naming import model_names
from seethrough.remote.server.settings import ModelSpec

pytestmark = [pytest.mark.timeout(600)]

KEY = "naming-key-1"
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def named(gpt2_dir, smollm2_dir):
    args = ["--threads", "1", "--timeout", "120", "--start-method", "forkserver"]
    with testing.ServerProcess({"gpt2": str(gpt2_dir), "smollm2": REPO}, api_keys=[KEY], args=args) as server:
        yield server


def test_names_of_specs_resolve_and_hide_paths(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    link = tmp_path / "link"
    link.symlink_to(folder)
    names = model_names((ModelSpec("a", str(link)), ModelSpec("b", "org/b"), ModelSpec("c", "org/b")))
    assert names.resolve("a") == "a" and names.resolve(str(link)) == "a" and names.resolve(str(folder)) == "a"
    assert names.resolve("org/b") is None  # two models would answer to it: neither does
    assert names.resolve("nothing") is None
    assert names.public == {"a": ["a"], "b": ["b"], "c": ["c"]}  # no server path is shown
    assert model_names((ModelSpec("x", "org/x"),)).public == {"x": ["org/x", "x"]}
    # A served name always wins over another model's alias.
    assert model_names((ModelSpec("org/x", "somewhere/else"), ModelSpec("y", "org/x"))).resolve("org/x") == "org/x"


def test_a_model_answers_to_its_name_its_repo_id_and_its_folder(named, gpt2_dir):
    client = RemoteClient(named.url, KEY)
    assert client.model("smollm2")["name"] == "smollm2"
    assert client.model(REPO)["name"] == "smollm2"
    assert client.model("gpt2")["name"] == client.model(str(gpt2_dir))["name"] == "gpt2"
    listed = {entry["name"]: entry["aliases"] for entry in client.models()}
    assert listed == {"gpt2": ["gpt2"], "smollm2": [REPO, "smollm2"]}  # the folder is accepted, never shown
    with pytest.raises(ModelNotServedError, match="serves: 'gpt2', 'smollm2'"):
        seethrough.remote.client.connection.served_model_folder("org/unknown", named.url, KEY)


def test_language_model_by_repo_id_runs_remotely_as_locally(named):
    model = LanguageModel(REPO)
    with model.trace(PROMPT):
        local = model.model.layers[3].output.save()
        local_logits = model.lm_head.output[0, -1].save()
    with model.trace(PROMPT, remote=True, host=named.url, api_key=KEY):
        remote = model.model.layers[3].output.save()
        remote_logits = model.lm_head.output[0, -1].save()
    assert torch.allclose(remote, local, atol=1e-5) and torch.allclose(remote_logits, local_logits, atol=1e-4)
    assert remote_logits.argmax() == local_logits.argmax()


def test_language_model_from_a_folder_reaches_the_server_serving_it(named, gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = AutoTokenizer.from_pretrained(gpt2_dir)(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**ids).logits
    link = tmp_path / "my-gpt2"
    link.symlink_to(gpt2_dir)  # another spelling of the same folder
    for spelling in (str(gpt2_dir), str(link)):
        model = LanguageModel(spelling)
        with model.trace(PROMPT, remote=True, host=named.url, api_key=KEY):
            logits = model.output.logits.save()
        assert torch.allclose(logits, expected, atol=1e-5)
    served = LanguageModel(str(gpt2_dir), host=named.url, api_key=KEY)  # the skeleton from the server
    assert served.config.n_layer == plain.config.n_layer


def test_host_and_key_are_read_when_a_request_is_made(named, gpt2_dir, monkeypatch):
    monkeypatch.delenv("SEETHROUGH_HOST", raising=False)
    monkeypatch.delenv("SEETHROUGH_API_KEY", raising=False)
    assert seethrough.CONFIG.API.HOST == DEFAULT_HOST and seethrough.CONFIG.API.APIKEY is None
    model = LanguageModel(str(gpt2_dir))
    # As a notebook does: set the environment after `import seethrough`.
    monkeypatch.setenv("SEETHROUGH_HOST", named.url)
    monkeypatch.setenv("SEETHROUGH_API_KEY", KEY)
    assert seethrough.CONFIG.API.HOST == named.url and seethrough.CONFIG.API.APIKEY == KEY
    with model.trace(PROMPT, remote=True):
        hidden = model.transformer.h[0].output.save()
    with model.trace(PROMPT):
        local = model.transformer.h[0].output.save()
    assert torch.allclose(hidden, local, atol=1e-6)
    # A value set in code wins over the environment.
    seethrough.CONFIG.API.APIKEY = "set-in-code"
    try:
        assert seethrough.CONFIG.API.APIKEY == "set-in-code"
        with pytest.raises(seethrough.remote.client.connection.RemoteAuthError, match="refused the API key"):
            with model.trace(PROMPT, remote=True):
                model.transformer.h[0].output.save()
    finally:
        seethrough.CONFIG.API.APIKEY = None
    assert seethrough.CONFIG.API.APIKEY == KEY
