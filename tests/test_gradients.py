"""Gradients through traces: saved tensors keep their graph, invoke rows get
their own gradients, ``retain_grad`` + a plain ``backward``; each checked
against plain autograd on a plain forward (with raw torch hooks where a value
inside the model is needed)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine
from seethrough import LanguageModel

ATOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    hf.zero_grad(set_to_none=True)
    yield LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer
    hf.zero_grad(set_to_none=True)
    hf.requires_grad_(True)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


# -- 1. a saved tensor is the forward's tensor, graph included -------------------------


def test_saved_output_trains_parameters_like_plain_autograd(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        out = model.output.save()
    assert out.grad_fn is not None
    out.pow(2).sum().backward()
    got = _grads(mlp)
    mlp(x).pow(2).sum().backward()
    expected = _grads(mlp)
    assert got.keys() == expected.keys() == {n for n, _ in mlp.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert_pristine(mlp)


def test_saved_logits_of_a_language_model_train_like_plain_autograd(smol):
    model, hf, tokenizer = smol
    ids = _ids(tokenizer, "The capital of France is")
    target = tokenizer(" Paris")["input_ids"][0]
    with model.trace(ids):
        logits = model.lm_head.output.save()
    torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([target])).backward()
    got = _grads(hf)
    reference = hf(ids).logits
    torch.nn.functional.cross_entropy(reference[:, -1], torch.tensor([target])).backward()
    expected = _grads(hf)
    assert len(expected) > 10 and got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **ATOL)


def test_keep_graph_false_detaches_saved_tensors(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.trace(x, keep_graph=False):
        kept = seethrough.save(model.fc1.output, keep_graph=True)
        out = model.output.save()
        view = model.output[:, 0].save()
    assert out.grad_fn is None and not out.requires_grad
    assert view.grad_fn is None
    assert kept.grad_fn is not None
    with model.trace(x):
        dropped = seethrough.save(model.fc1.output, keep_graph=False)
        live = model.output.save()
    assert dropped.grad_fn is None and live.grad_fn is not None
    torch.testing.assert_close(live, mlp(x))


def test_saved_tensor_is_the_live_tensor(mlp):
    """A saved value is the forward's tensor itself: an in-place edit after the
    save shows in it; `.clone().save()` keeps a snapshot."""
    model = seethrough.Model(mlp)
    with torch.no_grad(), model.trace(torch.randn(2, 4)):
        live = model.fc1.output.save()
        snapshot = model.fc1.output.clone().save()
        model.fc1.output[:] = 0
    assert torch.all(live == 0)
    assert not torch.all(snapshot == 0)


def test_graph_is_freed_when_the_user_drops_the_saved_tensor(mlp):
    """The graph behind a saved tensor lives exactly as long as the user's
    reference: no registry, hook or reference cycle of the library keeps it
    (checked with the garbage collector off)."""
    model = seethrough.Model(mlp)
    refs: list[weakref.ref] = []
    # ReLU's output is held by the graph (fc2 and ReLU save it for backward).
    mlp.act.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    gc.collect()
    gc.disable()
    try:
        with model.trace(torch.randn(2, 4)) as tracer:
            out = model.output.save()
        assert refs[-1]() is not None, "the saved output lost its graph"
        assert out.grad_fn is not None
        del out, tracer
        assert refs[-1]() is None, "something other than the saved tensor holds the graph"

        # The same after the library's own backward machinery ran in the body.
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(2, 4)):
                hidden = model.act.output.save()
                out = model.output.save()
                with out.sum().backward(retain_graph=True):
                    grad = hidden.grad.save()
            with tracer.invoke(torch.randn(3, 4)):
                other = model.output.save()
        assert refs[-1]() is not None and grad.shape == (2, 8)
        del out, hidden, other, tracer
        assert refs[-1]() is None, "the backward block left the graph alive"
    finally:
        gc.enable()
        mlp._forward_hooks.clear()
        mlp.act._forward_hooks.clear()
        mlp.zero_grad()


# -- 2. `.input` / `.inputs` gradients inside explicit invokes ----------------------------


def _reference_input_grads(hf, ids, layers, metric):
    """Plain autograd: o_proj inputs captured by raw pre-hooks on a plain forward."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        hf.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: captured.__setitem__(i, args[0])
        )
        for i in layers
    ]
    try:
        logits = hf(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    value = metric(logits)
    grads = torch.autograd.grad(value, [captured[i] for i in layers])
    return value.detach(), {i: g for i, g in zip(layers, grads)}, {i: captured[i].detach() for i in layers}


def test_input_gradients_inside_invokes_match_autograd(smol):
    model, hf, tokenizer = smol
    clean, corrupt = "When Mary and John went out, John gave a drink to", "When Mary and John went out, Mary gave a drink to"
    a, b = tokenizer(" Mary")["input_ids"][0], tokenizer(" John")["input_ids"][0]
    ids_clean, ids_corrupt = _ids(tokenizer, clean), _ids(tokenizer, corrupt)
    assert ids_clean.shape == ids_corrupt.shape  # same length: no padding in the batch

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    with model.trace() as t:
        with t.invoke(clean):
            x_clean = model.model.layers[0].self_attn.o_proj.input.save()
            args_clean, _ = model.model.layers[2].self_attn.o_proj.inputs
            y_clean = args_clean[0].save()
            lg_clean = model.lm_head.output
            value_clean = metric(lg_clean)
            with value_clean.backward(retain_graph=True):
                gy_clean = y_clean.grad.save()
                gx_clean = x_clean.grad.save()
        with t.invoke(corrupt):
            x = model.model.layers[0].self_attn.o_proj.input.save()
            args, kwargs = model.model.layers[2].self_attn.o_proj.inputs
            y = args[0].save()
            lg = model.lm_head.output
            value = metric(lg)
            with value.backward():
                gy = y.grad.save()  # reverse order of the forward pass
                gx = x.grad.save()
    assert gx.shape == x.shape == (1, ids_corrupt.shape[1], hf.config.hidden_size)

    for ids, got in ((ids_corrupt, (gx, gy, x, y)), (ids_clean, (gx_clean, gy_clean, x_clean, y_clean))):
        _, ref, acts = _reference_input_grads(hf, ids, [0, 2], metric)
        torch.testing.assert_close(got[2], acts[0], **ATOL)
        torch.testing.assert_close(got[3], acts[2], **ATOL)
        torch.testing.assert_close(got[0], ref[0], **ATOL)
        torch.testing.assert_close(got[1], ref[2], **ATOL)
    assert gx.abs().sum() > 0 and not torch.allclose(gx, gx_clean)
    hf.zero_grad(set_to_none=True)


def test_editing_an_invokes_input_gradient_only_changes_its_rows(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as t:
        with t.invoke(a):
            h_a = model.fc1.output.save()
            x_a = model.fc2.input.save()
        with t.invoke(b):
            h_b = model.fc1.output.save()
            x_b = model.fc2.input
        with t.invoke():  # no input: the whole batch, both invokes' rows
            loss = model.output.pow(2).sum()
            with loss.backward():
                x_b.grad[:] = 0  # cut invoke b's path at fc2's input
                gh_b = h_b.grad.save()
                gh_a = h_a.grad.save()
    mlp.zero_grad()
    assert x_a.shape == (2, 8)
    assert torch.all(gh_b == 0)
    # invoke a, untouched: its rows' gradient as on a plain forward of `a`
    h = mlp.fc1(a)
    (ref,) = torch.autograd.grad(mlp.fc2(torch.relu(h)).pow(2).sum(), [h])
    torch.testing.assert_close(gh_a, ref)


# -- 3. `retain_grad()` + a plain `backward()` in the body --------------------------------


def test_retain_grad_and_plain_backward_in_the_body(smol):
    model, hf, tokenizer = smol
    ids = _ids(tokenizer, "The capital of France is")
    with model.trace(ids):
        h = model.model.layers[1].output.save()
        h.retain_grad()
        model.lm_head.output[0, -1].logsumexp(-1).backward()
    hf.zero_grad(set_to_none=True)

    captured = {}
    handle = hf.model.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("h", o))
    try:
        logits = hf(ids).logits
    finally:
        handle.remove()
    (ref,) = torch.autograd.grad(logits[0, -1].logsumexp(-1), [captured["h"]])
    assert h.grad is not None
    torch.testing.assert_close(h.grad, ref, **ATOL)


def test_retain_grad_inside_invokes(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as t:
        with t.invoke(a):
            h_a = model.fc1.output.save()
            h_a.retain_grad()
        with t.invoke(b):
            h_b = model.fc1.output.save()
            h_b.retain_grad()
        with t.invoke():  # the whole batch
            model.output.pow(2).sum().backward()
    mlp.zero_grad()
    for x, h in ((a, h_a), (b, h_b)):
        ref = mlp.fc1(x)
        ref.retain_grad()
        mlp.fc2(torch.relu(ref)).pow(2).sum().backward()
        mlp.zero_grad()
        assert h.grad is not None
        torch.testing.assert_close(h.grad, ref.grad)


def test_requires_grad_on_a_frozen_model_inside_invokes(mlp):
    """nnsight's gradient tutorial: parameters frozen, `h.requires_grad_(True)`
    on a module's output, then `with loss.backward(): h.grad` — per invoke."""
    mlp.requires_grad_(False)
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with model.trace() as t:
        with t.invoke(a):
            h_a = model.fc1.output
            h_a.requires_grad_(True)
            with model.output.pow(2).sum().backward(retain_graph=True):
                g_a = h_a.grad.save()
        with t.invoke(b):
            h_b = model.fc1.output
            h_b.requires_grad_(True)
            with model.output.pow(2).sum().backward():
                g_b = h_b.grad.save()
    for x, got in ((a, g_a), (b, g_b)):
        h = mlp.fc1(x).requires_grad_(True)
        (ref,) = torch.autograd.grad(mlp.fc2(torch.relu(h)).pow(2).sum(), [h])
        torch.testing.assert_close(got, ref)
    assert_pristine(mlp)


def test_no_grad_traces_with_invokes_are_unchanged(mlp):
    """Without autograd nothing is rebuilt: invoke edits still reach the forward."""
    model = seethrough.Model(mlp)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad(), model.trace() as t:
        with t.invoke(a):
            model.fc1.output[:] = 0
            out_a = model.output.save()
        with t.invoke(b):
            out_b = model.output.save()
    with torch.no_grad():
        torch.testing.assert_close(out_a, mlp.fc2(torch.relu(torch.zeros(2, 8))))
        torch.testing.assert_close(out_b, mlp(b))


def test_the_readme_gradient_example(mlp):
    """README's tour: read a gradient (a clone), then zero what flows back."""
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        loss = model.output[0, -1]
        with loss.backward():
            g = hidden.grad.clone().save()
            live = hidden.grad.save()
            hidden.grad[:] = 0
    weight_grad = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    h = mlp.fc1(x)
    (ref,) = torch.autograd.grad(mlp.fc2(torch.relu(h))[0, -1], [h])
    assert ref.abs().sum() > 0
    torch.testing.assert_close(g, ref)
    assert torch.all(live == 0)  # the live gradient, edited after the save
    assert torch.all(weight_grad == 0)  # nothing flowed further back


def test_requires_grad_on_a_frozen_model(mlp):
    mlp.requires_grad_(False)
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        h = model.fc1.output
        h.requires_grad_(True)
        with model.output.sum().backward():
            g = h.grad.save()
    h = mlp.fc1(x).requires_grad_(True)
    (ref,) = torch.autograd.grad(mlp.fc2(torch.relu(h)).sum(), [h])
    torch.testing.assert_close(g, ref)


def test_cache_detaches_unless_asked(mlp):
    model = seethrough.Model(mlp)
    with model.trace(torch.randn(2, 4)) as tracer:
        cache = tracer.cache(modules=[model.fc1])
        kept = tracer.cache(modules=[model.fc1], detach=False)
    assert cache["model.fc1"].output.grad_fn is None
    assert kept["model.fc1"].output.grad_fn is not None


def test_two_backward_blocks_and_an_in_place_edit_of_a_broadcast_gradient(mlp):
    """nnsight's gradient page: one block reads the logits' gradient, a second
    (on `hidden.sum()`, whose gradient autograd hands over as a broadcast)
    zeroes the hidden state's gradient in place."""
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)
    with model.trace(x):
        hidden = model.fc1.output.save()
        logits = model.output.save()
        with logits.sum().backward(retain_graph=True):
            grad = logits.grad.save()
        with hidden.sum().backward():
            hidden.grad[:] = 0
    weight_grad = mlp.fc1.weight.grad.clone()
    mlp.zero_grad()
    mlp(x).sum().backward()
    torch.testing.assert_close(grad, torch.ones(3, 3))
    torch.testing.assert_close(weight_grad, mlp.fc1.weight.grad)  # the second block added nothing
    mlp.zero_grad()
