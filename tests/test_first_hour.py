"""What a new user meets in the first hour: loading errors, the server command, exports.

Each test does what a newcomer does (a typo in a repo id, `seethrough serve`
with no options, Ctrl+C) and checks the answer is quick to act on: the error
names the cause and the fix, nothing waits on a hub that cannot answer, and
the server starts and stops cleanly.  The hub is pointed (``HF_ENDPOINT``) at
loopback ports this test controls, so the outcome does not depend on the
machine's network.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import seethrough
from seethrough import LanguageModel, LanguageModelError
from seethrough.models import hub, offline
from seethrough.remote.client.connection import ModelNotServedError
from seethrough.remote.server import testing
from seethrough.remote.server.settings import DEFAULT_SERVED, parse_args
from fixtures.signals import takes_ctrl_c


@pytest.fixture
def closed_hub(monkeypatch):
    """HF_ENDPOINT at a loopback port nobody listens on; the probe's memory cleared."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{testing.free_port()}")
    monkeypatch.setattr(hub, "_last_probe", None)


def test_the_hub_probe_tells_an_open_port_from_a_closed_one(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(hub, "_last_probe", None)
        assert hub.hub_reachable() is True
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{testing.free_port()}")
    monkeypatch.setattr(hub, "_last_probe", None)
    assert hub.hub_reachable() is False
    assert hub.offline_loading("some/repo") is True
    assert hub.offline_loading(str(Path(__file__).parent)) is False  # a folder never asks the hub


def test_an_unknown_repo_id_fails_at_once_with_the_reason(closed_hub):
    calls = []
    original = hub.hub_reachable

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    hub.hub_reachable = counted
    try:
        with pytest.raises(LanguageModelError) as info:
            LanguageModel("no/such-model")
    finally:
        hub.hub_reachable = original
    message = str(info.value)
    assert "'no/such-model'" in message and "cannot be reached" in message and "127.0.0.1" in message
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message  # the way out: the offline model
    assert isinstance(info.value, seethrough.SeethroughError)
    assert len(calls) == 1  # asked once; the loaders never retried a dead hub


def test_a_repo_in_the_local_hf_cache_loads_without_the_hub(closed_hub, gpt2_dir, tmp_path):
    """The layout huggingface_hub writes: models--ORG--NAME/refs/main + snapshots/REV/files."""
    revision = "0" * 40
    repo = tmp_path / "hf-cache" / "models--someone--tiny-gpt2"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for item in gpt2_dir.iterdir():
        shutil.copy(item, snapshot / item.name)
    # huggingface_hub reads HF_HUB_CACHE when imported: load in a fresh process that has it.
    script = (
        "import sys, torch\n"
        "from seethrough import LanguageModel\n"
        "model = LanguageModel('someone/tiny-gpt2')\n"
        "with model.trace('hello world'):\n"
        "    logits = model.output.logits.save()\n"
        "torch.save(logits, sys.argv[1])\n"
    )
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    ids = AutoTokenizer.from_pretrained(gpt2_dir)("hello world", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(torch.load(out), plain(**ids).logits, atol=1e-6)


def test_language_model_error_is_exported():
    assert seethrough.LanguageModelError is LanguageModelError
    assert "LanguageModelError" in seethrough.__all__
    assert issubclass(LanguageModelError, seethrough.SeethroughError)


def test_a_model_the_server_does_not_serve_names_what_it_serves(gpt2_dir, closed_hub):
    with testing.ServerProcess({"gpt2": str(gpt2_dir)}, args=["--threads", "1"]) as server:
        with pytest.raises(ModelNotServedError) as info:
            LanguageModel("nosuch", host=server.url)
        assert "serves: 'gpt2'" in str(info.value) and "remote_name=" in str(info.value)
        served = LanguageModel("gpt2", host=server.url)  # its description lands in the session's cache
        assert served.config.n_layer == 2
        remote_models = offline.cache_dir() / "remote-models"
        assert remote_models.is_dir() and not str(remote_models).startswith(str(Path.home()))
        # A local folder still loads locally when the server has no model by its name.
        model = LanguageModel(str(gpt2_dir), host=server.url)
        assert model.config.n_layer == 2


def test_serve_without_models_serves_the_bundled_one():
    settings = parse_args([])
    assert [(spec.name, spec.source) for spec in settings.models] == [("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")]
    assert DEFAULT_SERVED == "smollm2=HuggingFaceTB/SmolLM2-135M-Instruct"
    help_text = subprocess.run([sys.executable, "-m", "seethrough", "serve", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "bundled" in help_text and "--log-level" in help_text and "how much the server logs" in help_text


def test_ctrl_c_stops_the_server_with_one_line(gpt2_dir, tmp_path):
    port = testing.free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "seethrough", "serve", "--model", f"gpt2={gpt2_dir}",
                                "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=takes_ctrl_c)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("Uvicorn running" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        started = len(lines)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    after = "".join(lines[started:])
    assert "Traceback" not in after and "CancelledError" not in after, after
    assert "seethrough serve: stopped" in after
