"""``remote=True`` end to end: the same code locally and on a real server gives the same values.

The server is the one ``tests/test_server.py`` starts (a random GPT-2 folder
and SmolLM2 cut to 4 layers, on a loopback port; shared for the session).
Each test runs a trace, generation or session locally and remotely with the
same body and compares saved values, their types and shapes.  Torch runs
with one thread on both sides, so values are bitwise identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.remote import protocol
from seethrough.models import remote_model
from seethrough.remote.client import RemoteAuthError, RemoteConnectionError, RemoteRequestError, job
from seethrough.remote.server import testing
from test_server import ALICE, BOB, server  # noqa: F401 - the shared server fixtures
from fixtures.threads import one_thread  # noqa: F401 - autouse: the server's one torch thread

pytestmark = [pytest.mark.timeout(300)]



def served(path, name: str) -> LanguageModel:
    model = LanguageModel(str(path))
    object.__setattr__(model, "_remote_name", name)  # the name the server serves this folder under
    return model


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> LanguageModel:
    return served(gpt2_dir, "gpt2")


@pytest.fixture(scope="module")
def smollm2(smollm2_small_dir) -> LanguageModel:
    return served(smollm2_small_dir, "smollm2")


@pytest.fixture(params=["gpt2", "smollm2"])
def lm(request) -> LanguageModel:
    return request.getfixturevalue(request.param)


def on(server_process) -> dict:
    return {"remote": True, "host": server_process.url, "api_key": ALICE}


def assert_same(local, remote, where: str = "value") -> None:
    """Same type, same structure, bitwise-equal tensors."""
    assert type(remote) is type(local), f"{where}: {type(remote)} != {type(local)}"
    if isinstance(local, torch.Tensor):
        assert remote.shape == local.shape and remote.dtype == local.dtype, where
        assert torch.equal(remote, local), f"{where}: values differ"
    elif isinstance(local, dict):
        assert list(remote) == list(local), where
        for key in local:
            assert_same(local[key], remote[key], f"{where}[{key!r}]")
    elif isinstance(local, (list, tuple)):
        assert len(remote) == len(local), where
        for i, (a, b) in enumerate(zip(local, remote)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert remote == local, where


def double_last(hidden):
    """A helper defined in the test module and called from remote bodies."""
    return hidden[:, -1] * 2


# -- same values -----------------------------------------------------------------------------------


def trace_body(model, options):
    with model.trace("The Eiffel Tower is in", **options):
        first = model.layers[0].output.save()
        model.layers[1].output[:, -1] = 0
        out = model.output.save()
        last = out.logits[:, -1].argmax(-1).save()
        shapes = [tuple(first.shape), "edited"]
    return first, out, last, shapes


def test_trace_gives_identical_values(server, lm):
    local = trace_body(lm, {})
    remote = trace_body(lm, on(server))
    for name, a, b in zip(("first", "last", "shapes"), (local[0], *local[2:]), (remote[0], *remote[2:])):
        assert_same(a, b, name)
    # The model output comes back as the same class, with every field that can travel
    # (the KV cache object stays on the server).
    assert type(remote[1]) is type(local[1])
    assert set(remote[1].keys()) == set(local[1].keys()) - {"past_key_values", "cache"}
    assert_same(local[1].logits, remote[1].logits, "out.logits")


def prefetch_body(model, options):
    """Runs of plain saves (compiled as one batch, tracing/prefetch.py), remote or not."""
    with model.trace("The Eiffel Tower is in", **options):
        first_in = model.layers[0].input.save()
        first = model.layers[0].output.save()
        rest = [model.layers[i].output.save() for i in range(1, 2)]
        blocks = [layer.output.save() for layer in model.layers[2:]]
    return first_in, first, rest, blocks


def test_runs_of_saves_give_identical_values(server, lm):
    local = prefetch_body(lm, {})
    remote = prefetch_body(lm, on(server))
    for name, a, b in zip(("first_in", "first", "rest", "blocks"), local, remote):
        assert_same(a, b, name)
    assert len(remote[2]) == 1


def invokes_body(model, options):
    with model.trace(**options) as tracer:
        with tracer.invoke("Hello"):
            short = model.layers[0].output.save()
        with tracer.invoke("A much longer prompt than the first one"):
            long = model.layers[0].output.save()
            logits = model.output.logits.save()
    return short, long, logits


def test_batched_invokes_give_identical_values(server, lm):
    local = invokes_body(lm, {})
    remote = invokes_body(lm, on(server))
    for name, a, b in zip(("short", "long", "logits"), local, remote):
        assert_same(a, b, name)
    assert remote[0].shape[0] == remote[1].shape[0] == remote[2].shape[0] == 1  # each invoke sees its own row


def generate_body(model, options):
    with model.generate("Once upon a time", max_new_tokens=4, do_sample=False, **options) as tracer:
        steps = []
        for step in tracer.iter[:]:
            steps.append(model.layers[-1].output[:, -1].save())
        tokens = tracer.result.save()
    return steps, tokens, tracer.result


def test_generation_gives_identical_values(server, lm):
    local = generate_body(lm, {})
    remote = generate_body(lm, on(server))
    assert len(remote[0]) == 4
    for name, a, b in zip(("steps", "tokens", "tracer.result"), local, remote):
        assert_same(a, b, name)


def session_body(model, options):
    with model.session(**options):
        with model.trace("The cat sat on the"):
            donor = model.layers[0].output[:, -1].save()
        with model.trace("A dog ran to the"):
            model.layers[0].output[:, -1] = donor
            patched = model.output.logits[:, -1].save()
    return donor, patched


def test_session_gives_identical_values(server, lm):
    local = session_body(lm, {})
    remote = session_body(lm, on(server))
    for name, a, b in zip(("donor", "patched"), local, remote):
        assert_same(a, b, name)


def test_variables_and_helper_functions_travel(server, gpt2):
    steer = torch.linspace(-1, 1, 32)
    scale = 0.5

    def body(options):
        with gpt2.trace("Steering vectors", **options):
            gpt2.layers[0].output[:, -1] += steer * scale
            doubled = double_last(gpt2.layers[1].output).save()
        return doubled

    assert_same(body({}), body(on(server)), "doubled")


# -- prints, errors --------------------------------------------------------------------------------


def test_print_in_the_body_is_streamed_back(server, gpt2, capsys):
    with gpt2.trace("Hello world", **on(server)):
        hidden = gpt2.layers[0].output
        print("shape", tuple(hidden.shape))
        for i in range(3):
            print("line", i)
    out = capsys.readouterr().out
    assert "shape (1, 2, 32)\nline 0\nline 1\nline 2\n" in out


def test_prints_arrive_while_the_body_still_runs(server, gpt2, monkeypatch):
    arrivals: list[tuple[float, str]] = []

    class Recorder:
        def write(self, text: str) -> int:
            if text.strip():
                arrivals.append((time.monotonic(), text.strip()))
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    with gpt2.trace("Hello world", **on(server)):
        print("early")
        total = 0
        for i in range(5_000_000):  # a few tenths of a second between the two prints
            total = total + i
        print("late")
    done = time.monotonic()
    texts = [text for _, text in arrivals]
    assert texts.index("early") < texts.index("late")
    early = next(moment for moment, text in arrivals if text == "early")
    late = next(moment for moment, text in arrivals if text == "late")
    # printed at the end in one batch, both lines would arrive within a millisecond
    assert late - early > 0.05 and done - early > 0.05, (late - early, done - early)


def test_errors_keep_their_type_and_show_the_users_line(server, gpt2):
    with pytest.raises(ValueError) as info:
        with gpt2.trace("Hello", **on(server)):
            hidden = gpt2.layers[0].output
            raise ValueError(f"bad hidden state of shape {tuple(hidden.shape)}")
    message = str(info.value)
    assert "bad hidden state of shape (1, 1, 32)" in message
    assert f"{__file__}:" in message and "raise ValueError" in message


def test_library_errors_keep_their_type(server, gpt2):
    with pytest.raises(IndexError):
        with gpt2.trace("Hello", **on(server)):
            gpt2.layers[0].output[0, 99, 0] = 1


def test_sandbox_refusals_say_where(server, gpt2):
    with pytest.raises(RemoteRequestError) as info:
        with gpt2.trace("Hello", **on(server)):
            hidden = gpt2.layers[0].output.save()
            grand = hidden.__class__
    assert "sandbox" in str(info.value) and "__class__" in str(info.value) and __file__ in str(info.value)


# -- jobs, configuration, versions -------------------------------------------------------------------


def test_non_blocking_returns_a_job_that_another_process_can_fetch(server, gpt2):
    with gpt2.trace("Non-blocking", **on(server), blocking=False) as tracer:
        hidden = gpt2.layers[1].output.save()
    assert tracer.job is not None and tracer.job.id
    values = tracer.job.result()
    with gpt2.trace("Non-blocking"):
        expected = gpt2.layers[1].output.save()
    assert torch.equal(values["hidden"], expected)
    script = textwrap.dedent("""
        import sys
        from seethrough.remote.client.connection import job
        values = job(sys.argv[1], host=sys.argv[2], api_key=sys.argv[3]).result()
        print(repr(values["hidden"].double().sum().item()))
    """)
    fetched = subprocess.run([sys.executable, "-c", script, tracer.job.id, server.url, ALICE],
                             capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == repr(expected.double().sum().item())
    with pytest.raises(RemoteRequestError, match="no request with id"):  # another key's: as if it did not exist
        job(tracer.job.id, host=server.url, api_key=BOB).result()


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_a_model_built_from_the_server_description_traces_remotely(server, name, request, monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path))
    local = request.getfixturevalue(name)
    model = remote_model(name, host=server.url, api_key=ALICE)
    assert not model.dispatched and repr(model).startswith("  # weights not loaded")
    assert [path for path, _ in model._model.named_modules()] == [path for path, _ in local._model.named_modules()]
    expected = trace_body(local, {})
    got = trace_body(model, on(server))
    assert_same(expected[0], got[0], "first")
    assert_same(expected[1].logits, got[1].logits, "logits")
    with pytest.raises(RemoteRequestError, match="serves: 'gpt2', 'smollm2'"):
        remote_model("nope", host=server.url, api_key=ALICE)


def plain_first_block(folder, text: str) -> torch.Tensor:
    """Reference: block 0's output on a plain HuggingFace forward, read by a raw hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    seen = []
    handle = hf.transformer.h[0].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hf(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen[0]


def test_config_host_and_key_are_used(server, gpt2, gpt2_dir, monkeypatch):
    monkeypatch.setattr(seethrough.CONFIG.API, "HOST", server.url)
    monkeypatch.setattr(seethrough.CONFIG.API, "APIKEY", ALICE)
    with gpt2.trace("Configured", remote=True):
        hidden = gpt2.layers[0].output.save()
    assert hidden.shape[-1] == 32
    torch.testing.assert_close(hidden, plain_first_block(gpt2_dir, "Configured"), atol=1e-5, rtol=1e-5)


def test_per_call_host_overrides_config(server, gpt2, gpt2_dir, monkeypatch):
    monkeypatch.setattr(seethrough.CONFIG.API, "HOST", f"http://127.0.0.1:{testing.free_port()}")
    monkeypatch.setattr(seethrough.CONFIG.API, "APIKEY", ALICE)
    with pytest.raises(RemoteConnectionError, match="cannot reach"):
        with gpt2.trace("Nowhere", remote=True):
            hidden = gpt2.layers[0].output.save()
    with gpt2.trace("Somewhere", remote=True, host=server.url):
        hidden = gpt2.layers[0].output.save()
    assert hidden.shape[-1] == 32
    torch.testing.assert_close(hidden, plain_first_block(gpt2_dir, "Somewhere"), atol=1e-5, rtol=1e-5)


def test_environment_variables_are_used(server, gpt2_dir, tmp_path):
    script = tmp_path / "env_client.py"
    script.write_text(textwrap.dedent(f"""
        from seethrough import LanguageModel
        model = LanguageModel({str(gpt2_dir)!r})
        object.__setattr__(model, "_remote_name", "gpt2")
        with model.trace("From the environment", remote=True):
            hidden = model.transformer.h[0].output.save()
        print(tuple(hidden.shape))
    """))
    env = {key: value for key, value in os.environ.items() if not key.startswith("SEETHROUGH_")}
    env.update(SEETHROUGH_HOST=server.url, SEETHROUGH_API_KEY=ALICE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(", 32)"), done.stdout


def test_missing_and_wrong_keys_raise_auth_errors(server, gpt2):
    for key in (None, "wrong"):
        with pytest.raises(RemoteAuthError):
            with gpt2.trace("Hello", remote=True, host=server.url, api_key=key or ""):
                hidden = gpt2.layers[0].output.save()


def test_protocol_mismatch_names_both_versions(server, gpt2, monkeypatch):
    monkeypatch.setattr(protocol, "PROTOCOL", 2)
    with pytest.raises(RemoteRequestError) as info:
        with gpt2.trace("Hello", **on(server)):
            hidden = gpt2.layers[0].output.save()
    message = str(info.value)
    assert "server speaks seethrough protocol 1 (seethrough 0.1.0)" in message
    assert "client sent protocol 2 (seethrough 0.1.0)" in message


def test_language_model_with_host_uses_the_served_model(server, gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path))
    model = seethrough.LanguageModel("gpt2", host=server.url, api_key=ALICE)
    assert not model.dispatched
    with pytest.raises(seethrough.SeethroughError, match="only on the seethrough server"):
        model.dispatch()
    monkeypatch.setattr(seethrough.CONFIG.API, "APIKEY", ALICE)
    with model.trace("Hello there", remote=True):
        hidden = model.transformer.h[0].output.save()
    with gpt2.trace("Hello there"):
        expected = gpt2.transformer.h[0].output.save()
    assert torch.equal(hidden, expected)
