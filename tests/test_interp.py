"""seethrough.interp: each helper against an independent reference.

The references use only plain HuggingFace forwards, ``generate`` and raw
``register_forward_hook`` on the same module objects (never seethrough), on
SmolLM2 truncated to its first 4 layers, plus one random GPT-2 for another
architecture.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from seethrough import LanguageModel
from seethrough.interp import (
    PatchingResult,
    activation_patching,
    activation_stats,
    bar,
    format_table,
    generate_text,
    lens_probabilities,
    logit_lens,
    mean_residual,
    patching_heatmap,
    shared_positions,
    steering_vector,
)

PROMPT = "The capital of France is"
CLEAN, CORRUPTED = "The Eiffel Tower is in", "The Colosseum is in"
TARGETS = (" Paris", " Rome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- references: plain HF forwards and raw hooks ------------------------------------
@contextlib.contextmanager
def hooked(module: torch.nn.Module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


def layer_outputs(hf, tokenizer, text: str) -> list[torch.Tensor]:
    """Every decoder layer's output (the residual stream), from raw hooks."""
    seen: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
               for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(encode(tokenizer, text))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def last_probs(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits[0, -1].float().softmax(-1)


def token_of(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


@pytest.fixture(scope="module")
def small(smollm2_small):
    hf, tokenizer = smollm2_small
    return hf, tokenizer, LanguageModel(hf, tokenizer=tokenizer)


# -- logit lens -----------------------------------------------------------------------
def test_lens_equals_norm_then_unembed_of_hooked_residuals(small):
    hf, tokenizer, model = small
    outputs = layer_outputs(hf, tokenizer, PROMPT)
    with torch.no_grad():
        expected = torch.stack([hf.lm_head(hf.model.norm(h[:, -1]))[0].softmax(-1) for h in outputs])
    got = lens_probabilities(model, PROMPT)
    assert got.shape == (4, hf.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_lens_last_layer_is_the_real_prediction_norm_applied_once(small):
    hf, tokenizer, model = small
    real = last_probs(hf, encode(tokenizer, PROMPT))
    torch.testing.assert_close(lens_probabilities(model, PROMPT)[-1], real, atol=1e-5, rtol=1e-4)


def test_logit_lens_rows_top_k_and_target(small):
    hf, tokenizer, model = small
    outputs = layer_outputs(hf, tokenizer, PROMPT)
    paris = token_of(tokenizer, " Paris")
    rows = logit_lens(model, PROMPT, target=" Paris", k=3, layers=[1, 3])
    assert [r.layer for r in rows] == [1, 3]
    for row in rows:
        with torch.no_grad():
            probs = hf.lm_head(hf.model.norm(outputs[row.layer][:, -1]))[0].softmax(-1)
        values, ids = probs.topk(3)
        assert [tok for tok, _ in row.top] == [tokenizer.decode([int(i)]) for i in ids]
        assert [p for _, p in row.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert row.target_prob == pytest.approx(float(probs[paris]), rel=1e-3, abs=1e-9)
        assert row.target_rank == int((probs > probs[paris]).sum()) + 1


def test_lens_on_gpt2_uses_its_own_final_norm(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = LanguageModel(hf, tokenizer=tokenizer)
    seen = []
    handles = [block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for block in hf.transformer.h]
    try:
        with torch.no_grad():
            hf(encode(tokenizer, "Hello there, world"))
            expected = torch.stack([hf.lm_head(hf.transformer.ln_f(h[:, -1]))[0].softmax(-1) for h in seen])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(lens_probabilities(model, "Hello there, world"), expected, atol=1e-5, rtol=1e-4)


# -- activation patching ----------------------------------------------------------------
def hook_patching(hf, tokenizer, clean_state: torch.Tensor, corrupted: str, layer: int, position: int,
                  ids: list[int]) -> torch.Tensor:
    """Reference: one corrupted run with a raw hook writing the clean residual (of
    an unbatched clean run) at (layer, position)."""

    def patch(module, args, output):
        output = output.clone()
        output[:, position] = clean_state[:, position]
        return output

    with hooked(hf.model.layers[layer], patch):
        return last_probs(hf, encode(tokenizer, corrupted))[ids]


@pytest.mark.parametrize("clean, corrupted, layers", [
    (CLEAN, CORRUPTED, None),                              # same length, every layer
    ("The famous Eiffel Tower is in", CORRUPTED, [1, 3]),  # different lengths: aligned on the last tokens
])
def test_patching_every_cell_equals_hook_patch_one_at_a_time(small, clean, corrupted, layers):
    hf, tokenizer, model = small
    ids = [token_of(tokenizer, t) for t in TARGETS]
    result = activation_patching(model, clean, corrupted, TARGETS, layers=layers, positions=None, chunk_size=5)
    n = min(len(encode(tokenizer, clean)[0]), len(encode(tokenizer, corrupted)[0]))
    assert result.layers == (layers or [0, 1, 2, 3])
    assert result.positions == list(range(-n, 0)) == shared_positions(model, clean, corrupted)
    assert result.probs.shape == (len(result.layers), n, 2)
    clean_states = layer_outputs(hf, tokenizer, clean)
    for i, layer in enumerate(result.layers):
        for j, position in enumerate(result.positions):
            expected = hook_patching(hf, tokenizer, clean_states[layer], corrupted, layer, position, ids)
            torch.testing.assert_close(result.probs[i, j], expected, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(result.clean, last_probs(hf, encode(tokenizer, clean))[ids], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(result.corrupted, last_probs(hf, encode(tokenizer, corrupted))[ids], atol=1e-5, rtol=1e-3)


def test_patching_last_position_default_and_token_labels(small):
    hf, tokenizer, model = small
    calls = []
    result = activation_patching(model, CLEAN, CORRUPTED, TARGETS, layers=[2, 0], progress=calls.append)
    assert result.layers == [0, 2] and result.positions == [-1]
    assert sum(calls) == 2
    assert result.clean_tokens == [" in"] and result.corrupted_tokens == [" in"]
    # Patching the last layer's residual at the last position makes the corrupted run clean there.
    full = activation_patching(model, CLEAN, CORRUPTED, TARGETS, layers=[3])
    torch.testing.assert_close(full.probs[0, 0], full.clean, atol=1e-5, rtol=1e-3)


def test_patching_rejects_bad_layers_and_positions(small):
    _, _, model = small
    with pytest.raises(ValueError, match="layer 7"):
        activation_patching(model, CLEAN, CORRUPTED, TARGETS, layers=[7])
    with pytest.raises(ValueError, match="position -40"):
        activation_patching(model, CLEAN, CORRUPTED, TARGETS, positions=[-40])


# -- activation statistics ----------------------------------------------------------------
def test_stats_equal_hooked_residuals(small):
    hf, tokenizer, model = small
    outputs = layer_outputs(hf, tokenizer, PROMPT)
    rows = activation_stats(model, PROMPT)
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    for row, h in zip(rows, outputs):
        h = h[0]
        assert row.norm_last == pytest.approx(float(h[-1].norm()), rel=1e-4)
        assert row.norm_avg == pytest.approx(float(h.norm(dim=-1).mean()), rel=1e-4)
        assert row.mean_last == pytest.approx(float(h[-1].mean()), rel=1e-3, abs=1e-5)
        assert row.mean_avg == pytest.approx(float(h.mean(dim=-1).mean()), rel=1e-3, abs=1e-5)
        assert row.max_abs_last == pytest.approx(float(h[-1].abs().max()), rel=1e-4)
        assert row.max_abs_avg == pytest.approx(float(h.abs().amax(dim=-1).mean()), rel=1e-4)
        assert row.top_dim_last == int(h[-1].abs().argmax())


# -- steering -------------------------------------------------------------------------------
POSITIVE = ["I love you.", "Love is wonderful and kind."]
NEGATIVE = ["I hate you.", "Hate is ugly."]


def reference_mean(hf, tokenizer, prompts: list[str], layer: int) -> torch.Tensor:
    """Each prompt run alone; mean over its tokens but the first, then over prompts."""
    means = [layer_outputs(hf, tokenizer, p)[layer][0, 1:].mean(dim=0) for p in prompts]
    return torch.stack(means).mean(dim=0)


def test_mean_residual_and_steering_vector_equal_single_runs(small):
    hf, tokenizer, model = small
    # different lengths: the batched helper must skip left padding
    assert len({len(encode(tokenizer, p)[0]) for p in POSITIVE + NEGATIVE}) > 1
    expected_pos = reference_mean(hf, tokenizer, POSITIVE, 2)
    torch.testing.assert_close(mean_residual(model, POSITIVE, 2), expected_pos, atol=1e-4, rtol=1e-4)
    expected = expected_pos - reference_mean(hf, tokenizer, NEGATIVE, 2)
    torch.testing.assert_close(steering_vector(model, POSITIVE, NEGATIVE, 2), expected, atol=1e-4, rtol=1e-4)


def hf_greedy(hf, tokenizer, prompt: str, n: int) -> str:
    ids = encode(tokenizer, prompt)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_text_equals_hf_generate(small):
    hf, tokenizer, model = small
    steps = []
    text = generate_text(model, "Once upon a time", max_new_tokens=6, on_step=steps.append)
    assert text == hf_greedy(hf, tokenizer, "Once upon a time", 6)
    assert len(steps) == 6


def test_steered_generation_equals_hf_generate_with_a_hook(small):
    hf, tokenizer, model = small
    vector = steering_vector(model, POSITIVE, NEGATIVE, 1)
    scale = 6.0

    def add(module, args, output):
        return output + scale * vector

    with hooked(hf.model.layers[1], add):
        expected = hf_greedy(hf, tokenizer, "I think that you are", 8)
    steered = generate_text(model, "I think that you are", 8, steer=vector, layer=1, scale=scale)
    assert steered == expected
    assert steered != generate_text(model, "I think that you are", 8)  # the vector does something
    with pytest.raises(ValueError, match="layer"):
        generate_text(model, "Hi", 2, steer=vector)


# -- tables and plots --------------------------------------------------------------------------
def test_format_table_aligns_numbers_right_and_text_left():
    text = format_table(["layer", "token", "p"], [[0, "' a'", 0.5], [12, "' Paris'", 0.123456]])
    lines = text.splitlines()
    assert lines[0] == "layer  token          p"
    assert lines[1] == "-----  --------  ------"
    assert lines[2] == "    0  ' a'      0.5000"
    assert lines[3] == "   12  ' Paris'  0.1235"
    assert format_table(["a"], [["x"]], title="T").splitlines()[0] == "T"
    assert format_table(["n", "s"], [["1.5", "x"]], align="lr").splitlines()[2] == "1.5  x"
    with pytest.raises(ValueError):
        format_table(["a", "b"], [[1]])
    assert bar(0.5, width=4) == "##.." and bar(2.0, width=3) == "###"


def test_heatmap_png_for_one_and_several_positions(tmp_path):
    for positions in ([-1], [-2, -1]):
        result = PatchingResult(
            layers=[0, 1, 2], positions=positions, targets=list(TARGETS),
            probs=torch.rand(3, len(positions), 2), clean=torch.tensor([0.6, 0.1]),
            corrupted=torch.tensor([0.01, 0.7]), clean_tokens=[" x"] * len(positions),
            corrupted_tokens=[" y"] * len(positions),
        )
        path = patching_heatmap(result, tmp_path / f"heat{len(positions)}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC
