"""nnterp (a library built on nnsight) on seethrough, through the stand-in.

nnterp is used exactly as its users use it (``StandardizedTransformer(path)``,
its accessors, ``logit_lens``, ``steer``, ``patchscope_lens``, ...), on tiny
random models of six families and on SmolLM2, and every number is checked
against plain HuggingFace with raw forward hooks.  nnterp's own test suite
runs with ``scripts/nnterp_suite.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import seethrough
from seethrough import _stand_in
from seethrough.models import offline

# family -> (layers, attention, mlp or None, final norm), real module paths of the HF model
LAYOUT = {
    "llama": ("model.layers", "self_attn", "mlp", "model.norm"),
    "qwen2": ("model.layers", "self_attn", "mlp", "model.norm"),
    "gpt2": ("transformer.h", "attn", "mlp", "transformer.ln_f"),
    "bloom": ("transformer.h", "self_attention", "mlp", "transformer.ln_f"),
    "opt": ("model.decoder.layers", "self_attn", None, "model.decoder.final_layer_norm"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
}
PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def nnterp():
    """nnterp imported with seethrough standing in for nnsight (switched off afterwards)."""
    had = "nnterp" in sys.modules
    _stand_in.activate()
    try:
        import nnterp as module  # installed by scripts/setup-env.sh (test): a missing one fails, never skips
        from nnterp.nnsight_utils import LanguageModel

        if LanguageModel is not seethrough.LanguageModel and not had:
            pytest.fail("nnterp was imported on the real nnsight")
        yield module
    finally:
        _stand_in.undo()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lms")
    return {family: offline.save_random_lm(root / family, family) for family in LAYOUT}


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _reference(hf, tokenizer, family, prompt, edit=None):
    """Plain HF forward with raw hooks: {name: tensor} of layer inputs/outputs,
    attention and MLP outputs, the final norm and the logits.  ``edit(i, output)``
    may replace layer ``i``'s output."""
    layers_path, attn, mlp, norm = LAYOUT[family]
    layers = hf.get_submodule(layers_path)
    seen, handles = {}, []

    def keep(name, index=None):
        def hook(module, args, output):
            seen[name] = _first(output)
            if edit is not None and index is not None:
                replaced = edit(index, _first(output), args)
                if replaced is not None:
                    return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"in{i}", a[0])))
        handles.append(layer.register_forward_hook(keep(f"out{i}", i)))
        handles.append(layer.get_submodule(attn).register_forward_hook(keep(f"attn{i}")))
        if mlp is not None:
            handles.append(layer.get_submodule(mlp).register_forward_hook(keep(f"mlp{i}")))
    handles.append(hf.get_submodule(norm).register_forward_hook(keep("norm")))
    try:
        with torch.no_grad():
            seen["logits"] = hf(**tokenizer(prompt, return_tensors="pt")).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("family", list(LAYOUT))
def test_accessors_equal_raw_hooks(nnterp, folders, family):
    model = nnterp.StandardizedTransformer(str(folders[family]))
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (2, 32, 50257)
    has_mlp = LAYOUT[family][2] is not None
    with torch.no_grad():
        with model.trace(PROMPT):
            got = {}
            for i in range(model.num_layers):
                got[f"in{i}"] = model.layers_input[i].save()
                got[f"attn{i}"] = model.attentions_output[i].save()
                if has_mlp:
                    got[f"mlp{i}"] = model.mlps_output[i].save()
                got[f"out{i}"] = model.layers_output[i].save()
            got["norm"] = model.ln_final.output.save()
            got["logits"] = model.logits.save()
    want = _reference(*_hf(folders[family]), family, PROMPT)
    for name, value in got.items():
        assert torch.allclose(value, want[name], atol=1e-5), name
    assert model.layers[0]._module is model._model.get_submodule(LAYOUT[family][0] + ".0")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_equals_manual_projection(nnterp, folders, family):
    from nnterp.interventions import logit_lens

    model = nnterp.StandardizedTransformer(str(folders[family]))
    prompts = ["Hello", "The capital of France is"]  # of different lengths: a left-padded batch
    probs = logit_lens(model, prompts)
    assert probs.shape == (2, 2, 50257)
    hf, tokenizer = _hf(folders[family])
    norm, head = hf.get_submodule(LAYOUT[family][3]), hf.get_output_embeddings()
    for row, prompt in enumerate(prompts):
        seen = _reference(hf, tokenizer, family, prompt)
        for layer in range(2):
            with torch.no_grad():
                manual = head(norm(seen[f"out{layer}"][:, -1])).softmax(-1)[0]
            assert torch.allclose(probs[row, layer], manual, atol=1e-5), (prompt, layer)


