"""``tracer.cache()`` read as nnsight documents it, checked against raw
forward hooks: paths as on the model (``cache.model.layers[0]`` and
``cache.model.model.layers[0]`` on a Llama-style LanguageModel, aliases,
renamed names), ``.inputs`` that reads ``None`` when not recorded, one entry
per call (per generation step), and errors whose hints do not repeat what was
typed."""

from __future__ import annotations

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.tracing.cache import CacheKeyError
from fixtures.models import record_outputs


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer


def _encoded(tokenizer, text):
    return tokenizer(text, return_tensors="pt")


def test_language_model_paths_both_spellings(smol):
    model, hf, tokenizer = smol
    text = "The capital of France is"
    _, seen = record_outputs(hf, ["model.layers.0", "model.layers.2.mlp", "lm_head"], **_encoded(tokenizer, text))
    with torch.no_grad():
        with model.trace(text) as tracer:
            cache = tracer.cache(modules=[model.model.layers[0], "model.layers.2.mlp", model.lm_head])
    ref = seen["model.layers.0"][0]
    assert torch.equal(cache.model.layers[0].output, ref)  # standard alias `layers`
    assert torch.equal(cache.model.model.layers[0].output, ref)  # the real path
    assert torch.equal(cache["model.model.layers.0"].output, ref)
    assert torch.equal(cache["model.layers.0"].output, ref)
    assert torch.equal(cache.layers[0].output, ref)  # short form, without `model`
    assert torch.equal(cache.model.layers[-4].output, ref)  # negative index, 4 layers
    assert torch.equal(cache.model.layers[2].mlp.output, seen["model.layers.2.mlp"][0])
    assert torch.equal(cache.model.unembed.output, seen["lm_head"][0])
    assert "model.model.layers.0" in cache and "model.layers.0" in cache
    assert set(cache.keys()) == {"model.model.layers.0", "model.model.layers.2.mlp", "model.lm_head"}


def test_inputs_read_none_when_not_recorded_and_match_hooks_when_recorded(smol):
    model, hf, tokenizer = smol
    text = "Hello there"
    seen = []
    handle = hf.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            with model.trace(text) as tracer:
                plain = tracer.cache(modules=[model.model.layers[1]])
                full = tracer.cache(modules=[model.model.layers[1]], include_inputs=True)
    finally:
        handle.remove()
    assert plain.model.layers[1].inputs is None and plain.model.layers[1].input is None
    args, kwargs = full.model.layers[1].inputs
    ref_args, ref_kwargs = seen[0]
    assert len(args) == len(ref_args) and set(kwargs) == set(ref_kwargs)
    first = ref_args[0] if ref_args else next(iter(ref_kwargs.values()))
    assert torch.equal(full.model.layers[1].input, first)
    outputs_only = full  # both recorded: one call with both slots
    assert len(outputs_only.model.layers[1]) == 1


