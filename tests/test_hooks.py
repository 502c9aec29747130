"""``tracing/hooks.py``: the HookSet a trace adds its hooks with.

Both ways it has of adding hooks are checked against PyTorch's public
``register_forward_hook`` / ``register_forward_pre_hook``: the direct writes
into the module's hook dictionaries (the default), and the public-API fallback
used where a PyTorch version lacks those dictionaries.  The fallback is forced
by turning ``_DIRECT`` off, which is the condition it exists for.
"""

from __future__ import annotations

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine, record_outputs
from seethrough.tracing import hooks


@pytest.fixture(params=[True, False], ids=["direct", "public-api-fallback"])
def hook_mode(request, monkeypatch):
    monkeypatch.setattr(hooks, "_DIRECT", request.param)
    return request.param


def test_hookset_calls_hooks_in_registration_order_with_raw_hooks(mlp, hook_mode):
    calls: list[str] = []
    before = mlp.fc1.register_forward_hook(lambda m, a, o: calls.append("raw-before"))
    hook_set = hooks.HookSet()
    hook_set.add_outputs([mlp.fc1], lambda m, a, o: calls.append("hookset"))
    hook_set.add_input(mlp.fc1, lambda m, a, k: calls.append("hookset-input"))
    after = mlp.fc1.register_forward_hook(lambda m, a, o: calls.append("raw-after"))
    try:
        with torch.no_grad():
            mlp(torch.randn(2, 4))
        assert calls == ["hookset-input", "raw-before", "hookset", "raw-after"]
        hook_set.remove_all()
        calls.clear()
        with torch.no_grad():
            mlp(torch.randn(2, 4))
        assert calls == ["raw-before", "raw-after"]  # exactly the HookSet's hooks went
    finally:
        before.remove()
        after.remove()
    assert_pristine(mlp)
    assert not mlp.fc1._forward_pre_hooks_with_kwargs


def test_hookset_edits_match_raw_hooks(mlp, hook_mode):
    x = torch.randn(3, 4)

    def double_input(module, args, kwargs):
        return (args[0] * 2,), kwargs

    def shift_output(module, args, output):
        return output + 1.0

    # Reference: the same two edits through PyTorch's public API.
    pre = mlp.fc1.register_forward_pre_hook(double_input, with_kwargs=True)
    post = mlp.act.register_forward_hook(shift_output)
    with torch.no_grad():
        expected = mlp(x)
    pre.remove()
    post.remove()
    with torch.no_grad():
        plain = mlp(x)
    assert not torch.allclose(expected, plain)

    hook_set = hooks.HookSet()
    hook_set.add_input(mlp.fc1, double_input)
    hook_set.add_outputs([mlp.act], shift_output)
    with torch.no_grad():
        got = mlp(x)
    hook_set.remove_all()
    assert torch.equal(got, expected)
    with torch.no_grad():
        assert torch.equal(mlp(x), plain)
    assert_pristine(mlp)


def test_traces_match_raw_hooks_and_leave_no_hooks(mlp, hook_mode):
    model = seethrough.Model(mlp)
    x = torch.randn(5, 4)
    ref_out, seen = record_outputs(mlp, ["fc1", "act"], x)
    with torch.no_grad():
        with model.trace(x):
            fc1_in = model.fc1.input.save()
            fc1 = model.fc1.output.save()
            act = model.act.output.save()
            model.act.output[:, :3] = 0
            out = model.output.save()
    assert torch.equal(fc1_in, x)
    assert torch.equal(fc1, seen["fc1"][0])
    assert torch.equal(act, seen["act"][0].clone().index_fill_(1, torch.arange(3), 0))
    assert not torch.equal(out, ref_out)
    with torch.no_grad():
        assert torch.allclose(out, mlp.fc2(act))
    assert_pristine(mlp)
    assert not mlp.fc1._forward_pre_hooks_with_kwargs


def test_failed_trace_removes_its_hooks(mlp, hook_mode):
    model = seethrough.Model(mlp)
    with pytest.raises(ZeroDivisionError):
        with model.trace(torch.randn(2, 4)):
            model.fc1.input.save()
            model.act.output[:] = 0
            1 / 0
    assert_pristine(mlp)
    assert not mlp.fc1._forward_pre_hooks_with_kwargs