@pytest.mark.parametrize("family", ["llama", "bloom", "opt"])
def test_steer_equals_a_raw_hook(nnterp, folders, family):
    model = nnterp.StandardizedTransformer(str(folders[family]))
    torch.manual_seed(0)
    vector = torch.randn(32)
    with torch.no_grad():
        with model.trace(PROMPT):
            model.steer(layers=1, steering_vector=vector, factor=2.0, token_positions=[0, 2])
            steered = model.logits.save()

    def add(index, output, args):
        if index == 1:
            output = output.clone()
            output[:, [0, 2]] += 2.0 * vector
            return output

    want = _reference(*_hf(folders[family]), family, PROMPT, edit=add)["logits"]
    plain = _reference(*_hf(folders[family]), family, PROMPT)["logits"]
    assert torch.allclose(steered, want, atol=1e-5) and not torch.allclose(steered, plain, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_skip_layer_passes_its_input_through(nnterp, folders, family):
    model = nnterp.StandardizedTransformer(str(folders[family]))
    with torch.no_grad():
        with model.trace(PROMPT):
            model.skip_layer(1)  # reads layers_input[1], then skips layer 1 with it
            skipped = model.logits.save()
    want = _reference(*_hf(folders[family]), family, PROMPT,
                      edit=lambda i, output, args: args[0] if i == 1 else None)["logits"]
    assert torch.allclose(skipped, want, atol=1e-5)


def test_token_activations_and_patchscope_equal_manual_patching(nnterp, folders):
    from nnterp.interventions import TargetPrompt, patchscope_lens
    from nnterp.nnsight_utils import get_token_activations

    model = nnterp.StandardizedTransformer(str(folders["llama"]))
    hf, tokenizer = _hf(folders["llama"])
    sources = ["Paris is in", "Rome"]
    acts = get_token_activations(model, sources)
    assert acts.shape == (2, 2, 32)
    for row, prompt in enumerate(sources):
        seen = _reference(hf, tokenizer, "llama", prompt)
        for layer in range(2):
            assert torch.allclose(acts[layer, row], seen[f"out{layer}"][0, -1], atol=1e-5)
    target = TargetPrompt("cat -> cat ; dog -> dog ; ?", -1)
    probs = patchscope_lens(model, sources, target, layers=[1])
    for row in range(2):
        latent = acts[1, row]

        def patch(index, output, args):
            if index == 1:
                output = output.clone()
                output[:, -1] = latent
                return output

        logits = _reference(hf, tokenizer, "llama", target.prompt, edit=patch)["logits"]
        assert torch.allclose(probs[row, 0], logits[0, -1].softmax(-1), atol=1e-5)


def test_attention_probabilities_equal_hf_eager_attentions(nnterp, folders):
    model = nnterp.StandardizedTransformer(str(folders["llama"]), enable_attention_probs=True)
    assert model.attn_probs_available
    with torch.no_grad():
        with model.trace(PROMPT):
            probs = model.attention_probabilities[1].save()
    hf = AutoModelForCausalLM.from_pretrained(folders["llama"], attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    with torch.no_grad():
        want = hf(**tokenizer(PROMPT, return_tensors="pt"), output_attentions=True).attentions[1]
    assert torch.allclose(probs, want, atol=1e-6)


def test_loaded_tokenizer_pads_left_with_eos(nnterp, folders):
    model = nnterp.StandardizedTransformer(str(folders["gpt2"]))
    tokenizer = model.tokenizer
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    batch = tokenizer(["a", "a b c"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padded


def test_remote_option_registers_nnterp_without_loading_weights(nnterp, folders):
    from seethrough.remote.client import registry

    was = "nnterp" in registry.registered()
    try:
        model = nnterp.StandardizedTransformer(str(folders["gpt2"]), remote=True)
        assert "nnterp" in registry.registered()
        assert not model.dispatched  # renaming checked by a scan (allow_dispatch=False), on the meta device
        assert model.layers[1]._module is model._model.transformer.h[1]
        from nnterp.nnsight_utils import get_layer_output
        from seethrough.remote.client.connection import RemoteRequestError

        with torch.no_grad():
            with model.trace(PROMPT, remote="local"):  # the wrapper is the model, whatever its class
                remote = model.transformer.h[1].output.save()
            with model.trace(PROMPT):
                local = model.transformer.h[1].output.save()
        assert torch.equal(remote, local)
        with pytest.raises(RemoteRequestError, match=r"registered module `nnterp\.nnsight_utils`.*sandbox"):
            with model.trace(PROMPT, remote="local"):
                get_layer_output(model, 0).save()  # nnterp's own source: imports typing, decorators, ...
    finally:
        if not was:
            registry.unregister("nnterp")


def test_smollm2_logit_lens_last_layer_is_the_models_prediction(nnterp, smollm2_small_dir):
    from nnterp.interventions import logit_lens

    model = nnterp.StandardizedTransformer(str(smollm2_small_dir))
    assert model.num_layers == 4 and model.hidden_size == 576
    prompt = "The capital of France is"
    lens = logit_lens(model, prompt)
    with torch.no_grad():
        with model.trace(prompt):
            final = model.next_token_probs.save()
    assert torch.allclose(lens[0, -1], final[0], atol=1e-5)
    hf, tokenizer = _hf(smollm2_small_dir)
    with torch.no_grad():
        want = hf(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].softmax(-1)
    assert torch.allclose(final[0], want, atol=1e-5)


@pytest.mark.slow
def test_full_smollm2_standardized_predicts_paris(nnterp, smollm2_dir):
    model = nnterp.StandardizedTransformer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert model.num_layers == 30
    with torch.no_grad():
        with model.trace("The capital of France is"):
            probs = model.next_token_probs.save()
    top = int(probs[0].argmax())
    assert model.tokenizer.decode([top]) == " Paris" and float(probs[0, top]) > 0.5
