"""nnsight's import paths and custom envoys, ``envoy.get(path)``, and calling an envoy with ``hook=True``.

References are independent of seethrough: raw PyTorch forward hooks and plain
calls of the modules (an SAE applied by hand, heads reshaped by hand).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import seethrough
from seethrough import Envoy, LanguageModel
from seethrough.errors import (
    EnvoyClassError, MissedProviderError, ModuleNotCalledError, ModulePathError, OutOfOrderError, SeethroughError,
)
from fixtures.models import MLP, assert_pristine, assert_same_state, hook_state, record_outputs, state_snapshot


# -- import paths ------------------------------------------------------------------------------


def test_nnsight_import_paths_are_seethroughs_own_classes():
    from seethrough.intervention import Envoy as PackageEnvoy
    from seethrough.intervention.envoy import Envoy as PathEnvoy
    from seethrough.intervention.interleaver import Interleaver, Mediator
    from seethrough.intervention.interleaver import MissedProviderError as PathMissed
    from seethrough.intervention.interleaver import OutOfOrderError as PathOutOfOrder
    from seethrough.tracing.interleaver import Interleaver as RealInterleaver
    from seethrough.tracing.interleaver import Task

    assert PathEnvoy is PackageEnvoy is seethrough.Envoy
    assert PathOutOfOrder is Mediator.OutOfOrderError is OutOfOrderError is seethrough.OutOfOrderError
    assert PathMissed is Mediator.MissedProviderError is MissedProviderError is seethrough.MissedProviderError
    assert Mediator is Task and Interleaver is RealInterleaver
    assert issubclass(MissedProviderError, SeethroughError) and issubclass(OutOfOrderError, MissedProviderError)


class SAE(nn.Module):
    """A tiny sparse autoencoder, attached to a model but not used by its forward."""

    def __init__(self, width: int = 8, features: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(width, features)
        self.decoder = nn.Linear(features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(x)))


@pytest.fixture
def mlp_sae() -> nn.Module:
    torch.manual_seed(0)
    net = MLP().eval()
    net.sae = SAE()
    return net


def test_a_value_the_model_never_provides_is_a_missed_provider_error(mlp_sae):
    from seethrough.intervention.interleaver import Mediator

    model = seethrough.Model(mlp_sae)
    with pytest.raises(Mediator.MissedProviderError) as info:
        with model.trace(torch.randn(2, 4)):
            features = model.sae.encoder.output.save()  # MARK-never
    assert type(info.value) is ModuleNotCalledError  # not a question of order: nothing ran it
    assert isinstance(info.value, Mediator.OutOfOrderError)  # nnsight 0.8.1 raises OutOfOrderError here
    message = str(info.value)
    assert "never called `model.sae.encoder`" in message and "MARK-never" in message and "hook=True" in message
    assert_pristine(mlp_sae)


def test_an_out_of_order_read_is_also_caught_as_missed_provider(mlp_sae):
    from seethrough.intervention.interleaver import Mediator

    model = seethrough.Model(mlp_sae)
    with pytest.raises(Mediator.MissedProviderError) as info:
        with model.trace(torch.randn(2, 4)):
            model.fc2.output.save()
            model.fc1.output.save()
    assert isinstance(info.value, Mediator.OutOfOrderError)


# -- envoys= ----------------------------------------------------------------------------------


class Doubling(Envoy):
    """A custom envoy: a property computed from ``.output`` and a method."""

    @property
    def doubled(self) -> torch.Tensor:
        return self.output * 2

    def top(self, k: int) -> torch.Tensor:
        return self.output.topk(k, dim=-1).indices


class Marked(Envoy):
    pass


class Scaled(nn.Linear):
    """A subclass of nn.Linear: matched by an nn.Linear key along its MRO."""


def test_one_envoy_class_for_every_module(mlp):
    model = seethrough.Model(mlp, envoys=Doubling)
    assert type(model) is seethrough.Model
    assert all(type(envoy) is Doubling for envoy in model.modules() if envoy is not model)
    x = torch.randn(3, 4)
    with model.trace(x):
        doubled = model.fc1.doubled.save()
        top = model.fc2.top(2).save()
    assert torch.equal(doubled, mlp.fc1(x) * 2)
    assert torch.equal(top, mlp(x).topk(2, dim=-1).indices)
    assert_pristine(mlp)


def test_module_types_match_along_the_mro_before_path_suffixes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Scaled(4, 2))
    model = seethrough.Model(net, envoys={"2": Marked, nn.Linear: Doubling, nn.ReLU: Marked})
    assert type(model[0]) is Doubling and type(model[1]) is Marked
    assert type(model[2]) is Doubling  # Scaled is an nn.Linear: the type key wins over the path key "2"
    x = torch.randn(5, 4)
    with model.trace(x):
        last = model[2].doubled.save()
    assert torch.equal(last, net(x) * 2)


def test_path_suffix_keys_match_part_by_part_with_wildcards_and_aliases(smollm2_small):
    hf, tokenizer = smollm2_small
    model = LanguageModel(hf, tokenizer=tokenizer, envoys={"layers.*": Marked, "mlp": Doubling, "model.norm": Doubling})
    assert type(model.model.layers) is Envoy  # `*` is one part: the container is not matched
    assert all(type(layer) is Marked for layer in model.model.layers)
    assert type(model.model.layers[2].mlp) is Doubling and type(model.model.layers[2].mlp.up_proj) is Envoy
    assert type(model.model.norm) is Doubling and type(model.lm_head) is Envoy
    # rename= aliases count, as in nnsight: a part matches its alias
    aliased = LanguageModel(hf, tokenizer=tokenizer, rename={"self_attn": "attention"},
                            envoys={"layers.0.attention": Doubling})
    assert type(aliased.model.layers[0].self_attn) is Doubling
    assert type(aliased.model.layers[1].self_attn) is Envoy
    renamed = seethrough.Model(nn.Sequential(nn.Linear(2, 2)), rename={"0": "first"}, envoys={"first": Marked})
    assert type(renamed[0]) is Marked
    rooted = LanguageModel(hf, tokenizer=tokenizer, rename={"model.layers": "blocks"}, envoys={"blocks.1": Marked})
    assert type(rooted.model.layers[1]) is Marked and type(rooted.model.layers[0]) is Envoy


def test_a_class_attribute_on_a_wrapper_subclass_is_the_default(mlp):
    class MyModel(seethrough.NNsight):
        envoys = {nn.Linear: Doubling}

    class Child(MyModel):
        pass

    assert type(MyModel(mlp).fc1) is Doubling and type(MyModel(mlp).act) is Envoy
    assert type(Child(mlp).fc2) is Doubling  # inherited
    assert type(MyModel(mlp, envoys=Marked).fc1) is Marked  # the argument wins
    assert type(seethrough.Model(mlp).fc1) is Envoy


def test_the_class_attribute_is_used_unless_envoys_none_is_passed(mlp):
    class MyModel(seethrough.NNsight):
        envoys = Doubling

    x = torch.randn(3, 4)
    _, seen = record_outputs(mlp, ["fc1"], x)  # the reference: a raw forward hook
    model = MyModel(mlp)
    with torch.no_grad(), model.trace(x):
        doubled = model.fc1.doubled.save()
    assert torch.equal(doubled, seen["fc1"][0] * 2)
    plain = MyModel(mlp, envoys=None)  # None asks for plain envoys, over the class's default
    assert type(plain.fc1) is Envoy and not hasattr(plain.fc1, "doubled")


def test_a_language_model_subclass_chooses_envoys_by_class_attribute_or_by_init(tiny_gpt2, gpt2_tokenizer):
    class WithAttribute(LanguageModel):
        envoys = {"attn": Marked}

    class WithInit(LanguageModel):  # the nnsight 0.8.1 way: no class attribute there
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("envoys", {"attn": Marked})
            super().__init__(*args, **kwargs)

    for cls in (WithAttribute, WithInit):
        model = cls(tiny_gpt2, tokenizer=gpt2_tokenizer)
        assert type(model.transformer.h[1].attn) is Marked  # GPT-2's module is called `attn`
        assert type(model.transformer.h[1].mlp) is Envoy
        assert type(cls(tiny_gpt2, tokenizer=gpt2_tokenizer, envoys=None).transformer.h[1].attn) is Envoy


def test_string_keys_match_module_names_and_renames_not_standard_aliases(smollm2_small):
    hf, tokenizer = smollm2_small
    model = LanguageModel(hf, tokenizer=tokenizer, envoys={"attn": Marked})
    # `attn` is seethrough's standard name for SmolLM2's `self_attn`, not its name: as in
    # nnsight (which has no standard names), the key matches nothing here
    assert type(model.model.layers[0].self_attn) is Envoy
    assert model.model.layers[0].attn is model.model.layers[0].self_attn  # the alias still reads it
    by_name = LanguageModel(hf, tokenizer=tokenizer, envoys={"self_attn": Marked})
    assert type(by_name.model.layers[0].attn) is Marked
    renamed = LanguageModel(hf, tokenizer=tokenizer, rename={"self_attn": "attn"}, envoys={"attn": Marked})
    assert type(renamed.model.layers[3].self_attn) is Marked  # the user's own rename= counts


def test_custom_envoys_survive_edits_and_clones(mlp):
    model = seethrough.Model(mlp, envoys={nn.Linear: Doubling})
    with model.edit() as edited:
        model.act.output[:] = 0
    assert type(edited.fc2) is Doubling
    x = torch.randn(2, 4)
    with edited.trace(x):
        doubled = edited.fc2.doubled.save()
    assert torch.equal(doubled, mlp.fc2.bias.expand(2, 3) * 2)


@pytest.mark.parametrize("bad", [int, {nn.Linear: int}, {3: Doubling}, [Doubling], {"fc1": "Doubling"}])
def test_envoys_must_be_envoy_classes_keyed_by_types_or_paths(mlp, bad):
    with pytest.raises(EnvoyClassError, match="envoys="):
        seethrough.Model(mlp, envoys=bad)


class AttentionEnvoy(Envoy):
    """Per-head view of an attention module's output (nnsight tutorials' pattern)."""

    @property
    def heads(self) -> torch.Tensor:
        out = self.output[0]
        batch, seq, width = out.shape
        count = self.config.num_attention_heads
        return out.view(batch, seq, count, width // count)

    @heads.setter
    def heads(self, value: torch.Tensor) -> None:
        out = self.output
        self.output = (value.reshape(out[0].shape), *out[1:])


def test_an_attention_envoy_reads_and_edits_heads_like_raw_hooks(smollm2_small):
    hf, tokenizer = smollm2_small
    hooks_before = hook_state(hf)  # HF may keep hooks of its own on the shared model
    model = LanguageModel(hf, tokenizer=tokenizer, envoys={"self_attn": AttentionEnvoy})
    prompt = "The Eiffel Tower is in"
    ids = tokenizer(prompt, return_tensors="pt")
    heads_count = hf.config.num_attention_heads
    before = state_snapshot(hf)

    with model.trace(prompt):
        read = model.model.layers[1].self_attn.heads.save()
        model.model.layers[2].self_attn.heads[:, :, 3] = 0          # in place, through the view
        zeroed = model.model.layers[2].self_attn.heads                 # the edited value
        model.model.layers[3].self_attn.heads = zeroed * 0.5          # the property's setter
        logits = model.lm_head.output.save()

    # Reference: raw forward hooks doing the same by hand.
    seen = {}

    def read_hook(module, args, output):
        out = output[0]
        seen["heads"] = out.view(*out.shape[:2], heads_count, -1).clone()

    def zero_hook(module, args, output):
        out = output[0]
        out.view(*out.shape[:2], heads_count, -1)[:, :, 3] = 0
        seen["zeroed"] = out.clone()

    def replace_hook(module, args, output):
        return (seen["zeroed"] * 0.5, *output[1:])

    handles = [
        hf.model.layers[1].self_attn.register_forward_hook(read_hook),
        hf.model.layers[2].self_attn.register_forward_hook(zero_hook),
        hf.model.layers[3].self_attn.register_forward_hook(replace_hook),
    ]
    try:
        with torch.no_grad():
            reference = hf(**ids).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(read, seen["heads"])
    assert torch.equal(logits, reference)
    assert_same_state(hf, before)
    assert_pristine(hf, hooks_before)


def test_a_property_that_fails_inside_says_so(mlp):
    class Broken(Envoy):
        @property
        def feature(self) -> torch.Tensor:
            return self.output.no_such_tensor_method

    model = seethrough.Model(mlp, envoys=Broken)
    with pytest.raises(ModulePathError, match="`feature` of `model.fc1` is defined by Broken"):
        with model.trace(torch.randn(1, 4)):
            model.fc1.feature


def test_custom_envoys_keep_state_but_not_module_attributes(mlp):
    class Counting(Envoy):
        reads = 0

        def count(self) -> int:
            self.reads += 1
            return self.reads

    model = seethrough.Model(mlp, envoys=Counting)
    assert model.fc1.count() == 1 and model.fc1.count() == 2
    model.fc1.note = "mine"
    assert model.fc1.note == "mine"
    with pytest.raises(AttributeError, match="cannot set `weight`"):
        model.fc1.weight = torch.zeros(8, 4)
    with pytest.raises(AttributeError, match="cannot set `note`"):
        seethrough.Model(mlp).fc1.note = "plain envoys refuse"


# -- get ---------------------------------------------------------------------------------------


def test_get_resolves_dotted_paths_with_indices(smollm2_small):
    hf, tokenizer = smollm2_small
    model = LanguageModel(hf, tokenizer=tokenizer)
    assert model.get("model.layers.0") is model.model.layers[0]
    assert model.get("model.layers.-1") is model.model.layers[3]
    assert model.get(".model.layers.2.mlp") is model.model.layers[2].mlp
    assert model.model.get("layers.1.self_attn.o_proj") is model.model.layers[1].self_attn.o_proj
    assert model.get("") is model

    with model.trace("Hello there"):
        hidden = model.get("model.layers.1.output").save()
    recorded = {}
    handle = hf.model.layers[1].register_forward_hook(lambda m, a, o: recorded.setdefault("out", o))
    try:
        with torch.no_grad():
            hf(**tokenizer("Hello there", return_tensors="pt"))
    finally:
        handle.remove()
    expected = recorded["out"][0] if isinstance(recorded["out"], tuple) else recorded["out"]
    actual = hidden[0] if isinstance(hidden, tuple) else hidden
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("path, part, under", [
    ("model.layers.9", "9", "model.model.layers"),
    ("model.layrs.0", "layrs", "model.model"),
    ("model.layers.0.mlp.nope", "nope", "model.model.layers.0.mlp"),
    ("model..layers", "", "model.model"),
])
def test_get_names_a_bad_path(smollm2_small, path, part, under):
    hf, tokenizer = smollm2_small
    model = LanguageModel(hf, tokenizer=tokenizer)
    with pytest.raises(ModulePathError) as info:
        model.get(path)  # MARK-get
    message = str(info.value)
    assert f"get({path!r})" in message and f"no `{part}` under `{under}`" in message and "MARK-get" in message


# -- calling an envoy, with and without hook=True ----------------------------------------------


def _sae_reference(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw hooks: the fc1 output replaced by the SAE's reconstruction; returns
    (the SAE encoder's output on fc1's output, the model's output)."""
    seen = {}

    def replace(module, args, output):
        seen["features"] = net.sae.encoder(output)
        return net.sae(output)

    handle = net.fc1.register_forward_hook(replace)
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        handle.remove()
    return seen["features"], out


