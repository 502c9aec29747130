"""The wrapper's entry points besides ``trace``: ``edit``, ``session``,
``scan``, ``tracer.cache``, aliases, and the nnsight-compatible names."""

from __future__ import annotations

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine, assert_same_state, record_outputs, state_snapshot


def test_edit_applies_to_the_new_wrapper_only(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.edit() as ablated:
        model.act.output[:] = 0
    with torch.no_grad():
        hidden_by_hand = torch.relu(mlp.fc1(x))  # the reference, without the module's own forward
        with ablated.trace(x):
            edited_hidden = model.act.output.save()
            edited = model.output.save()
        with model.trace(x):
            plain = model.output.save()
        assert torch.allclose(edited, mlp.fc2(torch.zeros(2, 8)))
        assert torch.equal(edited_hidden, torch.zeros(2, 8))
        assert torch.allclose(plain, mlp.fc2(hidden_by_hand))
        # the module itself is untouched: called directly after the edited trace,
        # its act (seen by a raw hook) and its output are the unedited ones
        direct, seen = record_outputs(mlp, ["act"], x)
        assert torch.equal(seen["act"][0], hidden_by_hand)
        assert torch.allclose(direct, mlp.fc2(hidden_by_hand))
    assert_pristine(mlp)


def test_edit_captures_variables_and_inplace_and_clear(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    shift = torch.full((8,), 0.5)
    with model.edit(inplace=True):
        model.fc1.output[:] += shift
    del shift  # the edit keeps the value it captured
    with torch.no_grad():
        with model.trace(x):
            out = model.output.save()
        assert torch.allclose(out, mlp.fc2(torch.relu(mlp.fc1(x) + 0.5)))
        model.clear_edits()
        with model.trace(x):
            out = model.output.save()
        assert torch.allclose(out, mlp(x))


def test_edit_applies_to_every_invoke(mlp):
    model = seethrough.Model(mlp)
    with model.edit() as ablated:
        model.act.output[:] = 0
    with torch.no_grad():
        with ablated.trace() as tracer:
            with tracer.invoke(torch.randn(1, 4)):
                a = model.output.save()
            with tracer.invoke(torch.randn(2, 4)):
                b = model.output.save()
        zero_out = mlp.fc2(torch.zeros(1, 8))
    assert torch.allclose(a, zero_out) and torch.allclose(b, zero_out.expand(2, 3))


def test_session_values_flow_between_traces(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.session():
            with model.trace(a):
                hidden = model.fc1.output.save()
            with model.trace(b):
                model.fc1.output[:] = hidden
                patched = model.output.save()
        assert torch.allclose(patched, mlp(a))


def test_scan_gives_shapes_without_compute(cnn):
    model = seethrough.Model(cnn)
    snapshot = state_snapshot(cnn)
    versions = {name: p._version for name, p in cnn.named_parameters()}
    with model.scan(torch.randn(5, 3, 8, 8)):
        conv = model.conv2.output.save()
        logits = model.output.save()
    assert tuple(conv.shape) == (5, 8, 4, 4)
    assert tuple(logits.shape) == (5, 5)
    assert type(conv).__name__ == "FakeTensor"
    assert_same_state(cnn, snapshot)
    assert versions == {name: p._version for name, p in cnn.named_parameters()}
    assert_pristine(cnn)


def test_scan_on_gpt2(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    with model.scan(torch.zeros(2, 7, dtype=torch.long)):
        hidden = model.transformer.h[1].output.save()
    assert tuple(hidden.shape) == (2, 7, 32)


def test_cache_records_every_module_by_path(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    ref_out, seen = record_outputs(mlp, ["fc1", "act", "fc2"], x)
    with torch.no_grad():
        with model.trace(x) as tracer:
            cache = tracer.cache()
    assert set(cache.keys()) == {"model", "model.fc1", "model.act", "model.fc2"}
    assert torch.equal(cache["model.fc1"].output, seen["fc1"][0])
    assert torch.equal(cache.model.act.output, seen["act"][0])
    assert torch.equal(cache["model"].output, ref_out)
    with pytest.raises(KeyError, match="model.fc1"):
        cache["model.fc"]


def test_cache_selected_modules_with_inputs_and_edits(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with torch.no_grad():
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=[model.fc1, "model.fc2"], include_inputs=True)
            model.fc1.output[:] = 1.0
    assert set(cache.keys()) == {"model.fc1", "model.fc2"}
    assert torch.equal(cache["model.fc1"].output, torch.ones(2, 8))  # recorded after the edit
    assert torch.equal(cache["model.fc1"].input, x)
    assert torch.allclose(cache["model.fc2"].input, torch.ones(2, 8))


def test_cache_allows_reading_a_module_after_it_ran(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with torch.no_grad():
        with model.trace(x) as tracer:
            tracer.cache(modules=[model.fc1])
            out = model.output.save()
            early = model.fc1.output.save()  # fc1 ran long ago, but it was cached
    assert torch.allclose(early, mlp.fc1(x))
    assert torch.allclose(out, mlp(x))


def test_cache_records_each_call_of_a_shared_module(shared_twice):
    model = seethrough.Model(shared_twice)
    x = torch.randn(2, 6)
    _, seen = record_outputs(shared_twice, ["block"], x)
    with torch.no_grad():
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=[model.block])
    entry = cache["model.block"]
    assert len(entry.outputs) == 2
    # as nnsight: `.output` of a module that ran twice is the list of both outputs
    assert len(entry) == 2 and isinstance(entry.output, list)
    assert torch.equal(entry.outputs[0], seen["block"][0]) and torch.equal(entry.output[1], seen["block"][1])


def test_standard_aliases_gpt2(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    assert model.layers[0]._module is tiny_gpt2.transformer.h[0]
    assert model.embed._module is tiny_gpt2.transformer.wte
    assert model.final_norm._module is tiny_gpt2.transformer.ln_f
    assert model.unembed._module is tiny_gpt2.lm_head
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        with model.trace(ids):
            attn = model.layers[1].attn.output[0].save()
            via_alias = model.layers[1].output.save()
        _, seen = record_outputs(tiny_gpt2, ["transformer.h.1", "transformer.h.1.attn"], ids)
    assert torch.equal(via_alias, seen["transformer.h.1"][0])
    assert attn.shape == (1, 3, 32) and torch.equal(attn, seen["transformer.h.1.attn"][0][0])


def test_standard_aliases_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    llama = LlamaForCausalLM(config).eval()
    model = seethrough.Model(llama)
    assert model.layers[1].attn._module is llama.model.layers[1].self_attn
    assert model.layers[1].mlp._module is llama.model.layers[1].mlp
    assert model.final_norm._module is llama.model.norm
    assert model.embed._module is llama.model.embed_tokens
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = llama(ids, output_hidden_states=True)
        with model.trace(ids):
            h = model.layers[0].output.save()
    assert torch.allclose(h, ref.hidden_states[1], atol=1e-5)


def test_rename(mlp):
    model = seethrough.Model(mlp, rename={"fc1": "encoder", "fc2": "decoder"})
    assert model.encoder._module is mlp.fc1
    x = torch.randn(1, 4)
    with model.trace(x):
        h = model.encoder.output.save()
    assert torch.allclose(h, mlp.fc1(x))
    nested = seethrough.Model(torch.nn.Sequential(mlp), rename={"0.fc1": "first"})
    assert nested.first._module is mlp.fc1
    with pytest.raises(ValueError, match="identifiers"):
        seethrough.Model(mlp, rename={"fc1": "not valid"})


def test_envoy_tree_mirrors_module(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    assert repr(model) == repr(tiny_gpt2)
    blocks = list(model.transformer.h)
    assert len(blocks) == len(model.transformer.h) == 2
    assert model.transformer.h[-1]._module is tiny_gpt2.transformer.h[1]
    assert [b._module for b in model.transformer.h[0:2]] == list(tiny_gpt2.transformer.h)
    assert model.transformer.h[1].path == "transformer.h.1"
    assert "h" in dir(model.transformer)
    assert model.config is tiny_gpt2.config
    assert model.lm_head.weight is tiny_gpt2.lm_head.weight


def test_child_named_like_an_accessor_is_reachable():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.output = torch.nn.Linear(2, 2)  # like BERT's `BertLayer.output`

        def forward(self, x):
            return self.output(x) * 2

    net = Block()
    model = seethrough.Model(net)
    x = torch.randn(1, 2)
    with torch.no_grad():
        with model.trace(x):
            inner = model.output_.output.save()  # the child module's output
            outer = model.output.save()  # the root's output
    assert torch.allclose(inner, net.output(x)) and torch.allclose(outer, net.output(x) * 2)


def test_nnsight_names_exist():
    assert seethrough.NNsight is seethrough.Model
    assert callable(seethrough.save)
    assert hasattr(seethrough.CONFIG, "API") and hasattr(seethrough.CONFIG, "set_default_api_key")
    x = torch.ones(2)
    assert seethrough.save(x) is x  # outside a trace: a no-op


def test_barrier_hands_a_value_to_the_next_invoke(mlp):
    model = seethrough.Model(mlp)
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    with torch.no_grad():
        with model.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(a):
                h = model.fc1.output.save()
                barrier()
            with tracer.invoke(b):
                barrier()
                model.fc1.output[:] = h
                out = model.output.save()
        # Reference: plain forwards; b's fc1 output replaced by a's.
        assert torch.allclose(h, mlp.fc1(a), atol=1e-6)
        assert torch.allclose(out, mlp.fc2(mlp.act(mlp.fc1(a))), atol=1e-6)
