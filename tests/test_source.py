"""``.source``: operations inside a module's forward, checked against
independent references — values captured by wrapping the same functions by
hand (pytest's monkeypatch), plain forwards with the same edit patched in by
hand, and HuggingFace's own ``output_attentions``."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.models.bert import modeling_bert
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama

import seethrough
from seethrough import LanguageModel, Model
from seethrough.errors import ModulePathError, NotInTraceError, OutOfOrderError, SourceError
from fixtures.models import assert_pristine, hook_state
from test_server import ALICE, server  # noqa: F401 - the shared server fixtures
from fixtures.threads import single_thread


class Toy(nn.Module):
    """A plain user module with the naming cases of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        a, b = torch.nn.functional.relu(h).split(4, dim=-1)
        y = torch.cat([a, torch.tanh(b) * 2], dim=-1)
        z = self.fc2(y).softmax(-1)
        for _ in range(3):
            z = torch.tanh(z + 1)
        return z + self.helper(z)

    def helper(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z) * 0.5


def toy_reference(toy: Toy, x: torch.Tensor, relu_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The same forward written out by hand, optionally scaling the relu output."""
    h = toy.fc1(x)
    r = torch.relu(h) * relu_scale
    a, b = r.split(4, dim=-1)
    y = torch.cat([a, torch.tanh(b) * 2], dim=-1)
    soft = toy.fc2(y).softmax(-1)
    z, loops = soft, []
    for _ in range(3):
        z = torch.tanh(z + 1)
        loops.append(z)
    return {"relu": r, "split": (a, b), "softmax": soft, "loops": loops, "helper": torch.sigmoid(z) * 0.5, "out": z + torch.sigmoid(z) * 0.5}


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def _gpt2(attn: str = "eager") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
    config._attn_implementation = attn
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_eager():
    return _gpt2("eager")


# -- names and printing ------------------------------------------------------------

def test_names_follow_nnsight_rules_on_a_plain_module(toy):
    # The list nnsight 0.8.1 gives for Toy.forward (recorded with it side by side).
    names = [op.name for op in Model(toy).source]
    assert names == [
        "self_fc1_0",
        "h_0",  # the assignment `h = ...`, after the call that computes it
        "torch_nn_functional_relu_0",  # inner call first
        "split_0",  # chain not starting at a name: attribute names only
        "torch_tanh_0",  # inside the list argument, before torch.cat
        "torch_cat_0",
        "y_0",
        "self_fc2_0",
        "softmax_0",
        "z_0",
        "range_0",
        "torch_tanh_1",  # a second site of the same name
        "z_1",
        "self_helper_0",
    ]


class Assigns(nn.Module):
    """Every kind of assignment nnsight 0.8.1 does and does not name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        a, b = h, x
        c = d = h + 1
        e: torch.Tensor = self.layers[0](h)
        e += 1
        f: int
        self.cache = e * 2
        g = [e, e]
        g[0] = torch.relu(e)
        g[0].data = e
        p, q = h.chunk(2, dim=-1)
        r, (s, t) = h, (x, e)
        u = self.layers[1](e).relu()
        w = x[0].abs().sum()
        k = [torch.tanh(v) for v in g]
        (y := torch.sigmoid(h))
        for i in range(2):
            z = u + i
        return z + y + a + b + c + d + p.sum() + q.sum() + r + s + t + w + k[0]


ASSIGNS_NNSIGHT = [  # nnsight 0.8.1's names for Assigns.forward
    "self_fc_0", "h_0", "a_0", "b_0", "self_layers_0", "e_0", "self_cache_0", "g_0", "torch_relu_0",
    "g_1", "g_data_0", "h_chunk_0", "r_0", "s_0", "t_0", "self_layers_1", "relu_0", "u_0", "x_abs_0",
    "sum_0", "w_0", "torch_tanh_0", "k_0", "torch_sigmoid_0", "range_0", "z_0", "p_sum_0", "q_sum_0",
]


def test_assignments_are_operations_named_as_nnsight_names_them():
    torch.manual_seed(0)
    net = Assigns().eval()
    model = Model(net)
    assert [op.name for op in model.source] == ASSIGNS_NNSIGHT
    x = torch.randn(2, 4)
    with torch.no_grad(), model.trace(x):
        src = model.source
        h_args, h_kwargs = src.h_0.inputs  # an assignment's input is the value bound
        h_in = h_args[0].save()
        h = src.h_0.output.save()
        e = src.e_0.output.save()
        src.u_0.output = src.u_0.output * 0  # replaces the value `u` is bound to
        out = model.output.save()
    with torch.no_grad():
        ref_h = net.fc(x)
        ref_e = net.layers[0](ref_h)
        hh, ee = ref_h, ref_e + 1  # the same forward with `u` zeroed, written out
        k0 = torch.tanh(ee)  # g[0] holds e's data
        p, q = hh.chunk(2, dim=-1)
        z = torch.zeros_like(hh) + 1
        ref = z + torch.sigmoid(hh) + hh + x + (hh + 1) * 2 + p.sum() + q.sum() + hh + x + ee + x[0].abs().sum() + k0
    assert h_kwargs == {}
    assert torch.equal(h_in, ref_h) and torch.equal(h, ref_h)
    assert torch.equal(e, ref_e + 1)  # the value bound to `e`, which `e += 1` then changes in place
    assert torch.allclose(out, ref)
    assert_pristine(net)


def test_gpt2_attention_names_and_listing(gpt2_eager):
    model = Model(gpt2_eager)
    source = model.transformer.h[0].attn.source
    names = [op.name for op in source]
    for name in ("self_c_attn_1", "split_1", "attention_interface_1", "self_c_proj_0", "self_resid_dropout_0"):
        assert name in names
    assert names.index("self_c_attn_1") + 1 == names.index("split_1")
    text = str(source)
    line = next(row for row in text.splitlines() if row.startswith("attention_interface_1"))
    assert "attention_interface(" in line
    assert "self.c_proj(attn_output)" in next(r for r in text.splitlines() if r.startswith("self_c_proj_0"))
    assert "-->" in str(source.attention_interface_1)
    assert [op.name for op in model.transformer.h[0].mlp.source] == [
        "self_c_fc_0", "hidden_states_0", "self_act_0", "hidden_states_1",
        "self_c_proj_0", "hidden_states_2", "self_dropout_0", "hidden_states_3",
    ]


def test_unknown_operation_suggests_close_names(gpt2_eager):
    model = Model(gpt2_eager)
    with pytest.raises(ModulePathError, match="Did you mean `attention_interface_1`"):
        model.transformer.h[0].attn.source.attention_interfac_1
    with pytest.raises(NotInTraceError, match="outside a trace"):
        model.transformer.h[0].attn.source.attention_interface_1.output


# -- reading and editing on a plain module ----------------------------------------------

def test_plain_module_values_match_the_forward_written_out(toy):
    x = torch.randn(3, 4)
    model = Model(toy)
    before = hook_state(toy)
    with torch.no_grad(), model.trace(x):
        src = model.source
        relu_in = src.torch_nn_functional_relu_0.input.save()
        relu = src.torch_nn_functional_relu_0.output.save()
        args, kwargs = src.split_0.inputs
        split_args = seethrough.save((args, kwargs))  # a method call: the tensor is bound, not an argument
        parts = src.split_0.output.save()
        first_loop = src.torch_tanh_1.output.save()
        second_loop = src.torch_tanh_1.next().output.save()
        helper = src.self_helper_0.output.save()
        out = model.output.save()
    with torch.no_grad():
        ref = toy_reference(toy, x)
        fc1 = toy.fc1(x)
    assert torch.allclose(relu, ref["relu"]) and torch.allclose(relu_in, fc1)
    assert all(torch.allclose(p, r) for p, r in zip(parts, ref["split"]))
    assert split_args == ((4,), {"dim": -1})
    assert torch.allclose(first_loop, ref["loops"][0]) and torch.allclose(second_loop, ref["loops"][1])
    assert torch.allclose(helper, ref["helper"]) and torch.allclose(out, ref["out"])
    assert_pristine(toy, before)


def test_edits_change_the_running_forward(toy):
    x = torch.randn(3, 4)
    model = Model(toy)
    with torch.no_grad(), model.trace(x):
        model.source.torch_nn_functional_relu_0.output *= 0.5  # in place
        out = model.output.save()
    with torch.no_grad():
        ref = toy_reference(toy, x, relu_scale=0.5)["out"]
    assert torch.allclose(out, ref, atol=1e-6)
    with torch.no_grad(), model.trace(x):
        model.source.torch_nn_functional_relu_0.input = torch.zeros(3, 8)  # replace the argument
        out = model.output.save()
    with torch.no_grad():
        ref = toy_reference(toy, torch.zeros(3, 4), relu_scale=0.0)["out"]  # relu(0) == relu(anything) * 0
    assert torch.allclose(out, ref, atol=1e-6)
    assert_pristine(toy)


def test_invokes_see_their_rows_and_edit_only_them(toy):
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    model = Model(toy)
    with torch.no_grad(), model.trace() as tracer:
        with tracer.invoke(x1):
            model.source.self_fc2_0.output[:] = 0
            out1 = model.output.save()
        with tracer.invoke(x2):
            soft2 = model.source.softmax_0.output.save()
            out2 = model.output.save()
    with torch.no_grad():
        ref2 = toy_reference(toy, x2)
        zeroed = torch.zeros(2, 8).softmax(-1)
        z = zeroed
        for _ in range(3):
            z = torch.tanh(z + 1)
    assert soft2.shape == (3, 8) and torch.allclose(soft2, ref2["softmax"])
    assert torch.allclose(out2, ref2["out"], atol=1e-6)
    assert torch.allclose(out1, z + torch.sigmoid(z) * 0.5, atol=1e-6)


def test_reading_an_operation_that_already_ran_is_an_order_error(toy):
    model = Model(toy)
    with pytest.raises(OutOfOrderError, match="source.self_fc1_0.output"):
        with model.trace(torch.randn(2, 4)):
            model.source.softmax_0.output.save()
            model.source.self_fc1_0.output.save()
    assert_pristine(toy)


def test_first_use_inside_a_running_forward_says_how_to_fix_it(toy):
    wrapper = nn.Sequential(toy)
    model = Model(wrapper)
    with pytest.raises(OutOfOrderError, match=r"`src = model.<path>.source` at the top"):
        with model.trace(torch.randn(2, 4)):
            model[0].fc1.output.save()
            model[0].source.softmax_0.output.save()
    assert_pristine(wrapper)
    with torch.no_grad(), model.trace(torch.randn(2, 4)):
        src = model[0].source  # touched first: then order is free as usual
        model[0].fc1.output.save()
        soft = src.softmax_0.output.save()
    assert soft.shape == (2, 8)


def test_module_is_restored_after_a_failing_trace_and_untouched_ones_cost_nothing(gpt2_eager):
    model = Model(gpt2_eager)
    before = hook_state(gpt2_eager)
    inside = {}
    with pytest.raises(ZeroDivisionError):
        with model.trace(torch.tensor([[1, 2, 3]])):
            model.transformer.h[0].attn.source.self_c_proj_0.output.save()
            inside["patched"] = "forward" in gpt2_eager.transformer.h[0].attn.__dict__
            inside["other"] = "forward" in gpt2_eager.transformer.h[1].attn.__dict__
            1 / 0
    assert inside == {"patched": True, "other": False}
    assert_pristine(gpt2_eager, before)
    with model.trace(torch.tensor([[1, 2, 3]])):
        inside["plain"] = "forward" in gpt2_eager.transformer.h[0].attn.__dict__
        model.transformer.h[0].output.save()
    assert inside["plain"] is False


# -- GPT-2 attention against hand-wrapped functions -------------------------------------

def _record_eager(monkeypatch, module, scale: float | None = None, layer: int = 0) -> list:
    """Wrap the model file's eager attention by hand: record (query, output)
    for layer ``layer``, and scale its output (weights and result) if asked."""
    original = module.eager_attention_forward
    seen: list = []

    def wrapped(attn_module, query, *args, **kwargs):
        out, weights = original(attn_module, query, *args, **kwargs)
        if attn_module.layer_idx == layer:
            if scale is not None:
                out, weights = out * scale, weights * scale
            seen.append((query, out, weights))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", wrapped)
    return seen


def test_gpt2_attention_interface_matches_the_hand_wrapped_function(gpt2_eager, monkeypatch):
    model = Model(gpt2_eager)
    ids = torch.tensor([[5, 17, 42, 7], [3, 3, 99, 1000]])
    with torch.no_grad(), model.trace(ids):
        attn = model.transformer.h[0].attn.source
        query = attn.attention_interface_1.inputs[0][1].save()
        out, weights = attn.attention_interface_1.output
        out, weights = out.save(), weights.save()
        logits = model.output.logits.save()
    seen = _record_eager(monkeypatch, modeling_gpt2)
    with torch.no_grad():
        ref_logits = gpt2_eager(ids).logits
    (ref_query, ref_out, ref_weights), = seen
    assert torch.equal(query, ref_query) and torch.equal(out, ref_out) and torch.equal(weights, ref_weights)
    assert torch.equal(logits, ref_logits)


def test_gpt2_edit_inside_the_attention_function_matches_a_hand_patched_forward(gpt2_eager, monkeypatch):
    model = Model(gpt2_eager)
    ids = torch.tensor([[5, 17, 42, 7, 9]])
    with torch.no_grad(), model.trace(ids):
        inner = model.transformer.h[0].attn.source.attention_interface_1.source
        probs = inner.nn_functional_softmax_0.output
        raw = probs.clone().save()
        probs[:] = probs * 0.5  # halve the attention weights in place
        logits = model.output.logits.save()
    assert torch.allclose(raw.sum(-1), torch.ones(1, 2, 5))
    _record_eager(monkeypatch, modeling_gpt2, scale=0.5)
    with torch.no_grad():
        ref = gpt2_eager(ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():
        plain = gpt2_eager(ids).logits
    assert not torch.allclose(logits, plain, atol=1e-3)  # the edit mattered
    assert_pristine(gpt2_eager)


def test_source_of_a_running_operation_names_it_again(gpt2_eager, monkeypatch):
    # nnterp's attention-probability setter spells the path again after reading it:
    # `.source` of an operation whose (instrumented) callee is running needs no wait.
    model = Model(gpt2_eager)
    ids = torch.tensor([[5, 17, 42, 7, 9]])
    with torch.no_grad(), model.trace(ids):
        probs = model.transformer.h[0].attn.source.attention_interface_1.source.nn_functional_softmax_0.output
        model.transformer.h[0].attn.source.attention_interface_1.source.nn_functional_softmax_0.output = probs * 0.5
        logits = model.output.logits.save()
    _record_eager(monkeypatch, modeling_gpt2, scale=0.5)
    with torch.no_grad():
        ref = gpt2_eager(ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    assert_pristine(gpt2_eager)


def test_source_of_an_operation_is_checked(gpt2_eager):
    model = Model(gpt2_eager)
    with pytest.raises(NotInTraceError, match="known only while the model runs"):
        model.transformer.h[0].attn.source.attention_interface_1.source
    with pytest.raises(SourceError, match="runs a submodule"):
        with model.trace(torch.tensor([[1, 2]])):
            model.transformer.h[0].attn.source.self_c_proj_0.source
    with pytest.raises(SourceError, match="`attn_output_0` is an assignment, not a call, and the value it binds is a Tensor"):
        with model.trace(torch.tensor([[1, 2]])):
            model.transformer.h[0].attn.source.attn_output_0.source
    assert_pristine(gpt2_eager)


def test_source_of_an_assignment_binding_a_function_is_that_function(gpt2_eager, monkeypatch):
    # nnterp 1.3 (written for nnsight < 0.8) spells the attention call
    # `attention_interface_0`, now the assignment of the function the call runs:
    # its `.source` is that function's, as used by the call.
    model = Model(gpt2_eager)
    ids = torch.tensor([[5, 17, 42, 7, 9]])
    with torch.no_grad(), model.trace(ids):
        fn = model.transformer.h[0].attn.source.attention_interface_0.output.save()
        probs = model.transformer.h[0].attn.source.attention_interface_0.source.nn_functional_softmax_0.output
        model.transformer.h[0].attn.source.attention_interface_0.source.nn_functional_softmax_0.output = probs * 0.5
        logits = model.output.logits.save()
    assert fn is modeling_gpt2.eager_attention_forward  # `.output` is the function bound, not the copy
    _record_eager(monkeypatch, modeling_gpt2, scale=0.5)
    with torch.no_grad():
        ref = gpt2_eager(ids).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    assert_pristine(gpt2_eager)


def test_generation_steps_apply_to_operations(gpt2_tokenizer, monkeypatch):
    hf = _gpt2("eager")
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with torch.no_grad(), model.generate("Hello there", max_new_tokens=3, do_sample=False) as tracer:
        outs = []
        for step in tracer.iter[:]:
            outs.append(model.transformer.h[0].attn.source.attention_interface_1.output[0].save())
        ids = tracer.result.save()
    seen = _record_eager(monkeypatch, modeling_gpt2)
    with torch.no_grad():
        ref_ids = hf.generate(**gpt2_tokenizer("Hello there", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert torch.equal(ids, ref_ids)
    assert len(outs) == len(seen) == 3
    for out, (_, ref, _) in zip(outs, seen):
        assert torch.equal(out, ref)
    assert_pristine(hf)


# -- Llama (SmolLM2) and BERT ---------------------------------------------------------

@pytest.fixture
def smol_eager(smollm2_small):
    hf, tokenizer = smollm2_small
    previous = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"
    try:
        yield hf, tokenizer
    finally:
        hf.config._attn_implementation = previous


def test_tutorial_source_on_attention_smollm2(smol_eager, monkeypatch):
    """The tutorial: find the attention call in the printed source, read the
    attention pattern of a layer (compared with the attention function wrapped
    by hand), then ablate one head through `.source`."""
    hf, tokenizer = smol_eager
    before = hook_state(hf)
    model = LanguageModel(hf, tokenizer=tokenizer)
    text = str(model.model.layers[1].self_attn.source)
    assert "attention_interface_1" in text and "self_o_proj_0" in text
    prompt = "The Eiffel Tower is in the city of"
    with torch.no_grad(), model.trace(prompt):
        attn = model.model.layers[1].self_attn.source
        pattern = attn.attention_interface_1.output[1].save()
        logits = model.lm_head.output.save()
    assert_pristine(hf, before)
    with monkeypatch.context() as patch:
        seen = _record_eager(patch, modeling_llama, layer=1)
        with torch.no_grad():
            ref_logits = hf(**tokenizer(prompt, return_tensors="pt")).logits
    (_, _, ref_pattern), = seen
    seq = pattern.shape[-1]
    assert pattern.shape == (1, 9, seq, seq) and torch.allclose(pattern.sum(-1), torch.ones(1, 9, seq))
    assert torch.equal(pattern, ref_pattern)
    assert torch.allclose(logits, ref_logits, atol=1e-5)

    head = 4
    with torch.no_grad(), model.trace(prompt):
        out = model.model.layers[1].self_attn.source.attention_interface_1.output[0]  # [batch, seq, heads, dim]
        out[:, :, head] = 0
        ablated = model.lm_head.output.save()
    original = modeling_llama.eager_attention_forward

    def by_hand(module, *args, **kwargs):
        o, w = original(module, *args, **kwargs)
        if module.layer_idx == 1:
            o = o.clone()
            o[:, :, head] = 0
        return o, w

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", by_hand)
    with torch.no_grad():
        ref_ablated = hf(**tokenizer(prompt, return_tensors="pt")).logits
    assert torch.allclose(ablated, ref_ablated, atol=1e-5)
    assert not torch.allclose(ablated, logits, atol=1e-4)
    assert_pristine(hf, before)


LLAMA_ATTENTION_NNSIGHT = [  # nnsight 0.8.1's names for LlamaAttention.forward (this transformers)
    "input_shape_0", "hidden_shape_0", "self_q_proj_0", "view_0", "transpose_0", "query_states_0",
    "self_k_proj_0", "view_1", "transpose_1", "key_states_0", "self_v_proj_0", "view_2", "transpose_2",
    "value_states_0", "apply_rotary_pos_emb_0", "cache_update_0", "ALL_ATTENTION_FUNCTIONS_get_interface_0",
    "attention_interface_0", "attention_interface_1", "attn_output_reshape_0", "contiguous_0",
    "attn_output_0", "self_o_proj_0", "attn_output_1",
]


def test_llama_attention_names_and_the_attention_call_match_a_raw_hook(smollm2_small):
    """nnsight's tutorial reads `.source.attention_interface_1.output`: the
    attention call (`attention_interface_0` is the assignment of the function)."""
    hf, tokenizer = smollm2_small
    model = LanguageModel(hf, tokenizer=tokenizer)
    source = model.model.layers[0].self_attn.source
    assert [op.name for op in source] == LLAMA_ATTENTION_NNSIGHT
    prompt = "The Eiffel Tower is in the city of"
    with torch.no_grad(), model.trace(prompt):
        attn = model.model.layers[0].self_attn.source
        shape = attn.input_shape_0.output.save()
        fn = attn.attention_interface_0.output.save()
        out, weights = attn.attention_interface_1.output
        out = out.save()
        weights = seethrough.save(weights)
        final = attn.attn_output_1.output.save()
    seen = []
    handles = [
        hf.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0])),
        hf.model.layers[0].self_attn.register_forward_hook(lambda m, args, output: seen.append(output[0])),
    ]
    try:
        with torch.no_grad():
            ids = tokenizer(prompt, return_tensors="pt")
            hf(**ids)
    finally:
        for handle in handles:
            handle.remove()
    o_proj_in, attn_out = seen
    seq = ids["input_ids"].shape[1]
    assert shape == (1, seq)
    assert fn is modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
    assert weights is None  # sdpa gives no weights
    assert out.shape == (1, seq, 9, 64)
    assert torch.equal(out.reshape(1, seq, -1), o_proj_in)
    assert torch.equal(final, attn_out)


def test_edits_of_an_operation_equal_raw_hook_edits_on_smollm2(smollm2_small):
    # Assigning, editing in place and replacing the input of a `.source` operation
    # (nnsight 0.8.1 does all three) against the same edit by a raw hook.
    hf, tokenizer = smollm2_small
    hooks_before = hook_state(hf)  # HuggingFace may have left its own hooks on this shared model
    model = LanguageModel(hf, tokenizer=tokenizer)
    prompt = "The Eiffel Tower is in the city of"
    ids = tokenizer(prompt, return_tensors="pt")
    o_proj = hf.model.layers[0].self_attn.o_proj

    def by_hook(pre=None, post=None):
        handles = [o_proj.register_forward_pre_hook(pre)] if pre else [o_proj.register_forward_hook(post)]
        try:
            with torch.no_grad():
                return hf(**ids).logits
        finally:
            for handle in handles:
                handle.remove()

    with torch.no_grad(), model.trace(prompt):
        op = model.model.layers[0].self_attn.source.self_o_proj_0
        op.output = op.output * 0.5
        assigned = model.lm_head.output.save()
    with torch.no_grad(), model.trace(prompt):
        model.model.layers[0].self_attn.source.self_o_proj_0.output[:, -1] = 0
        in_place = model.lm_head.output.save()
    with torch.no_grad(), model.trace(prompt):
        op = model.model.layers[0].self_attn.source.self_o_proj_0
        op.input = op.input * 2
        replaced = model.lm_head.output.save()

    def zero_last(module, args, output):
        output[:, -1] = 0

    assert torch.allclose(assigned, by_hook(post=lambda m, a, o: o * 0.5), atol=1e-5)
    assert torch.allclose(in_place, by_hook(post=zero_last), atol=1e-5)
    assert torch.allclose(replaced, by_hook(pre=lambda m, a: (a[0] * 2,)), atol=1e-5)
    with torch.no_grad():
        plain = hf(**ids).logits
    assert not torch.allclose(in_place, plain, atol=1e-4)
    assert_pristine(hf, hooks_before)


def test_llama_sdpa_descends_into_the_function_actually_called(smollm2_small, monkeypatch):
    hf, tokenizer = smollm2_small
    assert hf.config._attn_implementation == "sdpa"
    before = hook_state(hf)
    model = LanguageModel(hf, tokenizer=tokenizer)
    with torch.no_grad(), model.trace("Hello world"):
        inner = model.model.layers[0].self_attn.source.attention_interface_1.source
        sdpa = inner.torch_nn_functional_scaled_dot_product_attention_0
        q = sdpa.input.save()
        out = sdpa.output.save()
        names = seethrough.save([op.name for op in inner])
    assert "repeat_kv_0" in names
    original = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def by_hand(query, *args, **kwargs):
        result = original(query, *args, **kwargs)
        seen.append((query, result))
        return result

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", by_hand)
    with torch.no_grad():
        hf(**tokenizer("Hello world", return_tensors="pt"))
    assert len(seen) == 4  # one per layer; layer 0 first
    assert torch.equal(q, seen[0][0]) and torch.equal(out, seen[0][1])
    assert_pristine(hf, before)


def test_bert_self_attention_matches_the_hand_wrapped_function(minilm_dir, monkeypatch):
    hf = AutoModel.from_pretrained(minilm_dir).eval()
    hf.config._attn_implementation = "eager"
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = LanguageModel(hf, tokenizer=tokenizer)
    source = model.encoder.layer[0].attention.self.source
    assert "attention_interface_1" in [op.name for op in source]
    with torch.no_grad(), model.trace("a small test"):
        out = model.encoder.layer[0].attention.self.source.attention_interface_1.output[0].save()
        model.encoder.layer[2].attention.self.source.attention_interface_1.output[0][:] = 0
        hidden = model.output.last_hidden_state.save()
    original = modeling_bert.eager_attention_forward
    seen = []

    def by_hand(module, *args, **kwargs):
        o, w = original(module, *args, **kwargs)
        if module is hf.encoder.layer[0].attention.self:
            seen.append(o)
        if module is hf.encoder.layer[2].attention.self:
            o = torch.zeros_like(o)
        return o, w

    monkeypatch.setattr(modeling_bert, "eager_attention_forward", by_hand)
    with torch.no_grad():
        ref = hf(**tokenizer("a small test", return_tensors="pt")).last_hidden_state
    assert torch.equal(out, seen[0])
    assert torch.allclose(hidden, ref, atol=1e-5)
    assert_pristine(hf)


# -- composition with other features ----------------------------------------------------

def _doubled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) * 2

    return wrapper


class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @_doubled
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_a_decorated_forward_keeps_its_decorator():
    torch.manual_seed(0)
    module = Decorated().eval()
    model = Model(module)
    x = torch.randn(2, 4)
    with torch.no_grad(), model.trace(x):
        relu = model.source.torch_relu_0.output.save()
        out = model.output.save()
    with torch.no_grad():
        ref = torch.relu(module.fc(x))
    assert torch.allclose(relu, ref) and torch.allclose(out, ref * 2)  # the decorator still ran
    assert_pristine(module)


def test_skip_and_source_on_the_same_module_in_either_order(toy):
    wrapper = nn.Sequential(toy, nn.Linear(8, 8), nn.Tanh())
    model = Model(wrapper)
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = torch.tanh(wrapper[1](torch.zeros(2, 8)))
    with torch.no_grad(), model.trace(x):
        model[0].skip(torch.zeros(2, 8))
        model[0].source  # instrumented after the skip was set up
        out = model.output.save()
    assert torch.allclose(out, expected)
    assert_pristine(wrapper)
    with torch.no_grad(), model.trace(x):
        model[0].source
        model[0].skip(torch.zeros(2, 8))
        out = model.output.save()
    assert torch.allclose(out, expected)
    assert_pristine(wrapper)


def test_persistent_edit_through_source(toy):
    model = Model(toy)
    x = torch.randn(3, 4)
    with model.edit() as edited:
        model.source.torch_nn_functional_relu_0.output *= 0.5
    with torch.no_grad(), edited.trace(x):
        out = edited.output.save()
    with torch.no_grad(), model.trace(x):
        plain = model.output.save()
    with torch.no_grad():
        ref = toy_reference(toy, x, relu_scale=0.5)["out"]
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(plain, toy_reference(toy, x)["out"], atol=1e-6)
    assert_pristine(toy)


def test_inputs_assignment_and_builtin_source_error(toy):
    model = Model(toy)
    x = torch.randn(2, 4)
    with torch.no_grad(), model.trace(x):
        args, kwargs = model.source.torch_tanh_0.inputs
        model.source.torch_tanh_0.inputs = ((torch.zeros_like(args[0]),), kwargs)
        cat = model.source.torch_cat_0.output.save()
    with torch.no_grad():
        a, _ = toy_reference(toy, x)["split"]
    assert torch.allclose(cat, torch.cat([a, torch.zeros(2, 4)], dim=-1))  # tanh(0) * 2 == 0
    with pytest.raises(SourceError, match="not a Python function"):
        with model.trace(x):
            model.source.torch_cat_0.source
    assert_pristine(toy)


def test_a_module_with_accelerate_hooks_keeps_them(toy):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Halve(ModelHook):
        def post_forward(self, module, output):
            return output * 0.5

    add_hook_to_module(toy, Halve())
    before = {k: v for k, v in toy.__dict__.items() if k in ("forward", "_old_forward")}
    model = Model(toy)
    x = torch.randn(2, 4)
    with torch.no_grad(), model.trace(x):
        soft = model.source.softmax_0.output.save()
        out = model.output.save()
    ref = toy_reference(toy, x)
    assert torch.allclose(soft, ref["softmax"]) and torch.allclose(out, ref["out"] * 0.5)
    assert {k: v for k, v in toy.__dict__.items() if k in ("forward", "_old_forward")} == before


# -- remote: the same body on the server --------------------------------------------------

def remote_body(model, options):
    with torch.no_grad(), model.trace("The Eiffel Tower is in", **options):
        attn = model.model.layers[0].self_attn.source
        out = attn.attention_interface_1.output[0].save()
        attn.self_o_proj_0.output[:, -1] = 0
        logits = model.lm_head.output.save()
    return out, logits


@pytest.mark.timeout(300)
def test_remote_source_gives_identical_values(server, smollm2_small_dir):
    with single_thread():  # as the server's workers: bitwise-equal values
        model = LanguageModel(str(smollm2_small_dir))
        object.__setattr__(model, "_remote_name", "smollm2")
        local = remote_body(model, {})
        remote = remote_body(model, {"remote": True, "host": server.url, "api_key": ALICE})
    for a, b in zip(local, remote):
        assert torch.equal(a, b)
