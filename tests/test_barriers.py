"""``tracer.barrier(n)`` and names shared between invokes.

Invokes run side by side in one batched forward pass.  A barrier is a real
meeting point: values assigned before it are the ones read after it.  Without
one, a later invoke that read a name an earlier invoke assigns again must fail
with a ``CrossInvokeError`` (never run on with a stale value).  Every number
here is checked against raw PyTorch forward hooks on plain forwards.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seethrough
from seethrough import CrossInvokeError, InvokeError, LanguageModel
from test_server import ALICE, server  # noqa: F401 - the shared server fixtures
from fixtures.threads import single_thread
from fixtures.models import hook_state


class Stack(nn.Module):
    """Four small layers in a row: patching one layer's output changes the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack().eval()


def _hook_output(module: nn.Module, x: torch.Tensor, root: nn.Module) -> torch.Tensor:
    """``module``'s output when ``root`` runs on ``x`` (a raw forward hook)."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            root(x)
    finally:
        handle.remove()
    return seen[-1]


def _patched_run(root: nn.Module, x: torch.Tensor, patches: dict[nn.Module, tuple]) -> torch.Tensor:
    """``root(x)`` with ``patches[module] = (index, value)`` written into module outputs."""

    def make(index: tuple, value: torch.Tensor):
        def hook(m, a, o):
            o = o.clone()
            o[index] = value
            return o

        return hook

    handles = [module.register_forward_hook(make(index, value)) for module, (index, value) in patches.items()]
    try:
        with torch.no_grad():
            return root(x)
    finally:
        for handle in handles:
            handle.remove()


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


# -- the issue's reproducer, on the real model ----------------------------------------------


def _clean_hiddens(hf, clean_ids, layers) -> dict[int, torch.Tensor]:
    """Each layer's output on the clean prompt alone (raw hooks, one plain forward)."""
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        return lambda m, a, o: seen.__setitem__(layer, o.detach().clone())

    handles = [hf.model.layers[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        with torch.no_grad():
            hf(clean_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert all(isinstance(h, torch.Tensor) for h in seen.values())  # transformers v5: blocks return the hidden state
    return seen


def _patching_reference(hf, clean_hidden, corrupt_ids, layer: int, position: int) -> torch.Tensor:
    """Last-position logits of ``corrupt`` alone with layer ``layer``'s output at
    ``position`` replaced by the clean value (a raw hook, one plain forward)."""
    patch = {hf.model.layers[layer]: ((slice(None), position), clean_hidden[:, position])}
    return _patched_run(hf, corrupt_ids, patch).logits[:, -1]


@pytest.mark.slow
def test_issue_reproducer_patches_each_layers_own_clean_value(smollm2_full):
    hf, tokenizer = smollm2_full
    hooks_before = hook_state(hf)  # HuggingFace leaves hooks of its own after output_hidden_states=
    model = LanguageModel(hf, tokenizer=tokenizer)
    clean, corrupt = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    clean_ids = tokenizer(clean, return_tensors="pt").input_ids
    corrupt_ids = tokenizer(corrupt, return_tensors="pt").input_ids
    assert clean_ids.shape == corrupt_ids.shape  # same length: position 3 is the same slot in both
    res = []
    with torch.no_grad():
        with model.trace() as tracer:
            bs = [tracer.barrier(2) for _ in (0, 12)]
            with tracer.invoke(clean):
                for i, l in enumerate((0, 12)):
                    hidden_state = model.model.layers[l].output
                    bs[i]()
            for i, l in enumerate((0, 12)):
                with tracer.invoke(corrupt):
                    bs[i]()
                    model.model.layers[l].output[:, 3] = hidden_state[:, 3]
                    res.append(model.lm_head.output[:, -1].save())
        clean_hidden = _clean_hiddens(hf, clean_ids, (0, 12))
        expected = [_patching_reference(hf, clean_hidden[layer], corrupt_ids, layer, 3) for layer in (0, 12)]
        unpatched = hf(corrupt_ids).logits[:, -1]
    assert len(res) == 2
    for got, want in zip(res, expected):
        assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    # Layer 12's patch really is layer 12's clean value, not layer 0's (the bug this fixes).
    with torch.no_grad():
        wrong = _patching_reference(hf, clean_hidden[0], corrupt_ids, 12, 3)
    assert not torch.allclose(res[1], wrong, atol=1e-2)
    assert not torch.allclose(res[1], unpatched, atol=1e-2)
    assert hook_state(hf) == hooks_before  # the trace left none of its own


def test_issue_reproducer_without_barriers_fails_naming_both_lines(smollm2_small):
    hf, tokenizer = smollm2_small
    hooks_before = hook_state(hf)  # HuggingFace leaves hooks of its own after output_hidden_states=
    model = LanguageModel(hf, tokenizer=tokenizer)
    res = []
    with pytest.raises(CrossInvokeError) as info:
        with model.trace() as tracer:
            with tracer.invoke("The Eiffel Tower is in the city of"):
                for l in (0, 2):
                    hidden_state = model.model.layers[l].output  # line of the re-assignment
            for l in (0, 2):
                with tracer.invoke("The Colosseum is in the city of"):
                    model.model.layers[l].output[:, 3] = hidden_state[:, 3]  # line of the read
                    res.append(model.lm_head.output[:, -1].save())
    message = str(info.value)
    assert "`hidden_state` was assigned again in invoke 1" in message
    assert "hidden_state = model.model.layers[l].output" in message
    assert "model.model.layers[l].output[:, 3] = hidden_state[:, 3]" in message
    assert "tracer.barrier(2)" in message
    assert isinstance(info.value, seethrough.SeethroughError)
    assert hook_state(hf) == hooks_before  # the trace left none of its own


# -- a tutorial workflow: activation patching with barriers --------------------------------


@pytest.mark.slow
def test_activation_patching_sweep_with_barriers_matches_raw_hooks(smollm2_full):
    """nnsight's activation-patching tutorial (indirect object identification),
    as one batched trace: one clean invoke, one corrupt invoke per (layer,
    position), a barrier per pair; each patched logit difference equals the one
    from plain forwards with raw hooks."""
    hf, tokenizer = smollm2_full
    hooks_before = hook_state(hf)  # HuggingFace leaves hooks of its own after output_hidden_states=
    model = LanguageModel(hf, tokenizer=tokenizer)
    clean = "When John and Mary went to the store, John gave a drink to"
    corrupt = "When John and Mary went to the store, Mary gave a drink to"
    clean_ids = tokenizer(clean, return_tensors="pt").input_ids
    corrupt_ids = tokenizer(corrupt, return_tensors="pt").input_ids
    assert clean_ids.shape == corrupt_ids.shape
    mary, john = tokenizer(" Mary").input_ids[0], tokenizer(" John").input_ids[0]
    layers, positions = (0, 6, 14, 22), (3, 9, 13)
    pairs = [(layer, position) for layer in layers for position in positions]

    with torch.no_grad():
        with model.trace() as tracer:
            barriers = {pair: tracer.barrier(2) for pair in pairs}
            with tracer.invoke(clean):
                for layer in layers:
                    clean_hidden = model.model.layers[layer].output
                    for position in positions:
                        barriers[(layer, position)]()
                clean_logits = model.lm_head.output[:, -1].save()
            with tracer.invoke(corrupt):
                corrupt_logits = model.lm_head.output[:, -1].save()
            patched = {}
            for layer, position in pairs:
                with tracer.invoke(corrupt):
                    barriers[(layer, position)]()
                    model.model.layers[layer].output[:, position] = clean_hidden[:, position]
                    patched[(layer, position)] = model.lm_head.output[:, -1].save()

    def logit_diff(logits: torch.Tensor) -> float:
        return float(logits[0, mary] - logits[0, john])

    clean_hidden = _clean_hiddens(hf, clean_ids, layers)
    with torch.no_grad():
        assert torch.allclose(clean_logits, hf(clean_ids).logits[:, -1], atol=1e-3)
        assert torch.allclose(corrupt_logits, hf(corrupt_ids).logits[:, -1], atol=1e-3)
        for layer, position in pairs:
            want = _patching_reference(hf, clean_hidden[layer], corrupt_ids, layer, position)
            got = patched[(layer, position)]
            assert torch.allclose(got, want, atol=1e-3), (layer, position, (got - want).abs().max())
            assert logit_diff(got) == pytest.approx(logit_diff(want), abs=1e-3)
    # What the tutorial shows: the name that differs (position 9) carries the answer early on.
    clean_diff, corrupt_diff = logit_diff(clean_logits), logit_diff(corrupt_logits)
    recovered = (logit_diff(patched[(0, 9)]) - corrupt_diff) / (clean_diff - corrupt_diff)
    assert recovered > 0.5
    assert abs(logit_diff(patched[(0, 3)]) - corrupt_diff) < abs(logit_diff(patched[(0, 9)]) - corrupt_diff)
    assert hook_state(hf) == hooks_before  # the trace left none of its own


# -- what a barrier guarantees -------------------------------------------------------------


def test_read_after_barrier_sees_the_value_at_the_barrier(stack):
    """Invoke 1 assigns `h`, meets invoke 2, then assigns `h` again at once:
    invoke 2, reading after the barrier, gets the value from the barrier."""
    model = seethrough.Model(stack)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(a):
                h = model.layers[0].output * 1
                barrier()
                h = h * 100  # after the barrier: not what invoke 2 sees
                late = model.layers[3].output.save()
            with tracer.invoke(b):
                barrier()
                model.layers[1].output[:] = h
                out = model.output.save()
    at_barrier = _hook_output(stack.layers[0], a, stack)
    expected = _patched_run(stack, b, {stack.layers[1]: ((slice(None),), at_barrier)})
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(late, _hook_output(stack.layers[3], a, stack), atol=1e-6)


def test_one_barrier_called_in_a_loop_meets_once_per_step(stack):
    """The same barrier, called at every layer by both invokes: invoke 2 adds
    invoke 1's output of each layer to its own, layer by layer."""
    model = seethrough.Model(stack)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            step = tracer.barrier(2)
            with tracer.invoke(a):
                for layer in model.layers:
                    h = layer.output.clone()
                    step()
            with tracer.invoke(b):
                for layer in model.layers:
                    step()
                    layer.output[:] = layer.output + h
                out = model.output.save()
    # Reference: plain forwards, invoke 1's values recorded by hooks, added by hooks.
    originals = [_hook_output(layer, a, stack) for layer in stack.layers]

    def adder(value):
        return lambda m, args, o: o + value

    handles = [layer.register_forward_hook(adder(v)) for layer, v in zip(stack.layers, originals)]
    try:
        with torch.no_grad():
            expected = stack(b)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(out, expected, atol=1e-6)


def test_barrier_list_in_loops_patches_each_layer(stack):
    """The issue's pattern on a plain module: one barrier per layer, a corrupt
    invoke per layer, each patched with that layer's clean output."""
    model = seethrough.Model(stack)
    clean, corrupt = torch.randn(1, 4), torch.randn(1, 4)
    layers = (0, 1, 2, 3)
    res = []
    with torch.no_grad():
        with model.trace() as tracer:
            bs = [tracer.barrier(2) for _ in layers]
            with tracer.invoke(clean):
                for i, l in enumerate(layers):
                    hidden_state = model.layers[l].output
                    bs[i]()
            for i, l in enumerate(layers):
                with tracer.invoke(corrupt):
                    bs[i]()
                    model.layers[l].output[:, 1] = hidden_state[:, 1]
                    res.append(model.output.save())
    for l, got in zip(layers, res):
        value = _hook_output(stack.layers[l], clean, stack)[:, 1]
        want = _patched_run(stack, corrupt, {stack.layers[l]: ((slice(None), 1), value)})
        assert torch.allclose(got, want, atol=1e-6), l
    assert len({round(float(r[0, 0]), 6) for r in res}) == len(layers)  # four different patches


def test_three_invokes_meet_at_one_barrier(stack):
    model = seethrough.Model(stack)
    a, b, c = torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            meet = tracer.barrier(3)
            with tracer.invoke(a):
                source = model.layers[1].output
                meet()
                source = None  # later assignments do not reach the others
            with tracer.invoke(b):
                meet()
                model.layers[2].output[:] = source
                out_b = model.output.save()
            with tracer.invoke(c):
                meet()
                model.layers[1].output[:] = source * 2
                out_c = model.output.save()
    h1 = _hook_output(stack.layers[1], a, stack)
    assert torch.allclose(out_b, _patched_run(stack, b, {stack.layers[2]: ((slice(None),), h1)}), atol=1e-6)
    assert torch.allclose(out_c, _patched_run(stack, c, {stack.layers[1]: ((slice(None),), h1 * 2)}), atol=1e-6)


def test_barrier_before_the_forward_starts(stack):
    """Both invokes meet before asking for any value: the barrier is released
    before the forward pass, and the values are then as without it."""
    model = seethrough.Model(stack)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            start = tracer.barrier(2)
            with tracer.invoke(a):
                start()
                h = model.layers[0].output.save()
            with tracer.invoke(b):
                start()
                model.layers[0].output[:] = h
                out = model.output.save()
    h_ref = _hook_output(stack.layers[0], a, stack)
    assert torch.allclose(h, h_ref, atol=1e-6)
    assert torch.allclose(out, _patched_run(stack, b, {stack.layers[0]: ((slice(None),), h_ref)}), atol=1e-6)


def test_barrier_in_generation_steps(smollm2_small):
    """Two invokes meet at every generation step: invoke 2 writes invoke 1's
    layer-1 last-position output of the same step into its own.  Its logits at
    every step equal plain HF generate with hooks doing the same."""
    hf, tokenizer = smollm2_small
    hooks_before = hook_state(hf)  # HuggingFace leaves hooks of its own after output_hidden_states=
    model = LanguageModel(hf, tokenizer=tokenizer)
    prompt_a, prompt_b = "The capital of France is", "Once upon a time there"
    ids_a = tokenizer(prompt_a, return_tensors="pt").input_ids
    ids_b = tokenizer(prompt_b, return_tensors="pt").input_ids
    assert ids_a.shape == ids_b.shape  # no padding: the same positions in both rows
    with torch.no_grad():
        with model.generate(max_new_tokens=3, do_sample=False) as tracer:
            step = tracer.barrier(2)
            logits = []
            with tracer.invoke(prompt_a):
                for _ in tracer.iter[:]:
                    h = model.model.layers[1].output[:, -1].clone()
                    step()
            with tracer.invoke(prompt_b):
                for _ in tracer.iter[:]:
                    step()
                    model.model.layers[1].output[:, -1] = h
                    logits.append(model.lm_head.output[:, -1].save())
            tokens = tracer.result.save()

    def generate(ids, layer_hook=None):
        """Plain HF generate; the last-position logits of each step."""
        seen = []
        handles = [hf.lm_head.register_forward_hook(lambda m, a, o: seen.append(o[:, -1].clone()))]
        if layer_hook is not None:
            handles.append(hf.model.layers[1].register_forward_hook(layer_hook))
        try:
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=3, do_sample=False)
        finally:
            for handle in handles:
                handle.remove()
        return out, seen

    recorded = []

    def record(m, a, o):
        recorded.append(o[:, -1].clone())

    out_a, _ = generate(ids_a, record)
    calls = iter(recorded)

    def write(m, a, o):
        o = o.clone()
        o[:, -1] = next(calls)
        return o

    out_b, expected = generate(ids_b, write)
    _, unpatched = generate(ids_b)
    assert torch.equal(tokens[0], out_a[0]) and torch.equal(tokens[1], out_b[0])
    assert len(logits) == len(expected) == 3
    for got, want, plain in zip(logits, expected, unpatched):
        assert torch.allclose(got, want, atol=1e-3)
        assert not torch.allclose(got, plain, atol=1e-2)  # the edit shows
    assert hook_state(hf) == hooks_before  # the trace left none of its own


# -- stale values between invokes -----------------------------------------------------------


def test_stale_read_fails_naming_the_read_and_the_reassignment(stack):
    model = seethrough.Model(stack)
    with pytest.raises(CrossInvokeError) as info:
        with model.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                h = model.layers[0].output
                h = model.layers[2].output  # assigned again after invoke 2 read it
            with tracer.invoke(torch.randn(1, 4)):
                model.layers[1].output[:] = h  # reads the layer-0 value
    message = str(info.value)
    assert "`h` was assigned again in invoke 1" in message
    assert "h = model.layers[2].output" in message and "model.layers[1].output[:] = h" in message
    assert "barrier" in message
    assert isinstance(info.value, seethrough.SeethroughError) and isinstance(info.value, NameError)
    assert _no_hooks(stack)


def test_names_not_read_by_others_may_change_freely(stack):
    """Only a name another invoke has read is watched; re-assigning the same
    object, or names nobody else reads, is fine; and the simple case needs
    no barrier."""
    model = seethrough.Model(stack)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(a):
                h = model.layers[0].output.save()
                mine = model.layers[1].output
                mine = model.layers[2].output  # nobody else reads `mine`
                h = h  # the same object again
                last = model.output.save()
            with tracer.invoke(b):
                model.layers[0].output[:] = h
                out = model.output.save()
    h_ref = _hook_output(stack.layers[0], a, stack)
    assert torch.allclose(out, _patched_run(stack, b, {stack.layers[0]: ((slice(None),), h_ref)}), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(last, stack(a), atol=1e-6)


def test_barrier_settles_a_read_made_before_it(stack):
    """Invoke 2 read `h` before the barrier; both then meet with `h` unchanged:
    invoke 1 may assign `h` again afterwards."""
    model = seethrough.Model(stack)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            meet = tracer.barrier(2)
            with tracer.invoke(a):
                h = model.layers[0].output.save()
                meet()
                h = model.layers[3].output.save()
            with tracer.invoke(b):
                model.layers[0].output[:] = h
                meet()
                out = model.output.save()
    h_ref = _hook_output(stack.layers[0], a, stack)
    assert torch.allclose(out, _patched_run(stack, b, {stack.layers[0]: ((slice(None),), h_ref)}), atol=1e-6)
    assert torch.allclose(h, _hook_output(stack.layers[3], a, stack), atol=1e-6)


# -- misuse: a clear error, never a hang ----------------------------------------------------


def test_more_callers_than_participants(stack):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError) as info:
        with model.trace() as tracer:
            pair = tracer.barrier(2)
            for _ in range(3):
                with tracer.invoke(torch.randn(1, 4)):
                    pair()
    message = str(info.value)
    assert "invoke 3" in message and "invoke 1, invoke 2" in message
    assert "tracer.barrier(3)" in message and "pair = tracer.barrier(2)" in message
    assert _no_hooks(stack)


def test_barrier_never_reached_by_all(stack):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError) as info:
        with model.trace() as tracer:
            pair = tracer.barrier(2)
            with tracer.invoke(torch.randn(1, 4)):
                model.layers[0].output.save()
            with tracer.invoke(torch.randn(1, 4)):
                pair()  # nobody else comes
                model.layers[1].output.save()
    message = str(info.value)
    assert "invoke 2 waited at a barrier" in message and "only 1 of its 2 invokes" in message
    assert "pair()" in message and "pair = tracer.barrier(2)" in message
    assert _no_hooks(stack)


def test_barrier_called_more_often_by_one_invoke(stack):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError, match="only 1 of its 2 invokes"):
        with model.trace() as tracer:
            step = tracer.barrier(2)
            with tracer.invoke(torch.randn(1, 4)):
                for layer in model.layers:
                    layer.output.save()
                    step()
            with tracer.invoke(torch.randn(1, 4)):
                step()  # once only


