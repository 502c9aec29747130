"""LanguageModel on real models: loading, inputs, batching and generation,
checked against plain HuggingFace forward / generate (with raw hooks where an
intervention is involved)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import seethrough
from seethrough import LanguageModel
from seethrough.models.language import LanguageModelError
from fixtures.models import hf_generate


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer


def _hf_logits(hf, tokenizer, text):
    with torch.no_grad():
        return hf(**tokenizer(text, return_tensors="pt")).logits


# -- loading ----------------------------------------------------------------------

def test_folder_loads_lazily_then_on_first_trace(gpt2_dir):
    model = LanguageModel(str(gpt2_dir))
    assert not model.dispatched
    assert next(model._model.parameters()).device.type == "meta"
    assert "GPT2LMHeadModel" in repr(model)
    layer = model.transformer.h[0]  # an envoy made before the weights exist
    with model.scan("Hello world"):
        shape = model.transformer.h[1].output.save().shape
    assert tuple(shape) == (1, 2, 32)
    assert not model.dispatched
    with torch.no_grad():
        with model.trace("Hello world"):
            hidden = layer.output.save()
    assert model.dispatched
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    with torch.no_grad():
        ref = hf(**tokenizer("Hello world", return_tensors="pt"), output_hidden_states=True)
    assert torch.allclose(hidden, ref.hidden_states[1], atol=1e-5)  # [2] has ln_f applied


def test_dispatch_and_dtype_pass_through(gpt2_dir):
    model = LanguageModel(str(gpt2_dir), dispatch=True, dtype=torch.float64, device_map="cpu")
    assert model.dispatched
    assert next(model._model.parameters()).dtype == torch.float64


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(LanguageModelError, match="no-such-model'.*no folder with a model at that path"):
        LanguageModel(str(tmp_path / "no-such-model"))


def test_model_object_with_tokenizer(smol):
    model, hf, tokenizer = smol
    assert model._model is hf and model.tokenizer is tokenizer
    assert model.layers[0]._module is hf.model.layers[0]
    with torch.no_grad():
        with model.trace("The capital of France is"):
            logits = model.output.logits.save()
    assert torch.allclose(logits, _hf_logits(hf, tokenizer, "The capital of France is"), atol=1e-5)


def test_bert_encoder_through_generic_and_language_paths(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    bert = AutoModel.from_pretrained(minilm_dir).eval()
    encoded = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = bert(**encoded, output_hidden_states=True)
    generic = seethrough.Model(bert)
    with torch.no_grad():
        with generic.trace(**encoded):
            layer2 = generic.encoder.layer[2].output.save()
    assert torch.allclose(layer2, ref.hidden_states[3], atol=1e-5)
    lm = LanguageModel(str(minilm_dir), dispatch=True)
    assert type(lm._model).__name__ == "BertModel"
    with torch.no_grad():
        with lm.trace("a short one"):
            last = lm.output.last_hidden_state.save()
        alone = bert(**tokenizer("a short one", return_tensors="pt")).last_hidden_state
    assert torch.allclose(last, alone, atol=1e-5)


@pytest.mark.slow
def test_default_model_offline_paris(smollm2_dir):
    model = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    with torch.no_grad():
        with model.trace("The capital of France is"):
            probs = torch.softmax(model.output.logits[0, -1], -1).save()
    paris = model.tokenizer.encode(" Paris")[0]
    assert int(probs.argmax()) == paris
    assert 0.7 < float(probs[paris]) < 0.85


# -- inputs -------------------------------------------------------------------

def test_input_kinds_agree(smol):
    model, hf, tokenizer = smol
    text = "The capital of France is"
    ids = tokenizer(text)["input_ids"]
    expected = _hf_logits(hf, tokenizer, text)
    for value in (text, [text], ids, [ids], torch.tensor(ids), torch.tensor([ids]), tokenizer(text, return_tensors="pt"), {"input_ids": ids}):
        with torch.no_grad():
            with model.trace(value):
                logits = model.output.logits.save()
        assert torch.allclose(logits, expected, atol=1e-5), type(value)


def test_chat_messages_use_the_chat_template(smol):
    model, hf, tokenizer = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        with model.trace(messages):
            ids = model.input.save()
    assert ids[0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_mixed_kinds_are_refused(smol):
    model, _, _ = smol
    with pytest.raises(LanguageModelError, match="mixed kinds"):
        with model.trace(["some text", 42]):
            pass


def test_missing_pad_token_is_a_clear_error(gpt2_dir):
    # Without a pad token, padding uses the EOS token (tests/test_wrappers.py);
    # with neither, a clear error.
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    hf.config.pad_token_id = None
    hf.config.eos_token_id = None
    model = LanguageModel(hf, tokenizer=tokenizer)
    with model.trace("same length"):  # one row: no padding needed
        pass
    with pytest.raises(LanguageModelError, match="pad or end-of-sequence token"):
        with model.trace(["short", "a much longer input"]):
            pass


def test_batched_rows_equal_single_runs(smol):
    model, hf, tokenizer = smol
    prompts = ["Hi", "The capital of France is", "One two three four five six seven"]
    with torch.no_grad():
        with model.trace() as tracer:
            outs = []
            for prompt in prompts:
                with tracer.invoke(prompt):
                    outs.append((model.model.layers[2].output.save(), model.output.logits.save()))
        for prompt, (hidden, logits) in zip(prompts, outs):
            alone = hf(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
            n = alone.logits.shape[1]
            assert torch.allclose(logits[:, -n:], alone.logits, atol=1e-4), prompt
            assert torch.allclose(hidden[:, -n:], alone.hidden_states[3], atol=1e-4), prompt


def test_batched_gpt2_rows_equal_single_runs(gpt2_dir):
    model = LanguageModel(str(gpt2_dir), dispatch=True)
    hf, tokenizer = model._model, model.tokenizer
    prompts = [["Hello world", "A longer prompt goes here"], "x"]
    with torch.no_grad():
        with model.trace() as tracer:
            outs = []
            for prompt in prompts:
                with tracer.invoke(prompt):
                    outs.append(model.output.logits.save())
        assert outs[0].shape[0] == 2 and outs[1].shape[0] == 1
        for text, logits in [("Hello world", outs[0][0:1]), ("A longer prompt goes here", outs[0][1:2]), ("x", outs[1])]:
            alone = hf(**tokenizer(text, return_tensors="pt")).logits
            assert torch.allclose(logits[:, -alone.shape[1]:], alone, atol=1e-5), text


# -- generation -----------------------------------------------------------------

PROMPT = "The capital of France is"




def test_generate_equalshf_generate(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=6, do_sample=False) as tracer:
            pass
    assert torch.equal(tracer.result, hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=6, do_sample=False))


def test_steering_every_step_equals_hf_with_hook(smol):
    model, hf, tokenizer = smol
    torch.manual_seed(1)
    steer = torch.randn(576) * 4
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=8, do_sample=False) as tracer:
            for step in tracer.iter[:]:
                model.model.layers[1].output[:] += steer
            finished = True
            tokens = tracer.result.save()
    expected = hf_generate(hf, tokenizer, [PROMPT], hook=lambda m, a, o: o + steer, max_new_tokens=8, do_sample=False)
    plain = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=8, do_sample=False)
    assert finished is True  # code after an unbounded iter[:] loop ran
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, plain)


def test_per_step_logits_equal_hf_scores(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=4, do_sample=False) as tracer:
            logits = []
            for step in tracer.iter[:]:
                logits.append(model.output.logits[:, -1].save())
    ref = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert len(logits) == 4
    for got, want in zip(logits, ref.logits):
        assert torch.allclose(got, want, atol=1e-4)


def test_iter_selectors(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
            seen_slice = [step for step in tracer.iter[1:3]]
            seen_int = [step for step in tracer.iter[3]]
            seen_list = [step for step in tracer.iter[[4]]]
        with model.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
            seen_all = [step for step in tracer.all()]
            shapes = []
    assert seen_slice == [1, 2] and seen_int == [3] and seen_list == [4]
    assert seen_all == [0, 1, 2]


def test_edit_only_some_steps(smol):
    model, hf, tokenizer = smol
    steer = torch.full((576,), 3.0)
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5, do_sample=False) as tracer:
            for step in tracer.iter[2:]:
                model.model.layers[2].output[:] += steer
    # Reference: HF generate with a hook that acts from the third forward call on.
    calls = []

    def from_third_call(module, args, output):
        calls.append(1)
        return output + steer if len(calls) >= 3 else output

    handle = hf.model.layers[2].register_forward_hook(from_third_call)
    try:
        expected = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(tracer.result, expected)


def test_batched_generation_different_lengths(smol):
    model, hf, tokenizer = smol
    prompts = ["Hi", "The capital of France is", "Once upon a time, in a land"]
    with torch.no_grad():
        with model.generate(max_new_tokens=5, do_sample=False) as tracer:
            rows = []
            for prompt in prompts:
                with tracer.invoke(prompt):
                    rows.append(tracer.result.save())
    for prompt, row in zip(prompts, rows):
        alone = hf_generate(hf, tokenizer, [prompt], max_new_tokens=5, do_sample=False)
        assert row[0, -alone.shape[1]:].tolist() == alone[0].tolist(), prompt


def test_sampling_kwargs_pass_through(smol):
    model, hf, tokenizer = smol
    torch.manual_seed(123)
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9) as tracer:
            pass
    torch.manual_seed(123)
    expected = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(tracer.result, expected)


def test_rejected_generate_kwarg_is_a_clear_error(smol):
    model, _, _ = smol
    with pytest.raises(LanguageModelError, match="max_new_tokenz"):
        with model.generate(PROMPT, max_new_tokenz=3):
            pass


def test_lazy_skeleton_takes_config_overrides(smollm2_dir):
    model = LanguageModel(str(smollm2_dir), num_hidden_layers=4)
    assert not model.dispatched
    assert len(model.model.layers) == 4  # the same shape before and after loading
    model.dispatch()
    assert len(model.model.layers) == 4