def test_hook_true_in_an_edit_lets_a_trace_read_the_calls_internals(mlp_sae):
    model = seethrough.Model(mlp_sae)
    with model.edit() as edited:
        acts = model.fc1.output
        model.fc1.output = model.sae(acts, hook=True)
    x = torch.randn(3, 4)
    with edited.trace(x):
        features = edited.sae.encoder.output.save()
        reconstruction = edited.sae.output.save()
        out = edited.output.save()
    ref_features, ref_out = _sae_reference(mlp_sae, x)
    assert torch.equal(features, ref_features)
    assert torch.equal(out, ref_out)
    with torch.no_grad():
        assert torch.equal(reconstruction, mlp_sae.sae(mlp_sae.fc1(x)))
    assert_pristine(mlp_sae)


def test_hook_true_values_reach_another_invoke_whole(mlp_sae):
    model = seethrough.Model(mlp_sae)
    x, y = torch.randn(1, 4), torch.randn(2, 4)
    with model.trace() as tracer:
        with tracer.invoke(x):
            hidden = model.fc1.output
            reconstruction = model.sae(hidden, hook=True).save()
        with tracer.invoke(y):
            features = model.sae.encoder.output.clone().save()  # the call's own value: x's single row
            model.sae.encoder.output[:] = 0  # edits reach the call
    with torch.no_grad():
        expected = mlp_sae.sae.encoder(mlp_sae.fc1(torch.cat([x, y]))[:1])  # fc1 ran on the batch
    assert torch.equal(features, expected) and features.shape == (1, 16)
    assert torch.equal(reconstruction, mlp_sae.sae.decoder.bias.detach().expand(1, 8))
    assert_pristine(mlp_sae)


