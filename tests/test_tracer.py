"""Traces on real models, checked against raw PyTorch forward hooks.

Covers reading `.output` / `.input` / `.inputs`, edits (assignment, in-place,
skip, stop), modules called several times, and that the model is left
exactly as it was — also after a trace that raised.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine, assert_same_state, hook_state, record_outputs, state_snapshot


def test_mlp_outputs_match_raw_hooks(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(5, 4)
    ref_out, seen = record_outputs(mlp, ["fc1", "act", "fc2"], x)
    with torch.no_grad():
        with model.trace(x):
            fc1 = model.fc1.output.save()
            act = model.act.output.save()
            out = model.output.save()
    assert torch.equal(fc1, seen["fc1"][0])
    assert torch.equal(act, seen["act"][0])
    assert torch.equal(out, ref_out)
    assert_pristine(mlp)


def test_inputs_and_input(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x):
        root_in = model.input.save()
        first = model.fc2.input.save()
        args_kwargs = model.fc2.inputs.save()
    ref_in = torch.relu(mlp.fc1(x)).detach()
    assert torch.allclose(first, ref_in)
    args, kwargs = args_kwargs
    assert isinstance(args, tuple) and kwargs == {}
    assert torch.allclose(args[0], ref_in)
    assert torch.equal(root_in, x)


def test_cnn_edit_in_place_matches_hook_reference(cnn):
    model = seethrough.Model(cnn)
    x = torch.randn(2, 3, 8, 8)

    def zero_channel(module, args, output):
        output = output.clone()
        output[:, 1] = 0
        return output

    handle = cnn.conv1.register_forward_hook(zero_channel)
    with torch.no_grad():
        expected = cnn(x)
    handle.remove()

    with torch.no_grad():
        with model.trace(x):
            model.conv1.output[:, 1] = 0
            out = model.output.save()
    assert torch.allclose(out, expected)
    with torch.no_grad():
        assert not torch.allclose(cnn(x), expected)  # the edit did not persist
    assert_pristine(cnn)


def test_assignment_replaces_output(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    replacement = torch.ones(3, 8)
    with torch.no_grad():
        with model.trace(x):
            model.act.output = replacement
            out = model.output.save()
        expected = mlp.fc2(replacement)
    assert torch.allclose(out, expected)


def test_assignment_broadcasts_numbers_and_vectors(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with torch.no_grad():
        with model.trace(x):
            model.act.output = 0
            zero = model.output.save()
        with model.trace(x):
            model.act.output = torch.arange(8.0)
            vec = model.output.save()
        assert torch.allclose(zero, mlp.fc2(torch.zeros(3, 8)))
        assert torch.allclose(vec, mlp.fc2(torch.arange(8.0).expand(3, 8)))


def test_edited_value_is_seen_by_later_reads(mlp):
    model = seethrough.Model(mlp)
    with model.trace(torch.randn(2, 4)):
        model.fc1.output[:] = 1.0
        again = model.fc1.output.save()
    assert torch.equal(again, torch.ones(2, 8))


def test_skip_after_reading_the_modules_own_input(mlp):
    # nnterp's skip_layer: `h = layer.input`, then `layer.skip(h)` for that same call.
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with torch.no_grad():
        with model.trace(x):
            h = model.fc2.input
            model.fc2.skip(h)
            out = model.output.save()
    assert torch.equal(out, mlp.act(mlp.fc1(x)))  # fc2 passed its input through
    assert_pristine(mlp)


def test_skip_uses_value_and_does_not_run_module(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    calls = []
    handle = mlp.act.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.no_grad():
        with model.trace(x):
            model.act.skip(model.fc1.output)
            skipped = model.act.output.save()
            out = model.output.save()
        expected = mlp.fc2(mlp.fc1(x))
    handle.remove()
    assert torch.allclose(out, expected)
    assert torch.allclose(skipped, mlp.fc1(x))
    # Our pre-hook still ran (hooks run before forward), but ReLU's forward did not:
    assert (skipped < 0).any()
    assert_pristine(mlp)


def test_stop_ends_forward_early_and_keeps_saves(mlp):
    model = seethrough.Model(mlp)
    ran = []
    handle = mlp.fc2.register_forward_pre_hook(lambda m, a: ran.append(1))
    x = torch.randn(2, 4)
    with model.trace(x) as tracer:
        h = model.fc1.output.save()
        tracer.stop()
        after_stop = 1  # noqa: F841 - must not run
    handle.remove()
    assert torch.allclose(h, mlp.fc1(x))
    assert ran == []
    assert "after_stop" not in dir()


def test_rnn_cell_each_call_in_order(rnn_loop):
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 4, 3)
    _, seen = record_outputs(rnn_loop, ["cell"], x)
    with torch.no_grad():
        with model.trace(x):
            states = [model.cell.next().output.save() for _ in range(4)]
    assert len(states) == 4
    for got, want in zip(states, seen["cell"]):
        assert torch.equal(got, want)


def test_repeated_access_is_same_call_until_forward_moves(rnn_loop):
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 4, 3)
    _, seen = record_outputs(rnn_loop, ["cell"], x)
    with torch.no_grad():
        with model.trace(x):
            a = model.cell.output.save()
            b = model.cell.output.save()
            c = model.cell.next().output.save()
            d = model.cell.next(2).output.save()
    assert a is b
    assert torch.equal(a, seen["cell"][0])
    assert torch.equal(c, seen["cell"][1])
    assert torch.equal(d, seen["cell"][3])


# -- tracer.iter in one forward: step i is each module's call number i (as nnsight) ------


def _cell_calls(rnn_loop, x, edit_call=None):
    """Raw hooks: the cell's inputs and outputs per call, zeroing call `edit_call`'s output."""
    inputs, outputs, calls = [], [], [0]

    def pre(module, args):
        inputs.append(args[0].clone())

    def post(module, args, output):
        calls[0] += 1
        if calls[0] - 1 == edit_call:
            output = torch.zeros_like(output)
        outputs.append(output.clone())
        return output

    handles = [rnn_loop.cell.register_forward_pre_hook(pre), rnn_loop.cell.register_forward_hook(post)]
    try:
        with torch.no_grad():
            out = rnn_loop(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, out


def test_iter_in_one_forward_selects_each_call_of_a_repeated_module(rnn_loop):
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 3, 3)
    inputs, outputs, ref_out = _cell_calls(rnn_loop, x)
    assert len(outputs) == 3
    with torch.no_grad(), model.trace(x) as tracer:
        every = list().save()
        for step in tracer.iter[:3]:
            every.append(model.cell.output)
        out = model.out.output.save()  # after the loop: the usual reads again
    with torch.no_grad(), model.trace(x) as tracer:
        second = list().save()
        for step in tracer.iter[1]:
            second.append(model.cell.output)
    with torch.no_grad(), model.trace(x) as tracer:
        picked = list().save()
        for step in tracer.iter[[0, 2]]:
            picked.append((step, model.cell.output))
        ins = list().save()
    with torch.no_grad(), model.trace(x) as tracer:
        ins = list().save()
        for step in tracer.iter[1:3]:
            ins.append(model.cell.input)
    assert len(every) == 3 and all(torch.equal(a, b) for a, b in zip(every, outputs))
    assert torch.equal(out, ref_out)
    assert len(second) == 1 and torch.equal(second[0], outputs[1])
    assert [s for s, _ in picked] == [0, 2] and torch.equal(picked[0][1], outputs[0]) and torch.equal(picked[1][1], outputs[2])
    assert len(ins) == 2 and torch.equal(ins[0], inputs[1]) and torch.equal(ins[1], inputs[2])
    assert_pristine(rnn_loop)


def test_iter_in_one_forward_edits_reach_the_chosen_call(rnn_loop):
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 3, 3)
    _, outputs, ref_out = _cell_calls(rnn_loop, x, edit_call=1)
    _, plain, plain_out = _cell_calls(rnn_loop, x)
    with torch.no_grad(), model.trace(x) as tracer:
        seen = list().save()
        for step in tracer.iter[1:3]:
            if step == 1:
                model.cell.output[:] = 0
            seen.append(model.cell.output.clone())
        out = model.output.save()
    assert torch.equal(out, ref_out) and not torch.allclose(out, plain_out)
    assert torch.equal(seen[0], torch.zeros_like(outputs[1])) and torch.equal(seen[1], outputs[2])
    assert_pristine(rnn_loop)


def test_iter_past_the_calls_made(rnn_loop):
    # nnsight 0.8.1: a body that touches no module runs at every step asked for; one
    # that asks for a call the forward did not make ends the loop there, with a
    # warning, keeping what it saved, and the code after the loop does not run.
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 3, 3)
    _, outputs, _ = _cell_calls(rnn_loop, x)
    with torch.no_grad(), model.trace(x) as tracer:
        steps = list().save()
        for step in tracer.iter[:5]:
            steps.append(step)
    assert steps == [0, 1, 2, 3, 4]
    after = []
    with pytest.warns(UserWarning, match=r"`model.cell.output` of call 3 was asked for in a `tracer.iter` loop .*the loop ended there"):
        with torch.no_grad(), model.trace(x) as tracer:
            got = list().save()
            for step in tracer.iter[:5]:
                got.append(model.cell.output)
            after.append("ran")
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, outputs))
    assert after == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an open loop ends at the last call quietly
        with torch.no_grad(), model.trace(x) as tracer:
            every = list().save()
            for step in tracer.all():
                every.append(model.cell.output)
    assert len(every) == 3 and all(torch.equal(a, b) for a, b in zip(every, outputs))
    assert_pristine(rnn_loop)


def test_iter_in_one_forward_refuses_a_call_that_has_passed(rnn_loop):
    model = seethrough.Model(rnn_loop)
    x = torch.randn(2, 3, 3)
    with pytest.raises(seethrough.errors.OutOfOrderError, match=r"`model.cell.output` of call 0 .*had already made 2 call"):
        with torch.no_grad(), model.trace(x) as tracer:
            first = model.cell.output
            late = model.cell.next().output  # the second call
            for step in tracer.iter[0]:
                model.cell.output
    assert_pristine(rnn_loop)


def test_module_used_twice_edits_only_one_call(shared_twice):
    model = seethrough.Model(shared_twice)
    x = torch.randn(3, 6)
    _, seen = record_outputs(shared_twice, ["block"], x)
    with torch.no_grad():
        with model.trace(x):
            first = model.block.output.save()
            model.middle.output[:] = 0  # forward moves past the first call
            second = model.block.output.save()
            out = model.output.save()
        expected = shared_twice.head(shared_twice.block(torch.zeros(3, 6)))
    assert torch.equal(first, seen["block"][0])
    assert torch.allclose(second, shared_twice.block(torch.zeros(3, 6)))
    assert torch.allclose(out, expected)


def test_vit_hidden_states_match_hf(vit):
    model = seethrough.Model(vit)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = vit(pixel_values=pixels, output_hidden_states=True)
        hooks_before = hook_state(vit)  # HuggingFace keeps hooks of its own
        with model.trace(pixel_values=pixels):
            layer0 = model.layers[0].output.save()
            last = model.output.last_hidden_state.save()
    assert torch.allclose(layer0, ref.hidden_states[1], atol=1e-6)
    assert torch.allclose(last, ref.last_hidden_state, atol=1e-6)
    assert_pristine(vit, hooks_before)


def test_gpt2_blocks_and_logits(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    ids = torch.tensor([[464, 3139, 286, 4881, 318]])
    with torch.no_grad():
        ref = tiny_gpt2(ids, output_hidden_states=True)
        with model.trace(ids):
            h0 = model.transformer.h[0].output.save()
            logits = model.output.logits.save()
    assert torch.allclose(h0, ref.hidden_states[1], atol=1e-5)
    assert torch.allclose(logits, ref.logits, atol=1e-5)


def test_model_output_object_can_be_saved(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    ids = torch.tensor([[464, 3139]])
    with torch.no_grad():
        with model.trace(ids):
            out = model.output.save()
        plain = tiny_gpt2(ids)
    assert type(out) is type(plain) and type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert out.logits.shape == (1, 2, tiny_gpt2.config.vocab_size)
    assert torch.equal(out.logits, plain.logits)
    assert "save" not in out.__dict__  # the temporary .save() is gone


def test_model_unchanged_after_failing_trace(mlp):
    model = seethrough.Model(mlp)
    snapshot = state_snapshot(mlp)
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = mlp(x)
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            model.fc1.output[:] = 0
            model.act.skip(model.fc1.output)
            1 / 0
    assert_pristine(mlp)
    assert_same_state(mlp, snapshot)
    with torch.no_grad():
        assert torch.equal(mlp(x), expected)


def test_user_exception_keeps_type_line_and_context(mlp, tmp_path):
    model = seethrough.Model(mlp)

    class Custom(Exception):
        pass

    with pytest.raises(Custom) as info:
        with model.trace(torch.randn(1, 4)):
            h = model.fc1.output
            try:
                {}["missing"]
            except KeyError:
                raise Custom("from the body")
    error = info.value
    assert isinstance(error.__context__, KeyError)  # the user's own context, not ours
    frames = [tb.tb_frame.f_code.co_filename for tb in _walk(error.__traceback__)]
    assert frames[-1] == __file__
    assert not any("seethrough/tracing" in f for f in frames)


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_gradients_read_and_edit_against_autograd(mlp):
    """Read the gradient arriving at fc1's output, then edit what flows further
    back; the reference edits the same gradient with a raw tensor hook."""
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    scale = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.0, 3.0, 0.0, 1.5])

    def reference_edit(gradient: torch.Tensor) -> torch.Tensor:
        return gradient * scale

    # Reference: plain autograd, the edit made by a hook on fc1's output tensor.
    arrived: list[torch.Tensor] = []

    def on_fc1(module, args, output):
        output.register_hook(lambda g: arrived.append(g.clone()) or reference_edit(g))

    handle = mlp.fc1.register_forward_hook(on_fc1)
    ref_x = x.clone().requires_grad_(True)
    try:
        mlp(ref_x).sum().backward()
    finally:
        handle.remove()
    ref_weight_grad = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()

    traced_x = x.clone().requires_grad_(True)
    with model.trace(traced_x):
        hidden = model.fc1.output.save()
        loss = model.output.sum()
        with loss.backward():
            grad = hidden.grad.clone().save()
            hidden.grad = reference_edit(hidden.grad)
    assert torch.allclose(grad, arrived[0])  # the gradient as it arrived, before the edit
    assert not torch.allclose(ref_weight_grad, torch.zeros_like(ref_weight_grad))
    assert torch.allclose(mlp.fc1.weight.grad, ref_weight_grad)  # the edit flowed back
    assert torch.allclose(traced_x.grad, ref_x.grad)
    mlp.zero_grad()
    assert_pristine(mlp)


def test_wrapped_module_behaves_like_bare_module(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with torch.no_grad():
        before = mlp(x)
        with model.trace(x):
            model.fc1.output[:] = 0
        assert torch.equal(model(x), before)
        assert torch.equal(mlp(x), before)
    assert model._model is mlp
    assert_pristine(mlp)
