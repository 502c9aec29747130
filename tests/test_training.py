"""Tutorial-style gradient workflows on SmolLM2 (cut to 4 layers), written from
the public tutorials' descriptions, each checked against the same computation
done without seethrough: plain HuggingFace forwards, raw torch hooks, autograd.

* attribution patching: gradients of a logit difference w.r.t. attention
  inputs in clean / corrupt invokes, estimate = (clean - corrupt) · grad;
* a DAS-style interchange through a trained orthogonal rotation, trained
  through saved logits;
* a LoRA-style adapter on an MLP, trained in a loop of traces inside
  ``model.session()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from seethrough import LanguageModel

ATOL = dict(rtol=1e-4, atol=1e-5)
N_LAYERS = 4


@pytest.fixture
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    hooks_before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    hf.zero_grad(set_to_none=True)
    yield LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer
    hf.zero_grad(set_to_none=True)
    hf.requires_grad_(True)
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()} == hooks_before


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _token(tokenizer, text: str) -> int:
    (token,) = tokenizer(text)["input_ids"]
    return token


# -- attribution patching -----------------------------------------------------------------


def test_attribution_patching_matches_autograd(smol):
    model, hf, tokenizer = smol
    clean = "When Mary and John went out, John gave a drink to"
    corrupt = "When Mary and John went out, Mary gave a drink to"
    right, wrong = _token(tokenizer, " Mary"), _token(tokenizer, " John")

    def logit_diff(logits):
        return logits[0, -1, right] - logits[0, -1, wrong]

    with model.trace() as tracer:
        with tracer.invoke(clean):
            clean_acts = [model.model.layers[i].self_attn.o_proj.input.save() for i in range(N_LAYERS)]
            clean_diff = logit_diff(model.lm_head.output).save()
        with tracer.invoke(corrupt):
            corrupt_acts = [model.model.layers[i].self_attn.o_proj.input.save() for i in range(N_LAYERS)]
            corrupt_diff = logit_diff(model.lm_head.output)
            grads = [None] * N_LAYERS
            with corrupt_diff.backward():
                for i in reversed(range(N_LAYERS)):  # gradients arrive last layer first
                    grads[i] = corrupt_acts[i].grad.save()
            corrupt_diff = corrupt_diff.save()
    estimates = torch.stack([((c - x) * g).sum() for c, x, g in zip(clean_acts, corrupt_acts, grads)])

    # The reference: plain forwards, o_proj inputs captured by raw pre-hooks, autograd.
    captured: list[torch.Tensor] = []
    handles = [
        hf.model.layers[i].self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        for i in range(N_LAYERS)
    ]
    try:
        with torch.no_grad():
            ref_clean_diff = logit_diff(hf(_ids(tokenizer, clean)).logits)
        ref_clean = [a.clone() for a in captured]
        captured.clear()
        ref_corrupt_diff = logit_diff(hf(_ids(tokenizer, corrupt)).logits)
        ref_grads = torch.autograd.grad(ref_corrupt_diff, captured)
    finally:
        for handle in handles:
            handle.remove()
    ref_estimates = torch.stack([((c - x.detach()) * g).sum() for c, x, g in zip(ref_clean, captured, ref_grads)])

    torch.testing.assert_close(clean_diff, ref_clean_diff, **ATOL)
    torch.testing.assert_close(corrupt_diff.detach(), ref_corrupt_diff.detach(), **ATOL)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, **ATOL)
    torch.testing.assert_close(estimates, ref_estimates, rtol=1e-3, atol=1e-4)
    assert ref_estimates.abs().max() > 1e-3  # a real signal, not zeros compared to zeros


# -- DAS-style trained rotation -----------------------------------------------------------


def _interchange(h_base: torch.Tensor, h_source: torch.Tensor, rotation: nn.Module, k: int) -> torch.Tensor:
    """Swap the first ``k`` rotated dimensions of the base's hidden state for the source's."""
    R = rotation.weight
    rb, rs = h_base @ R.T, h_source @ R.T
    return torch.cat([rs[..., :k], rb[..., k:]], dim=-1) @ R


def test_das_rotation_trains_through_saved_logits(smol):
    model, hf, tokenizer = smol
    hf.requires_grad_(False)  # only the rotation is trained
    layer, k = 2, 64
    base, source = "The capital of France is", "The capital of Italy is"
    target = torch.tensor([_token(tokenizer, " Rome")])
    torch.manual_seed(0)
    rotation = nn.utils.parametrizations.orthogonal(nn.Linear(hf.config.hidden_size, hf.config.hidden_size, bias=False))
    start = copy.deepcopy(rotation)
    optimizer = torch.optim.Adam(rotation.parameters(), lr=0.003)

    def loss_of_one_trace() -> torch.Tensor:
        with model.trace() as tracer:
            with tracer.invoke(source):
                h_source = model.model.layers[layer].output[:, -1]
            with tracer.invoke(base):
                out = model.model.layers[layer].output
                new = out.clone()
                new[:, -1] = _interchange(out[:, -1], h_source, rotation, k)
                model.model.layers[layer].output = new
                logits = model.lm_head.output.save()
        return nn.functional.cross_entropy(logits[:, -1], target)

    losses = []
    first_grads = None
    for step in range(6):
        optimizer.zero_grad()
        loss = loss_of_one_trace()
        loss.backward()
        if step == 0:
            first_grads = [p.grad.clone() for p in rotation.parameters()]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses

    # One step by hand with plain hooks on plain forwards, from the same start.
    seen = {}
    grab = hf.model.layers[layer].register_forward_hook(lambda m, a, o: seen.__setitem__("source", o[:, -1]))
    try:
        hf(_ids(tokenizer, source))
    finally:
        grab.remove()

    def patch(module, args, out):
        new = out.clone()
        new[:, -1] = _interchange(out[:, -1], seen["source"], start, k)
        return new

    handle = hf.model.layers[layer].register_forward_hook(patch)
    try:
        logits = hf(_ids(tokenizer, base)).logits
    finally:
        handle.remove()
    ref_loss = nn.functional.cross_entropy(logits[:, -1], target)
    ref_grads = torch.autograd.grad(ref_loss, list(start.parameters()))
    assert abs(ref_loss.item() - losses[0]) < 1e-4
    for got, expected in zip(first_grads, ref_grads):
        torch.testing.assert_close(got, expected, **ATOL)
    assert all(p.grad is None for p in hf.parameters())


# -- LoRA-style training loop in a session -------------------------------------------------


class LoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int = 4) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(d_in, rank) * 0.05)
        self.up = nn.Parameter(torch.randn(rank, d_out) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down) @ self.up


def test_lora_training_loop_in_a_session(smol):
    model, hf, tokenizer = smol
    hf.requires_grad_(False)  # only the adapter is trained
    layer = 2
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = _ids(tokenizer, prompt)
    d = hf.config.hidden_size
    torch.manual_seed(0)
    lora = LoRA(d, d)
    start = copy.deepcopy(lora)
    optimizer = torch.optim.Adam(lora.parameters(), lr=0.02)

    losses = []
    first_grads = None
    with model.session():
        for step in range(5):
            with model.trace(prompt):
                mlp = model.model.layers[layer].mlp
                x = mlp.input
                mlp.output = mlp.output + lora(x)
                logits = model.lm_head.output
                loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
                loss.backward()  # a plain backward in the body, as in the tutorial
                value = loss.item()
            if step == 0:
                first_grads = [p.grad.clone() for p in lora.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(value)
    assert losses[-1] < losses[0], losses

    # The first step with a raw forward hook on the plain model.
    handle = hf.model.layers[layer].mlp.register_forward_hook(lambda m, args, out: out + start(args[0]))
    try:
        logits = hf(ids).logits
    finally:
        handle.remove()
    ref_loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ref_grads = torch.autograd.grad(ref_loss, list(start.parameters()))
    assert abs(ref_loss.item() - losses[0]) < 1e-4
    for got, expected in zip(first_grads, ref_grads):
        torch.testing.assert_close(got, expected, **ATOL)
    assert all(p.grad is None for p in hf.parameters())
    # (the fixture checks that the model's hooks are as before)