def test_without_hook_a_call_is_the_plain_module_and_serves_nobody(mlp_sae):
    model = seethrough.Model(mlp_sae)
    calls = []
    handle = mlp_sae.sae.encoder.register_forward_hook(lambda m, a, o: calls.append(o))  # the user's own hook
    x = torch.randn(2, 4)
    try:
        with model.trace(x):
            hidden = model.fc1.output
            plain = model.sae(hidden).save()
        with torch.no_grad():
            assert torch.equal(plain, mlp_sae.sae(mlp_sae.fc1(x)))
        assert len(calls) == 2  # the module's own hooks run either way
        with pytest.raises(MissedProviderError, match="never called `model.sae.encoder`"):
            with model.trace() as tracer:
                with tracer.invoke(x):
                    model.sae(model.fc1.output)  # not watched
                with tracer.invoke(x):
                    model.sae.encoder.output.save()
    finally:
        handle.remove()
    assert_pristine(mlp_sae)


def test_hook_true_outside_a_trace_is_a_plain_call(mlp_sae):
    model = seethrough.Model(mlp_sae)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(model.sae(x, hook=True), mlp_sae.sae(x))


def test_reading_your_own_hooked_call_afterwards_explains_why_not(mlp_sae):
    model = seethrough.Model(mlp_sae)
    with pytest.raises(OutOfOrderError, match=r"ran `model.sae.encoder` itself \(with `hook=True`\)"):
        with model.trace(torch.randn(2, 4)):
            model.sae(model.fc1.output, hook=True)
            model.sae.encoder.output.save()
    assert_pristine(mlp_sae)