def test_crossed_barriers_fail_instead_of_hanging(stack):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError, match="waited at a barrier"):
        with model.trace() as tracer:
            first, second = tracer.barrier(2), tracer.barrier(2)
            with tracer.invoke(torch.randn(1, 4)):
                second()
                first()
            with tracer.invoke(torch.randn(1, 4)):
                first()
                second()
    assert _no_hooks(stack)


def test_barrier_outside_an_invoke(stack):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError, match="in the trace body, outside any invoke") as info:
        with model.trace() as tracer:
            pair = tracer.barrier(2)
            with tracer.invoke(torch.randn(1, 4)):
                pass
            pair()
    assert "pair()" in str(info.value) and "tracer.invoke" in str(info.value)
    with pytest.raises(InvokeError, match="outside a running trace"):
        pair()
    with pytest.raises(InvokeError, match="another trace"):
        with model.trace() as other:
            with other.invoke(torch.randn(1, 4)):
                pair()


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True])
def test_barrier_needs_a_whole_number_of_invokes(stack, n):
    model = seethrough.Model(stack)
    with pytest.raises(InvokeError, match="number of invokes"):
        with model.trace() as tracer:
            tracer.barrier(n)
            with tracer.invoke(torch.randn(1, 4)):
                pass


def test_barrier_made_outside_its_trace(stack):
    model = seethrough.Model(stack)
    with model.trace(torch.randn(1, 4)) as tracer:
        pass
    with pytest.raises(seethrough.SeethroughError, match="outside its trace body"):
        tracer.barrier(2)


