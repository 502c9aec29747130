"""Several inputs in one batched forward pass: ``tracer.invoke``.

Each invoke must see exactly its own rows, equal to running it alone; values
must flow between invokes in source order; and the whole batch must go
through the model once.
"""

from __future__ import annotations

import pytest
import torch

import seethrough
from seethrough.errors import BatchError, CrossInvokeError, InvokeError, OutOfOrderError


@pytest.fixture
def counted(mlp):
    """The MLP, plus a list that grows by one per forward call."""
    calls: list[int] = []
    mlp.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return mlp, calls


def test_rows_equal_single_runs_and_one_forward(counted):
    mlp, calls = counted
    model = seethrough.Model(mlp)
    xs = [torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4)]
    with torch.no_grad():
        with model.trace() as tracer:
            outs = []
            for x in xs:
                with tracer.invoke(x):
                    outs.append((model.fc1.output.save(), model.output.save()))
        assert calls == [6]  # one batched forward of 2 + 3 + 1 rows
        for x, (hidden, out) in zip(xs, outs):
            assert torch.allclose(hidden, mlp.fc1(x), atol=1e-6)
            assert torch.allclose(out, mlp(x), atol=1e-6)


def test_invoke_without_input_sees_whole_batch(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(a):
                pass
            with tracer.invoke(b):
                pass
            with tracer.invoke():
                everything = model.output.save()
        assert torch.allclose(everything, mlp(torch.cat([a, b])), atol=1e-6)


def test_edit_in_one_invoke_touches_only_its_rows(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(a):
                model.act.output[:] = 0
                out_a = model.output.save()
            with tracer.invoke(b):
                out_b = model.output.save()
        assert torch.allclose(out_a, mlp.fc2(torch.zeros(2, 8)))
        assert torch.allclose(out_b, mlp(b), atol=1e-6)


def test_assignment_in_one_invoke_splices_its_rows(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(a):
                pass
            with tracer.invoke(b):
                model.fc1.output = torch.ones(3, 8)
                out_b = model.output.save()
            with tracer.invoke():
                everything = model.fc1.output.save()
        assert torch.allclose(out_b, mlp.fc2(torch.relu(torch.ones(3, 8))))
        assert torch.allclose(everything[:2], mlp.fc1(a), atol=1e-6)
        assert torch.equal(everything[2:], torch.ones(3, 8))


def test_value_saved_in_one_invoke_patched_into_the_next(mlp):
    """The nnsight cross-prompt pattern, with no barrier needed."""
    model = seethrough.Model(mlp)
    cat, dog = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(cat):
                cat_hidden = model.fc1.output.save()
            with tracer.invoke(dog):
                model.fc1.output[:] = cat_hidden
                dog_with_cat = model.output.save()
        assert torch.allclose(dog_with_cat, mlp(cat), atol=1e-6)


def test_values_flow_in_source_order_through_loops(mlp):
    model = seethrough.Model(mlp)
    xs = [torch.randn(1, 4) for _ in range(3)]
    with torch.no_grad():
        with model.trace() as tracer:
            previous = None
            totals = []
            for i, x in enumerate(xs):
                with tracer.invoke(x):
                    h = model.fc1.output
                    if previous is not None:
                        h[:] = h + previous  # uses the previous invoke's value
                    previous = model.fc1.output.save()
                    totals.append((i, model.output.save()))
        expected_prev = None
        for (i, out), x in zip(totals, xs):
            h = mlp.fc1(x)
            if expected_prev is not None:
                h = h + expected_prev
            expected_prev = h
            assert torch.allclose(out, mlp.fc2(torch.relu(h)), atol=1e-5), i
        assert torch.allclose(previous, expected_prev, atol=1e-5)


def test_trace_body_after_invokes_sees_their_results(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(a):
                out_a = model.output.save()
            with tracer.invoke(b):
                out_b = model.output.save()
            difference = (out_a - out_b).abs().sum().save()
        assert torch.allclose(difference, (mlp(a) - mlp(b)).abs().sum(), atol=1e-5)


def test_later_assignment_in_body_wins(mlp):
    model = seethrough.Model(mlp)
    with model.trace() as tracer:
        label = "before"
        with tracer.invoke(torch.randn(1, 4)):
            label = "invoke"
        after_invoke = label
        label = "body"
    assert after_invoke == "invoke"
    assert label == "body"


def test_invoke_in_trace_with_input_is_refused(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(InvokeError, match="already has an input"):
        with model.trace(torch.randn(1, 4)) as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                pass


def test_module_access_outside_invokes_is_refused(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(InvokeError, match="outside any invoke"):
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                pass
            model.fc1.output.save()


def test_trace_without_any_input_is_refused(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(InvokeError, match="never runs"):
        with model.trace():
            model.fc1.output.save()


def test_unbatchable_inputs_are_refused(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(BatchError, match=r"shapes \[\(1, 4\), \(1, 5\)\]"):
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                pass
            with tracer.invoke(torch.randn(1, 5)):
                pass


def test_value_from_a_later_module_cannot_flow_backwards(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(OutOfOrderError):
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                late = model.fc2.output.save()
            with tracer.invoke(torch.randn(1, 4)):
                model.fc1.output[:] = late.mean()  # fc1 has run by the time `late` exists


def test_invoke_outside_trace_body_is_refused(mlp):
    model = seethrough.Model(mlp)
    with model.trace(torch.randn(1, 4)) as tracer:
        pass
    with pytest.raises(InvokeError, match="outside its trace"):
        with tracer.invoke(torch.randn(1, 4)):
            pass


def test_stale_value_between_invokes_raises_cross_invoke_error(mlp):
    """Invoke 2 reads `h` (fc1's output); invoke 1 then assigns `h` again: the
    value invoke 2 used is not invoke 1's any more, so the trace fails."""
    model = seethrough.Model(mlp)
    with pytest.raises(CrossInvokeError) as info:
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                h = model.fc1.output
                h = model.fc2.output
            with tracer.invoke(torch.randn(1, 4)):
                model.act.output[:] = h
    error = info.value
    assert isinstance(error, seethrough.SeethroughError) and isinstance(error, NameError)
    message = str(error)
    assert "h = model.fc2.output" in message and "model.act.output[:] = h" in message
    assert "tracer.barrier(2)" in message
    assert not mlp.fc1._forward_hooks and not mlp.fc2._forward_hooks and not mlp.act._forward_hooks


def test_trace_keyword_arguments_apply_to_every_invoke(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        with model.trace(logits_to_keep=1) as tracer:
            with tracer.invoke(a):
                first = model.output.logits.save()
            with tracer.invoke(b):
                second = model.output.logits.save()
        expected = tiny_gpt2(b, logits_to_keep=1).logits
    assert first.shape == (1, 1, tiny_gpt2.config.vocab_size)
    assert torch.allclose(second, expected, atol=1e-5)
