"""``remote="local"``: the remote path (wire, server intake, sandbox, execution, model check) in-process.

Valid bodies give what ``remote=False`` gives, which is checked against plain
HuggingFace forwards with raw hooks; bodies a server refuses fail with the
errors the client raises for a real server (see ``tests/test_remote.py``).
No server runs here: nothing listens, nothing is submitted.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import seethrough
from seethrough import LanguageModel
from seethrough.errors import ModulePathError, SeethroughError, WeightsModifiedError
from seethrough.remote.client.connection import RemoteRequestError
from seethrough.remote.server.sandbox import SandboxViolation
from fixtures.models import assert_pristine, hook_state
from fixtures.threads import one_thread  # noqa: F401 - autouse: the server's one torch thread



@pytest.fixture
def gpt2(tiny_gpt2, gpt2_tokenizer) -> LanguageModel:
    return LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer)


@pytest.fixture
def smollm2(smollm2_small) -> LanguageModel:
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer)


def raw_outputs(module: nn.Module, names: list[str], **inputs) -> tuple[object, dict]:
    """Reference: a plain forward with raw hooks recording the named modules' outputs."""
    seen = {}
    handles = [module.get_submodule(name).register_forward_hook(
        lambda m, a, o, name=name: seen.setdefault(name, o)) for name in names]
    try:
        with torch.no_grad():
            out = module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def first(value):
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_a_trace_gives_what_a_local_trace_and_raw_hooks_give(which, request):
    model = request.getfixturevalue(which)
    layers = model.layers
    before = hook_state(model._model)
    prompt = "The Eiffel Tower is in"
    with model.trace(prompt, remote="local") as tracer:
        first(layers[0].output)[:, -1] = 0
        hidden = layers[1].output.save()
        logits = model.output.logits.save()
        shape = tuple(first(hidden).shape)
    with model.trace(prompt):
        first(layers[0].output)[:, -1] = 0
        hidden_local = layers[1].output.save()
        logits_local = model.output.logits.save()

    path = "transformer.h" if which == "gpt2" else "model.layers"
    hf = model._model

    def zero_last(module, args, output):
        first(output)[:, -1] = 0

    handle = hf.get_submodule(f"{path}.0").register_forward_hook(zero_last)
    try:
        out, seen = raw_outputs(hf, [f"{path}.1"], **model.tokenizer(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    assert type(hidden) is type(hidden_local) and type(logits) is torch.Tensor
    assert torch.equal(first(hidden), first(hidden_local)) and torch.equal(first(hidden), first(seen[f"{path}.1"]))
    assert torch.equal(logits, logits_local) and torch.equal(logits, out.logits)
    assert shape == tuple(first(hidden).shape)
    assert tracer.job is None  # nothing was submitted anywhere
    assert hook_state(hf) == before


def test_invokes_generation_and_sessions_match_remote_false(gpt2):
    def run(remote):
        with gpt2.trace(remote=remote) as tracer:
            with tracer.invoke("The cat sat on the"):
                cat = gpt2.layers[1].output.save()
            with tracer.invoke("A dog"):
                gpt2.layers[1].output[:, -1] = cat[:, -1]
                dog = gpt2.lm_head.output.save()
        with gpt2.generate("Once upon a time", max_new_tokens=3, do_sample=False, remote=remote) as tracer:
            steps = []
            for step in tracer.iter[:]:
                steps.append(gpt2.lm_head.output[0, -1].argmax().save())
            tokens = tracer.result.save()
        with gpt2.session(remote=remote):
            with gpt2.trace("Hi there"):
                early = gpt2.layers[0].output.save()
            with gpt2.trace("Hi there"):
                gpt2.layers[0].output[:] = early * 2
                late = gpt2.lm_head.output.save()
        return cat, dog, steps, tokens, early, late, tracer.result

    local, remote = run(False), run("local")
    for a, b in zip(local, remote):
        if isinstance(a, list):
            assert [int(x) for x in a] == [int(x) for x in b]
        else:
            assert type(a) is type(b) and torch.equal(a, b)
    ids = gpt2.tokenizer("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        reference = gpt2._model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(remote[3], reference) and torch.equal(remote[6], reference)


def test_a_plain_module_runs_locally_remote(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x, remote="local"):
        hidden = model.fc1.output.save()
        model.act.output[:] = 0
        out = model.output.save()
    with torch.no_grad():
        assert torch.equal(hidden, mlp.fc1(x))
        assert torch.equal(out, mlp.fc2.bias.expand(2, 3))
    assert_pristine(mlp)


def test_the_served_name_is_the_wrappers_public_remote_name(mlp, gpt2_dir, tmp_path):
    # What the client addresses a server's model by: a module object has no name, a folder its real path.
    assert seethrough.Model(mlp).remote_name is None
    link = tmp_path / "link"
    link.symlink_to(gpt2_dir)
    assert LanguageModel(str(link)).remote_name == os.path.realpath(gpt2_dir)
    assert LanguageModel(str(link), remote_name="gpt2").remote_name == "gpt2"


def test_prints_and_helper_functions_travel(gpt2, capsys):
    with gpt2.trace("Hello", remote="local"):
        hidden = gpt2.layers[0].output
        print("norm", round(scale(hidden).norm().item(), 3))
        doubled = scale(hidden).save()
    printed = capsys.readouterr().out
    assert printed.startswith("norm ") and torch.equal(doubled, scale(first(gpt2_hidden(gpt2, "Hello"))))


def scale(tensor):
    return tensor * 2


def gpt2_hidden(model, prompt):
    _, seen = raw_outputs(model._model, ["transformer.h.0"], **model.tokenizer(prompt, return_tensors="pt"))
    return seen["transformer.h.0"]


# -- what a server refuses, refused the same way ----------------------------------------------------


def test_a_body_the_sandbox_refuses_fails_as_on_a_server(gpt2):
    with pytest.raises(RemoteRequestError) as info:
        with gpt2.trace("Hello", remote="local"):
            hidden = gpt2.layers[0].output.save()
            grand = hidden.__class__  # MARK-dunder
    message = str(info.value)
    assert "refused the request (400)" in message and "sandbox" in message and "__class__" in message
    assert __file__ in message and "line" in message


def test_a_helper_the_sandbox_refuses_fails_before_running(gpt2):
    ran = []
    with pytest.raises(RemoteRequestError, match="helper function `peek`.*sandbox.*`open`"):
        with gpt2.trace("Hello", remote="local"):
            ran.append(1)
            peek(gpt2.layers[0].output)
    assert ran == []  # refused at intake: the body never ran


def peek(tensor):
    with open("/etc/hostname") as handle:
        return handle.read()


def test_run_time_sandbox_rules_apply(gpt2):
    with pytest.raises(SandboxViolation, match="torch.hub"):
        with gpt2.trace("Hello", remote="local"):
            hub = torch.hub


def test_names_only_your_wrapper_has_fail_as_on_a_server(tiny_gpt2, gpt2_tokenizer):
    model = LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer, rename={"transformer.h": "blocks"})
    with model.trace("Hello"):
        fine = model.blocks[0].output.save()
    with pytest.raises(ModulePathError, match="blocks") as info:
        with model.trace("Hello", remote="local"):
            model.blocks[0].output.save()  # MARK-rename
    assert "remote run" in str(info.value)


def test_errors_keep_their_type_and_line(gpt2):
    with pytest.raises(ValueError) as info:
        with gpt2.trace("Hello", remote="local"):
            hidden = gpt2.layers[0].output
            raise ValueError(f"bad shape {tuple(hidden.shape)}")
    assert "bad shape (1, 1, 32)" in str(info.value) and f"{__file__}:" in str(info.value)


def test_a_body_that_changes_weights_is_reported(gpt2):
    saved = {name: value.clone() for name, value in gpt2._model.state_dict().items()}
    try:
        with pytest.raises(SandboxViolation, match="writing into a weight"):  # refused by the allowlist
            with gpt2.trace("Hello", remote="local"):
                with torch.no_grad():
                    gpt2.transformer.h[0].mlp.c_fc.weight[0, 0] = 5.0
        with pytest.raises(SandboxViolation, match="`.data` of a Parameter"):
            with gpt2.trace("Hello", remote="local"):
                for parameter in gpt2.transformer.h[0].mlp.c_fc.parameters():
                    parameter.data[0] = 5.0
        assert all(torch.equal(value, saved[name]) for name, value in gpt2._model.state_dict().items())
        with pytest.raises(WeightsModifiedError, match="a server would discard its results.*c_fc.bias"):
            with gpt2.trace("Hello", remote="local"):  # past the allowlist: seen by the server's model check
                with torch.no_grad():
                    for parameter in gpt2.transformer.h[0].mlp.c_fc.parameters():
                        torch.add(parameter, 5.0, out=parameter)
    finally:
        gpt2._model.load_state_dict(saved)


def test_gradients_on_your_parameters_are_left_as_they_were(mlp):
    model = seethrough.Model(mlp)
    mlp(torch.randn(1, 4)).sum().backward()
    grads = {name: p.grad.clone() for name, p in mlp.named_parameters()}
    with model.trace(torch.randn(3, 4), remote="local"):
        out = model.output.save()
    assert {name: p.grad for name, p in mlp.named_parameters()}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[name]) for name, p in mlp.named_parameters())


def test_options_that_need_a_server_are_refused(gpt2):
    with pytest.raises(SeethroughError, match="host=.*do not apply"):
        gpt2.trace("Hello", remote="local", host="http://127.0.0.1:1")
    with pytest.raises(SeethroughError, match="host=.*do not apply"):
        gpt2.generate("Hello", remote="local", blocking=False)
    with pytest.raises(SeethroughError, match="remote='server'"):
        gpt2.trace("Hello", remote="server")


def test_a_custom_envoy_property_is_explained_as_client_side_only(tiny_gpt2, gpt2_tokenizer):
    class Doubling(seethrough.Envoy):
        @property
        def doubled(self):
            return self.output * 2

    model = LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer, envoys={"mlp": Doubling})
    with model.trace("Hello"):
        local = model.transformer.h[0].mlp.doubled.save()
    with pytest.raises(ModulePathError, match="defined by your envoy class Doubling.*runs only on your machine"):
        with model.trace("Hello", remote="local"):
            model.transformer.h[0].mlp.doubled.save()
    with model.trace("Hello", remote="local"):  # the same value, computed in the body
        remote = (model.transformer.h[0].mlp.output * 2).save()
    assert torch.equal(local, remote)
