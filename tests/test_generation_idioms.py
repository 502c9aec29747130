"""nnsight's generation idioms (issue 7, section 3), checked against plain
HuggingFace ``generate`` / forward, with raw forward hooks where a body edits:

* ``model.generator.output`` in ``model.generate(...)``: the generated ids;
* ``with tracer.all():`` / ``with tracer.iter[...]:`` behave like the ``for`` forms;
* ``model.trace(x, trace=False)`` returns the model's output without a body;
* the multi-token generation tutorial workflow on SmolLM2.
"""

from __future__ import annotations

import re

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.errors import NotInTraceError, SeethroughError
from seethrough.models.language import LanguageModelError

from fixtures.models import MLP, hf_generate
from fixtures.threads import single_thread

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer




# -- model.generator.output ----------------------------------------------------------------------


def test_generator_output_is_the_generated_ids(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=6) as tracer:
            out = model.generator.output.save()
    expected = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=6)
    assert torch.equal(out, expected)
    assert torch.equal(out, tracer.result)


def test_generator_output_after_a_bounded_step_loop(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5) as tracer:
            tokens = list().save()
            for step in tracer.iter[1:3]:
                tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
            output = model.generator.output.save()
    expected = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=5)
    assert torch.equal(output, expected)
    new = expected[0, -5:]
    assert [int(t) for t in tokens] == new[1:3].tolist()


def test_generator_output_per_invoke_is_that_invokes_rows(smol):
    model, hf, tokenizer = smol
    prompts = ["Hi", PROMPT]
    with torch.no_grad():
        with model.generate(max_new_tokens=4) as tracer:
            rows = []
            for prompt in prompts:
                with tracer.invoke(prompt):
                    rows.append(model.generator.output.save())
    batched = hf_generate(hf, tokenizer, prompts, max_new_tokens=4)
    for index, (prompt, row) in enumerate(zip(prompts, rows)):
        assert row.shape[0] == 1
        assert torch.equal(row[0], batched[index]), prompt


def test_generator_output_outside_generate_is_a_clear_error(smol):
    model, _, _ = smol
    with pytest.raises(LanguageModelError, match=r"only in `model.generate"):
        with model.trace(PROMPT):
            ids = model.generator.output.save()
    with pytest.raises(NotInTraceError, match="outside a trace"):
        model.generator.output


def test_generator_output_inside_a_step_loop_is_a_clear_error(smol):
    model, _, _ = smol
    with pytest.raises(LanguageModelError, match="inside a loop over generation steps"):
        with model.generate(PROMPT, max_new_tokens=3) as tracer:
            for step in tracer.iter[:]:
                ids = model.generator.output.save()
    with pytest.raises(LanguageModelError, match="inside a loop over generation steps"):
        with model.generate(PROMPT, max_new_tokens=3) as tracer:
            with tracer.all():
                ids = model.generator.output.save()
    with torch.no_grad():  # after a loop left with `break`, it is fine again
        with model.generate(PROMPT, max_new_tokens=3) as tracer:
            for step in tracer.iter[:]:
                break
            ids = model.generator.output.save()
    assert ids.shape[1] > 3


def test_generator_output_before_the_step_loop_names_the_real_cause(smol):
    model, _, _ = smol

    def by_generator_output():
        with torch.no_grad(), model.generate(PROMPT, max_new_tokens=3) as tracer:
            out = model.generator.output.save()
            for step in tracer.iter[:]:
                model.model.layers[1].output[:, -1] += 1

    def by_result():
        with torch.no_grad(), model.generate(PROMPT, max_new_tokens=3) as tracer:
            out = tracer.result.save()
            for step in tracer.iter[:]:
                model.model.layers[1].output[:, -1] += 1

    for what, body in (("model.generator.output", by_generator_output), ("tracer.result", by_result)):
        with pytest.raises(seethrough.errors.OutOfOrderError) as caught:
            body()
        message = str(caught.value)
        assert "`model.model.layers[1].output` was asked for" in message
        assert re.search(rf"this body read `{re.escape(what)}` earlier \(at \S*test_generation_idioms\.py:\d+", message)
        assert "waits until the whole run (all of generation) has ended" in message
        assert f"Read `{what}` after the loop over steps" in message
        assert f"    out = {what}.save()" in message