def test_waiting_at_a_barrier_past_a_module_names_the_barrier(stack):
    """Invoke 2 waits at a barrier invoke 1 reaches only at layer 3, then asks
    for layer 0: an OutOfOrderError that says why."""
    model = seethrough.Model(stack)
    with pytest.raises(seethrough.OutOfOrderError) as info:
        with model.trace() as tracer:
            late = tracer.barrier(2)
            with tracer.invoke(torch.randn(1, 4)):
                model.layers[3].output.save()
                late()
            with tracer.invoke(torch.randn(1, 4)):
                late()
                model.layers[0].output.save()
    assert "waited at a barrier until invoke 1 reached it" in str(info.value)
    assert _no_hooks(stack)


# -- the same on a server ------------------------------------------------------------------------


def _patching_body(model, options):
    with model.trace(**options) as tracer:
        res = []  # made in the body, so that it comes back from a server too
        bs = [tracer.barrier(2) for _ in (0, 2)]
        with tracer.invoke("The Eiffel Tower is in the city of"):
            for i, l in enumerate((0, 2)):
                hidden_state = model.model.layers[l].output
                bs[i]()
        for i, l in enumerate((0, 2)):
            with tracer.invoke("The Colosseum is in the city of"):
                bs[i]()
                model.model.layers[l].output[:, 3] = hidden_state[:, 3]
                res.append(model.lm_head.output[:, -1].save())
    return res


@pytest.mark.timeout(300)
def test_barriers_and_stale_reads_remotely(server, smollm2_small_dir):
    """The server runs the same mechanism: the same numbers with barriers, the
    same error without."""
    model = LanguageModel(str(smollm2_small_dir))
    object.__setattr__(model, "_remote_name", "smollm2")  # the name the server serves it under
    options = {"remote": True, "host": server.url, "api_key": ALICE}
    with single_thread():  # as the server's workers: bitwise-equal values
        local, remote = _patching_body(model, {}), _patching_body(model, options)
    assert len(local) == len(remote) == 2
    for a, b in zip(local, remote):
        assert torch.equal(a, b)
    assert not torch.equal(local[0], local[1])
    with pytest.raises(CrossInvokeError, match="`h` was assigned again in invoke 1"):
        with model.trace(**options) as tracer:
            with tracer.invoke("Hello there"):
                h = model.model.layers[0].output
                h = model.model.layers[2].output
            with tracer.invoke("Hello again"):
                model.model.layers[1].output[:] = h