def test_generate_gives_one_entry_per_step(smol):
    model, hf, tokenizer = smol
    steps = 4
    seen = []
    handle = hf.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            ref_ids = hf.generate(**_encoded(tokenizer, "Once upon a time"), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    with torch.no_grad():
        with model.generate("Once upon a time", max_new_tokens=steps, do_sample=False) as tracer:
            cache = tracer.cache(modules=[model.model.layers[0]])
            ids = tracer.result.save()
    entry = cache["model.model.layers.0"]
    assert torch.equal(ids, ref_ids)
    assert len(entry) == steps == len(seen)
    assert isinstance(entry.output, list) and len(entry.output) == steps
    for step in range(steps):
        assert torch.equal(entry[step].output, seen[step])
        assert torch.equal(entry.output[step], seen[step])
    assert [call.output.shape[1] for call in entry] == [seen[0].shape[1], 1, 1, 1]  # prompt, then one token


def test_edits_are_in_the_cache(smol):
    model, _, _ = smol
    with torch.no_grad():
        with model.trace("Hello") as tracer:
            cache = tracer.cache(modules=["model.layers.1"])
            model.model.layers[1].output[:] = 0
    assert torch.count_nonzero(cache.model.layers[1].output) == 0


def test_renamed_names_work_in_cache_access(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2, rename={"transformer.h": "blocks", "1": "second", "mlp": "ffn"})
    ids = torch.tensor([[5, 6, 7]])
    _, seen = record_outputs(tiny_gpt2, ["transformer.h.1", "transformer.h.0.mlp"], ids)
    with torch.no_grad():
        with model.trace(ids) as tracer:
            cache = tracer.cache()
    assert torch.equal(cache.model.blocks[1].output, seen["transformer.h.1"][0])
    assert torch.equal(cache.model.transformer.h.second.output, seen["transformer.h.1"][0])
    assert torch.equal(cache["model.blocks.0.ffn"].output, seen["transformer.h.0.mlp"][0])
    assert torch.equal(cache.model.blocks[0].ffn.output, seen["transformer.h.0.mlp"][0])


def test_missing_paths_name_the_fix_without_repeating_the_typed_path(smol):
    model, _, _ = smol
    with torch.no_grad():
        with model.trace("Hello") as tracer:
            cache = tracer.cache(modules=[model.model.layers[0], model.model.layers[1]])
    with pytest.raises(KeyError) as info:
        cache["model.model.layers.3"]  # a real module, not cached
    message = str(info.value)
    assert "was not cached" in message and "tracer.cache(modules=" in message
    assert "Did you mean `model.model.layers.3`" not in message
    with pytest.raises(AttributeError) as info:
        cache.model.model.layerz  # no such module
    message = str(info.value)
    assert "model.model.layerz" in message and "names no module" in message
    assert isinstance(info.value, seethrough.SeethroughError) and isinstance(info.value, CacheKeyError)
    with pytest.raises(KeyError, match="names no module"):
        cache["model.nothing.here"]


def test_module_called_twice_has_two_calls(shared_twice):
    model = seethrough.Model(shared_twice)
    x = torch.randn(3, 6)
    _, seen = record_outputs(shared_twice, ["block"], x)
    with torch.no_grad():
        with model.trace(x) as tracer:
            cache = tracer.cache(modules=[model.block], include_inputs=True)
    entry = cache.model.block
    assert len(entry) == 2
    assert torch.equal(entry[0].output, seen["block"][0]) and torch.equal(entry[1].output, seen["block"][1])
    assert torch.equal(entry[0].input, x) and torch.equal(entry[1].input, torch.tanh(seen["block"][0]))
    with pytest.raises(IndexError, match="2 time"):
        entry[2]


def test_a_cache_with_a_single_invoke_matches_hooks(smol):
    model, hf, tokenizer = smol
    text = "The capital of France is"
    _, seen = record_outputs(hf, ["model.layers.1", "lm_head"], **_encoded(tokenizer, text))
    with torch.no_grad(), model.trace() as tracer:
        cache = tracer.cache(modules=[model.model.layers[1], model.lm_head])
        with tracer.invoke(text):
            model.model.layers[1].output.save()
    assert torch.equal(cache.model.layers[1].output, seen["model.layers.1"][0])
    assert torch.equal(cache.lm_head.output, seen["lm_head"][0])


def test_a_cache_made_in_an_invoke_keeps_that_invokes_rows(smol):
    # nnsight 0.8.1: `tracer.cache()` inside an invoke records its rows of the batch.
    model, hf, tokenizer = smol
    texts = ["The capital of France is", "Hi there"]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    _, seen = record_outputs(hf, ["model.layers.0"], **encoded)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(texts[0]):
            first = tracer.cache(modules=[model.model.layers[0]], include_inputs=True)
        with tracer.invoke(texts[1]):
            second = tracer.cache(modules=[model.model.layers[0]])
            late = model.model.layers[0].output.save()  # after its cache: read from the forward
        with tracer.invoke():
            whole = tracer.cache(modules=[model.model.layers[0]])
    batch = seen["model.layers.0"][0]
    assert batch.shape[0] == 2
    assert torch.equal(first.model.layers[0].output, batch[0:1])
    assert first.model.layers[0].input.shape[0] == 1
    # The padded row: seethrough passes position ids for padding, the plain call does
    # not, so that row is compared with the whole-batch cache and the invoke's own read.
    assert torch.equal(whole.model.layers[0].output[0:1], batch[0:1])
    assert torch.equal(second.model.layers[0].output, whole.model.layers[0].output[1:2])
    assert torch.equal(late, second.model.layers[0].output)