# -- with tracer.all() / with tracer.iter[...] ---------------------------------------------------


def test_with_all_and_with_iter_steer_every_step_like_a_hook(smol):
    model, hf, tokenizer = smol
    torch.manual_seed(1)
    steer = torch.randn(576) * 4
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=6) as tracer:
            with tracer.all():
                model.model.layers[1].output[:] += steer
            after = True
        by_all = tracer.result
        with model.generate(PROMPT, max_new_tokens=6) as tracer:
            with tracer.iter[:]:
                model.model.layers[1].output[:] += steer
        by_iter = tracer.result
        with model.generate(PROMPT, max_new_tokens=6) as tracer:
            for step in tracer.iter[:]:
                model.model.layers[1].output[:] += steer
        by_loop = tracer.result
    expected = hf_generate(hf, tokenizer, [PROMPT], hook=lambda m, a, o: o + steer, max_new_tokens=6)
    plain = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=6)
    assert after is True  # code after the block ran once generation ended
    assert torch.equal(by_all, expected) and torch.equal(by_iter, expected) and torch.equal(by_loop, expected)
    assert not torch.equal(expected, plain)


def test_in_place_steering_with_a_grad_vector_in_two_invokes_like_a_hook(smol):
    # No torch.no_grad() around the trace, a steering vector that requires grad: the
    # edits run in generate's no_grad mode, as nnsight's do (not "a view was created
    # in no_grad mode and is being modified inplace with grad mode enabled").
    model, hf, tokenizer = smol
    torch.manual_seed(0)
    v = (torch.randn(576) * 8).requires_grad_()
    prompts = [PROMPT, "Hello, my name is"]
    with model.generate(max_new_tokens=3) as tracer:
        for prompt in prompts:
            with tracer.invoke(prompt):
                for step in tracer.iter[:3]:
                    model.model.layers[2].output[:, -1] += v
    assert torch.is_grad_enabled()

    def hook(module, args, output):
        output[:, -1] += v

    expected = hf_generate(hf, tokenizer, prompts, hook=hook, hook_layer=2, max_new_tokens=3)
    plain = hf_generate(hf, tokenizer, prompts, max_new_tokens=3)
    assert torch.equal(tracer.result, expected)
    assert not torch.equal(expected, plain)  # the steering changed the tokens


def test_with_iter_slice_binds_the_step_and_acts_only_there(smol):
    model, hf, tokenizer = smol
    steer = torch.full((576,), 3.0)
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5) as tracer:
            seen = [].save()
            with tracer.iter[2:] as step:
                seen.append(step)
                model.model.layers[1].output[:] += steer
    calls = []

    def from_third_call(module, args, output):
        calls.append(1)
        return output + steer if len(calls) >= 3 else output

    expected = hf_generate(hf, tokenizer, [PROMPT], hook=from_third_call, max_new_tokens=5)
    assert seen == [2, 3, 4]
    assert torch.equal(tracer.result, expected)


def test_with_all_collects_per_step_logits_like_hf_scores(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=4) as tracer:
            logits = list().save()
            with tracer.all():
                logits.append(model.lm_head.output[:, -1])
    reference = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=4, return_dict_in_generate=True, output_logits=True)
    assert len(logits) == 4
    for got, want in zip(logits, reference.logits):
        assert torch.allclose(got, want, atol=1e-4)


def test_with_all_inside_a_function_writes_its_names_back(smol):
    model, _, _ = smol

    def count_steps():
        with torch.no_grad():
            with model.generate(PROMPT, max_new_tokens=3) as tracer:
                count = 0
                with tracer.all() as step:
                    count = count + 1
                    last = step
        return count, last

    assert count_steps() == (3, 2)


