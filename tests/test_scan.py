"""``model.scan(...)`` and ``model.trace(..., scan=True)`` on language models:
the shapes a scan gives equal those of a plain HuggingFace forward (raw
forward hooks record the reference), with and without left padding, loaded
or still on the meta device; nothing is computed and the model stays pristine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import seethrough

from seethrough import LanguageModel, NotSavedError
from fixtures.models import assert_pristine, hook_state, record_outputs

PROMPTS = ["Hi", "The capital of France is"]  # different lengths: left padding


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer


def _reference_shapes(hf, tokenizer, names, prompts):
    """Shapes of a plain HF forward on the left-padded batch, by raw hooks."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out, seen = record_outputs(hf, names, **encoded)
    first = {name: values[0][0] if isinstance(values[0], tuple) else values[0] for name, values in seen.items()}
    return {name: tuple(value.shape) for name, value in first.items()}, tuple(out.logits.shape)


@pytest.mark.parametrize("prompts", [PROMPTS[1:], PROMPTS], ids=["one", "padded"])
def test_scan_shapes_equal_a_real_forward_smollm2(smol, prompts):
    model, hf, tokenizer = smol
    names = ["model.embed_tokens", "model.layers.0", "model.layers.3.mlp", "lm_head"]
    ref, logits_shape = _reference_shapes(hf, tokenizer, names, prompts)
    before = hook_state(hf)
    weight = hf.lm_head.weight.detach().clone()
    with model.scan(prompts):
        embed = model.model.embed_tokens.output.shape
        layer = model.model.layers[0].output.shape
        mlp = model.model.layers[3].mlp.output.shape
        head = model.lm_head.output.shape
        logits = model.output.logits.shape
    assert tuple(embed) == ref["model.embed_tokens"]
    assert tuple(layer) == ref["model.layers.0"]
    assert tuple(mlp) == ref["model.layers.3.mlp"]
    assert tuple(head) == ref["lm_head"] == logits_shape == tuple(logits)
    assert all(type(n) is int for n in layer)  # concrete sizes, not symbols
    assert_pristine(hf, before)
    assert torch.equal(hf.lm_head.weight, weight)


@pytest.mark.parametrize("prompts", [PROMPTS[1:], PROMPTS], ids=["one", "padded"])
def test_scan_shapes_equal_a_real_forward_gpt2(gpt2, prompts):
    model, hf, tokenizer = gpt2
    names = ["transformer.h.0", "transformer.h.1.attn", "lm_head"]
    ref, _ = _reference_shapes(hf, tokenizer, names, prompts)
    with model.scan(prompts):
        block = model.transformer.h[0].output.shape
        attn = model.transformer.h[1].attn.output[0].shape
        head = model.lm_head.output.shape
    assert tuple(block) == ref["transformer.h.0"]
    assert tuple(attn) == ref["transformer.h.1.attn"]
    assert tuple(head) == ref["lm_head"]


def test_scan_values_are_fake_and_edits_check_shapes(smol):
    model, hf, _ = smol
    with model.scan("Hello world"):
        hidden = model.model.layers[1].output
        is_fake = type(hidden).__name__ == "FakeTensor"
        model.model.layers[1].output[:, -1] = 0  # a valid edit passes
    assert is_fake
    with pytest.raises(Exception, match="shape"):
        with model.scan("Hello world"):
            model.model.layers[1].output = torch.zeros(1, 99, 576)  # wrong shape fails without compute


