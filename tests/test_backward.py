"""``with loss.backward():`` inside a trace, checked against plain autograd."""

from __future__ import annotations

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine
from seethrough.errors import OutOfOrderError

_ORIGINAL_BACKWARD = torch.Tensor.backward  # as PyTorch defines it, before any trace


def _autograd_reference(mlp, x, edit_act_grad=None):
    hidden = mlp.fc1(x)
    hidden.retain_grad()
    act = torch.relu(hidden)
    if edit_act_grad is not None:
        act.register_hook(edit_act_grad)
    act.retain_grad()
    mlp.fc2(act).pow(2).sum().backward()
    grads = hidden.grad.clone(), act.grad.clone(), mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    return grads


def test_grads_in_reverse_order_match_autograd(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        act = model.act.output.save()
        loss = model.output.pow(2).sum()
        with loss.backward():
            act_grad = act.grad.save()
            hidden_grad = hidden.grad.save()
    weight_grad = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    ref_hidden, ref_act, ref_weight = _autograd_reference(mlp, x)
    assert torch.allclose(act_grad, ref_act)
    assert torch.allclose(hidden_grad, ref_hidden)
    assert torch.allclose(weight_grad, ref_weight)
    assert_pristine(mlp)


def test_editing_a_gradient_changes_what_flows_back(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        act = model.act.output.save()
        loss = model.output.pow(2).sum()
        with loss.backward():
            act.grad[:, :4] = 0  # in place
            hidden_grad = hidden.grad.save()
    mlp.zero_grad()

    def zero_first_four(grad):
        grad = grad.clone()
        grad[:, :4] = 0
        return grad

    ref_hidden, _, _ = _autograd_reference(mlp, x, edit_act_grad=zero_first_four)
    assert torch.allclose(hidden_grad, ref_hidden)


def test_assigning_a_gradient(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        act = model.act.output.save()
        loss = model.output.sum()
        with loss.backward():
            act.grad = torch.ones_like(act)
            hidden_grad = hidden.grad.save()
    mlp.zero_grad()
    ref = (mlp.fc1(x) > 0).float()  # d relu / d hidden times ones
    assert torch.allclose(hidden_grad, ref)


def test_wrong_order_is_an_out_of_order_error(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(OutOfOrderError, match="reverse order"):
        with model.trace(torch.randn(2, 4)):
            hidden = model.fc1.output.save()
            act = model.act.output.save()
            loss = model.output.sum()
            with loss.backward():
                hidden.grad.save()
                act.grad.save()  # act comes after hidden in the forward: its gradient came first
    mlp.zero_grad()
    assert_pristine(mlp)


def test_plain_backward_call_still_works(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        hidden.retain_grad()
        model.output.sum().backward()
        grad = hidden.grad.save()
    weight_grad = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    # Reference: autograd on a plain forward, fc1's output kept by a raw hook.
    seen = {}
    handle = mlp.fc1.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    try:
        out = mlp(x)
        seen["h"].retain_grad()
        out.sum().backward()
    finally:
        handle.remove()
    assert torch.allclose(grad, seen["h"].grad) and torch.allclose(weight_grad, mlp.fc1.weight.grad)
    mlp.zero_grad()


def test_saved_values_keep_their_graph_unless_asked(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x):
        out = model.output.save()
        view = model.output[:, 0].save()
    assert out.grad_fn is not None and view.grad_fn is not None
    with model.trace(x, keep_graph=False):
        detached = model.output.save()
    assert detached.grad_fn is None and not detached.requires_grad
    with model.trace(x, keep_graph=True):  # the default, still accepted
        kept = model.output.save()
    kept.sum().backward()
    assert mlp.fc1.weight.grad is not None
    mlp.zero_grad()


def test_grad_outside_backward_block_is_plain_torch(mlp):
    model = seethrough.Model(mlp)
    with model.trace(torch.randn(2, 4)):
        weight_grad = mlp.fc1.weight.grad
    assert weight_grad is None
    assert "grad" not in torch.Tensor.__dict__


def test_backward_block_inside_an_invoke(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace() as tracer:
        with tracer.invoke(x):
            hidden = model.fc1.output.save()
            loss = model.output.pow(2).sum()
            with loss.backward():
                grad = hidden.grad.save()
    mlp.zero_grad()
    ref_hidden, _, _ = _autograd_reference(mlp, x)
    assert torch.allclose(grad, ref_hidden)
    assert torch.Tensor.backward is _ORIGINAL_BACKWARD and "backward" in torch.Tensor.__dict__


def test_gradients_of_an_invokes_own_rows(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as tracer:
        with tracer.invoke(a):
            pass
        with tracer.invoke(b):
            hidden = model.fc1.output.save()
            loss = model.output.pow(2).sum()
            with loss.backward():
                hidden.grad[:, 0] = 0  # edit this invoke's rows of the flowing gradient
                grad = hidden.grad.save()
    mlp.zero_grad()
    ref_hidden, _, _ = _autograd_reference(mlp, b)
    expected = ref_hidden.clone()
    expected[:, 0] = 0
    assert grad.shape == (3, 8)
    assert torch.allclose(grad, expected)