def test_with_iter_outside_its_trace_is_a_clear_error(smol):
    model, _, _ = smol
    with model.generate(PROMPT, max_new_tokens=1) as tracer:
        pass
    with pytest.raises(SeethroughError, match="outside its trace body"):
        with tracer.all():
            pass


# -- trace=False ---------------------------------------------------------------------------------


def test_trace_false_returns_the_plain_forward_output(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        out = model.trace(PROMPT, trace=False)
        reference = hf(**tokenizer(PROMPT, return_tensors="pt"))
    assert type(out) is type(reference)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)


def test_trace_false_on_any_module():
    torch.manual_seed(0)
    net = MLP()
    x = torch.randn(2, 4)
    out = seethrough.Model(net).trace(x, trace=False)
    with torch.no_grad():
        assert torch.equal(out.detach(), net(x))
    assert not net._forward_hooks and not net._forward_pre_hooks


def test_trace_false_refuses_remote_and_missing_input(smol):
    model, _, _ = smol
    with pytest.raises(SeethroughError, match="does not combine with `remote=True`"):
        model.trace(PROMPT, trace=False, remote=True)
    with pytest.raises(SeethroughError, match="needs the input"):
        model.trace(trace=False)


# -- tutorial: multi-token generation (nnsight's "multiple token generation" workflow) -----------


def test_tutorial_multi_token_generation_on_smollm2(smollm2_full):
    """Generate with the full SmolLM2, keep each step's logits in a saved list
    and the ids from ``model.generator.output``; compare with HF generate."""
    hf, tokenizer = smollm2_full
    model = LanguageModel(hf, tokenizer=tokenizer)
    prompt = "The Eiffel Tower is in the city of"
    steps = 3
    with torch.no_grad():
        with model.generate(prompt, max_new_tokens=steps) as tracer:
            logits = list().save()
            hidden = list().save()
            for step in tracer.iter[:]:
                hidden.append(model.model.layers[-1].output[0, -1])
                logits.append(model.lm_head.output[0, -1])
            out = model.generator.output.save()
    reference = hf_generate(hf, tokenizer, [prompt], max_new_tokens=steps, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out, reference.sequences)
    assert len(logits) == len(hidden) == steps
    for got, want in zip(logits, reference.logits):
        assert torch.allclose(got, want[0], atol=1e-4)
    # Each step's argmax is the token generate chose next.
    assert [int(l.argmax()) for l in logits] == reference.sequences[0, -steps:].tolist()
    answer = tokenizer.decode(out[0, -steps:])
    assert "Paris" in answer


# -- remote: the same idioms on a server ---------------------------------------------------------

from test_server import ALICE, server  # noqa: E402,F401 - the shared server fixtures


def _idioms_body(model, options):
    steer = torch.full((576,), 2.0)
    with model.generate("Once upon a time", max_new_tokens=3, do_sample=False, **options) as tracer:
        logits = list().save()
        with tracer.all():
            model.model.layers[1].output[:] += steer
            logits.append(model.lm_head.output[:, -1])
        ids = model.generator.output.save()
    return ids, logits


@pytest.mark.timeout(300)
def test_idioms_remotely_equal_local(server, smollm2_small_dir):
    with single_thread():  # the server's workers run with one thread: bitwise-equal values
        model = LanguageModel(str(smollm2_small_dir))
        object.__setattr__(model, "_remote_name", "smollm2")
        local = _idioms_body(model, {})
        remote = _idioms_body(model, {"remote": True, "host": server.url, "api_key": ALICE})
    assert torch.equal(remote[0], local[0]) and local[0].shape[1] > 3
    assert len(local[1]) == len(remote[1]) == 3
    for a, b in zip(local[1], remote[1]):
        assert torch.equal(a, b)
