"""The wrapper's entry points besides ``trace``: ``edit``, ``session``,
``scan``, ``tracer.cache``, aliases, and the nnsight-compatible names."""

from __future__ import annotations

import contextlib
import gc
import weakref

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


# -- lifetime: dropping the wrapper frees it (and its run state) at once ------------------------
#
# Envoys hold their wrapper weakly, an edit does not hold the wrapper it belongs
# to, a cache and the placeholders of unsaved names hold no run: so no reference
# cycle keeps a dropped wrapper alive, and it goes by reference counting alone,
# without waiting for the garbage collector (checked with the collector off).


@contextlib.contextmanager
def _collector_off():
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _run_state() -> list[str]:
    """Objects of a trace run still alive anywhere in the process."""
    from seethrough.tracing.interleaver import Interleaver
    from seethrough.tracing.run import TraceRun
    from seethrough.tracing.tasks import Task

    kinds = (TraceRun, Interleaver, Task)
    return [type(o).__name__ for o in gc.get_objects() if type(o) in kinds]


def _trace(model, x):
    with model.trace(x):
        hidden = model.fc1.output.save()
        model.act.output[:, 0] = 0
    return hidden


def _failing_out_of_order(model, x):
    try:
        with model.trace(x):
            late = model.fc2.output.save()
            early = model.fc1.output.save()
    except seethrough.OutOfOrderError:
        pass


def _failing_user_error(model, x):
    try:
        with model.trace(x):
            model.fc1.output[:] = torch.zeros(3, 3)  # the user's own shape error
    except RuntimeError:
        pass


def _session(model, x):
    with model.session():
        with model.trace(x):
            hidden = model.fc1.output
        with model.trace(x):
            model.fc1.output[:] = hidden * 2
            out = model.output.save()
    return out


def _cache(model, x):
    with model.trace(x) as tracer:
        cache = tracer.cache()
    return cache["model.fc1"].output


def _scan(model, x):
    with model.scan(x):
        shape = model.fc2.output.shape
    return shape


def _edit(model, x):
    with model.edit() as edited:
        model.act.output[:] = 0
    with edited.trace(x):
        out = edited.output.save()
    return out


def _edit_inplace(model, x):
    with model.edit(inplace=True):
        model.act.output[:] = 0
    with model.trace(x):
        out = model.output.save()
    return out


def _invokes_and_barrier(model, x):
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(x):
            shared = model.fc1.output
            barrier()
        with tracer.invoke(x):
            barrier()
            model.fc1.output[:] = shared
            out = model.output.save()
    return out


def _backward(model, x):
    with model.trace(x.requires_grad_()):
        hidden = model.fc1.output
        with model.output.sum().backward():
            grad = hidden.grad.save()
    return grad


def _source(model, x):
    with model.trace(x):
        hidden = model.fc1.source.F_linear_0.output.save()  # an operation inside the forward
    return hidden


USES = [_trace, _failing_out_of_order, _failing_user_error, _session, _cache, _scan, _edit, _edit_inplace,
        _invokes_and_barrier, _backward, _source]


@pytest.mark.parametrize("use", USES, ids=lambda f: f.__name__.lstrip("_"))
def test_a_dropped_wrapper_is_freed_at_once_after_any_use(mlp, use):
    x = torch.randn(2, 4)
    with _collector_off():
        model = seethrough.Model(mlp)
        kept = use(model, x)  # what the use returns (saved values) stays with the user
        ref = weakref.ref(model)
        del model
        assert ref() is None, "the wrapper outlived the last reference to it (a reference cycle)"
        assert _run_state() == []
    del kept
    gc.collect()
    assert_pristine(mlp)


def test_a_dropped_language_model_is_freed_after_generate_and_a_failing_generate(tiny_gpt2, gpt2_tokenizer):
    with _collector_off():
        model = seethrough.LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer)
        with model.generate("The tower is", max_new_tokens=3) as tracer:
            hidden = seethrough.save([])
            for step in tracer.iter[:]:
                hidden.append(model.transformer.h[0].output[0, -1])
        try:
            with model.generate("The tower is", max_new_tokens=2) as tracer:
                late = model.transformer.h[1].output.save()
                early = model.transformer.h[0].output.save()
        except seethrough.OutOfOrderError:
            pass
        ref = weakref.ref(model)
        del model, tracer
        assert ref() is None
        assert _run_state() == []
    assert len(hidden) == 3


def test_values_kept_after_the_wrapper_is_dropped_stay_right_and_hold_no_model(mlp):
    x = torch.randn(3, 4)
    _, seen = record_outputs(mlp, ["fc1", "act"], x)  # the reference: raw forward hooks
    with _collector_off():
        model = seethrough.Model(mlp)
        with torch.no_grad(), model.trace(x) as tracer:
            cache = tracer.cache()
            unsaved = model.act.output  # handed back as a placeholder: not saved
        ref = weakref.ref(model)
        del model, tracer
        assert ref() is None  # neither the cache nor the placeholder holds the wrapper
    assert torch.equal(cache["model.fc1"].output, seen["fc1"][0])  # read by module path, as before
    assert torch.equal(cache.model.act.output, seen["act"][0])
    with pytest.raises(seethrough.NotSavedError):
        unsaved.shape


def test_an_envoy_kept_after_its_wrapper_is_dropped_keeps_working(tiny_gpt2, gpt2_tokenizer):
    class Marked(seethrough.Envoy):
        pass

    # a chain on a wrapper nobody keeps: the wrapper goes at once, its envoys stay usable
    blocks = seethrough.LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer, envoys={"attn": Marked},
                                      rename={"mlp": "ffn"}).transformer.h
    gc.collect()
    assert type(blocks[1].attn) is Marked  # the wrapper's envoy classes
    assert blocks[1].ffn is blocks[1].mlp  # and its aliases
    assert blocks[0].mlp.c_fc._module is tiny_gpt2.transformer.h[0].mlp.c_fc


def test_a_wrapper_subclass_keeping_its_envoys_in_attributes_is_freed_at_once(mlp):
    class Keeping(seethrough.NNsight):  # as libraries built on nnsight do (`self.layers = ...`)
        def __init__(self, module):
            super().__init__(module)
            self.linears = [self.fc1, self.fc2]
            self._by_name = {"act": self.act}

    with _collector_off():
        model = Keeping(mlp)
        with torch.no_grad(), model.trace(torch.randn(2, 4)):
            first = model.linears[0].output.save()
        ref = weakref.ref(model)
        del model
        assert ref() is None