def test_an_error_inside_a_hooked_call_reaches_the_callers_line(mlp_sae):
    model = seethrough.Model(mlp_sae)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied|size mismatch|mat1 and mat2") as info:
        with model.trace(torch.randn(2, 4)):
            model.sae(model.act.output[:, :3], hook=True)  # MARK-call
    lines = []
    tb = info.value.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            lines.append(tb.tb_lineno)
        tb = tb.tb_next
    source = open(__file__).read().splitlines()
    assert any("MARK-call" in source[line - 1] for line in lines)
    assert_pristine(mlp_sae)


def test_hook_true_at_every_generation_step_matches_raw_hooks(smollm2_small):
    hf, tokenizer = smollm2_small
    hooks_before = hook_state(hf)  # HF may keep hooks of its own on the shared model
    torch.manual_seed(0)
    width = hf.config.hidden_size
    adapter = nn.Sequential(nn.Linear(width, 16), nn.Linear(16, width)).eval()
    hf.model.layers[1].adapter = adapter  # attached to the model, not used by its forward
    try:
        model = LanguageModel(hf, tokenizer=tokenizer)
        with model.generate("Once upon a time", max_new_tokens=4, do_sample=False) as tracer:
            for step in tracer.iter[:]:
                output = model.model.layers[1].output
                stream = output[0] if isinstance(output, tuple) else output
                stream[:] = stream + 0.5 * model.model.layers[1].adapter(stream, hook=True)
            tokens = tracer.result.save()

        def add(module, args, output):
            stream = output[0] if isinstance(output, tuple) else output
            stream[:] = stream + 0.5 * adapter(stream)

        handle = hf.model.layers[1].register_forward_hook(add)
        try:
            with torch.no_grad():
                ids = tokenizer("Once upon a time", return_tensors="pt")
                reference = hf.generate(**ids, max_new_tokens=4, do_sample=False)
        finally:
            handle.remove()
        assert torch.equal(tokens, reference)
    finally:
        del hf.model.layers[1].adapter
    assert_pristine(hf, hooks_before)