def test_trace_with_scan_true_scans_then_runs_for_real(smol):
    model, hf, tokenizer = smol
    calls = []
    handle = hf.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(type(o).__name__))
    try:
        with torch.no_grad():
            with model.trace("The capital of France is", scan=True):
                hidden = model.model.layers[0].output.save()
                logits = model.output.logits.save()
    finally:
        handle.remove()
    assert calls == ["FakeTensor", "Tensor"]  # the scan first, then the real forward
    with torch.no_grad():
        ref = hf(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert type(hidden) is torch.Tensor and torch.allclose(logits, ref, atol=1e-5)


def test_trace_with_scan_true_stops_a_wrong_edit_before_compute(smol):
    model, hf, _ = smol
    calls = []
    handle = hf.model.layers[0].register_forward_hook(lambda m, a, o: calls.append(type(o).__name__))
    try:
        with pytest.raises(Exception, match="shape"):
            with model.trace("Hello world", validate=True):
                model.model.layers[0].output = torch.zeros(3, 3)
    finally:
        handle.remove()
    assert calls == ["FakeTensor"]  # the real forward never ran


def test_scan_before_weights_load_matches_loaded_scan(gpt2_dir):
    lazy = LanguageModel(str(gpt2_dir))
    with lazy.scan(PROMPTS):
        meta_shape = lazy.transformer.h[1].output.shape
    assert not lazy.dispatched
    lazy.dispatch()
    with lazy.scan(PROMPTS):
        fake_shape = lazy.transformer.h[1].output.shape
    assert tuple(meta_shape) == tuple(fake_shape) == (2, 5, 32)


@pytest.mark.parametrize("family", ["bloom", "opt", "llama", "gpt_neox"])
def test_scan_before_weights_load_on_other_families(tmp_path, family):
    # Bloom's ALiBi and OPT's learned positions take only a 2-D mask: the meta scan
    # still gives every module the shapes a real forward gives (raw hooks).
    from seethrough.models import offline

    folder = offline.save_random_lm(tmp_path / family, family)
    lazy = LanguageModel(str(folder))
    ids = {"input_ids": torch.tensor([[0, 1, 1]])}
    with lazy.scan(ids):
        layers = lazy.layers
        first = tuple(layers[0].input.shape)
        out = layers[1].output
        out = out[0] if isinstance(out, tuple) else out  # Bloom's blocks return a tuple
        shapes = (first, tuple(out.shape), tuple(lazy.output.logits.shape))
    assert not lazy.dispatched
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    path = {"bloom": "transformer.h", "opt": "model.decoder.layers", "llama": "model.layers",
            "gpt_neox": "gpt_neox.layers"}[family]
    _, seen = record_outputs(hf, [f"{path}.1"], **ids)
    real = seen[f"{path}.1"][0]
    real = real[0] if isinstance(real, tuple) else real
    assert shapes == ((1, 3, 32), tuple(real.shape), (1, 3, 50257))


def test_scan_values_stay_inside_unless_saved(smol):
    model, _, _ = smol
    with model.scan("Hello"):
        size = model.model.layers[0].output.shape[-1]
        hidden = model.model.layers[0].output
    assert size == 576
    with pytest.raises(NotSavedError):
        hidden.shape


def test_scan_true_with_an_edit_in_the_body_equals_a_raw_hook_edit(smol):
    # nnsight 0.8.1 runs the body on the scan, then for real: the edit applies once, for real.
    model, hf, tokenizer = smol
    prompt = "The capital of France is"
    with torch.no_grad(), model.trace(prompt, scan=True):
        model.model.layers[0].output[:, -1] = 0
        hidden = model.model.layers[1].output.save()
    seen = []
    handles = [
        hf.model.layers[0].register_forward_hook(lambda m, a, o: o.__setitem__((slice(None), -1), 0)),
        hf.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o.clone())),
    ]
    try:
        with torch.no_grad():
            hf(**tokenizer(prompt, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    assert type(hidden) is torch.Tensor and torch.equal(hidden, seen[0])


def test_scan_reads_and_edits_source_operations_with_the_real_shapes(smol):
    model, hf, tokenizer = smol
    prompt = "The capital of France is"
    with model.scan(prompt):
        attn = model.model.layers[0].self_attn.source
        shape = seethrough.save(attn.attention_interface_1.output[0].shape)
        attn.self_o_proj_0.output[:] = 0  # an edit on an operation passes the scan
        after = seethrough.save(model.model.layers[1].output.shape)
    with torch.no_grad(), model.trace(prompt):
        real = model.model.layers[0].self_attn.source.attention_interface_1.output[0].save()
    assert shape == real.shape == (1, 5, 9, 64)
    assert after == (1, 5, 576)
