"""nnsight-style use of the wrappers, each checked against an independent
reference (plain forward, raw forward hooks, HuggingFace forward):

* sessions: values flow between traces without ``.save()``; only saved ones leave;
* ``.to`` / ``.cpu`` / ``.eval`` / ``.train`` return the wrapper;
* ``m.inputs = (args, kwargs)`` with a rebuilt call (raw pre-hook reference);
* ``rename=`` keys read as nnsight reads them;
* padding with the EOS token when the tokenizer has no pad token;
* ``model.edit() as (tracer, edited)`` and ``TransformersModel(..., task=...)``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import seethrough
from seethrough import LanguageModel, NNsight, NotSavedError, TransformersModel
from seethrough.models.language import LanguageModelError
from fixtures.models import assert_pristine, hook_state, record_outputs


# -- sessions -------------------------------------------------------------------

def test_session_values_flow_between_traces_without_save(mlp):
    model = seethrough.Model(mlp)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        with model.session():
            with model.trace(x1):
                hidden = model.fc1.output  # not saved
            with model.trace(x2):
                model.fc1.output = hidden  # patched in from the first trace
                patched = model.output.save()
            with model.trace(x2):
                clean = model.output.save()
    assert torch.allclose(patched, mlp(x1))  # x1's hidden state runs on: x1's output
    assert torch.allclose(clean, mlp(x2))
    with pytest.raises(NotSavedError, match="only saved values leave a session"):
        hidden.shape  # it did not leave the session
    assert_pristine(mlp)


def test_session_in_a_function_and_saved_values_leave(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(3, 4)

    def run():
        with torch.no_grad():
            with model.session():
                with model.trace(x):
                    h = model.fc1.output
                with model.trace(x):
                    doubled = (model.fc1.output + h).save()
                    kept = h.save()
        return doubled, kept, h

    doubled, kept, h = run()
    ref = mlp.fc1(x)
    assert torch.allclose(doubled, 2 * ref)
    assert torch.allclose(kept, ref) and kept is h  # saved in the second trace: it leaves


def test_session_with_session_level_save_also_lends(mlp):
    model = seethrough.Model(mlp)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        with model.session():
            outputs = [].save()  # a session-level .save(): the block runs from its source
            with model.trace(x1):
                hidden = model.fc1.output
            with model.trace(x2):
                model.fc1.output = hidden
                outputs.append(model.output.save())
    assert len(outputs) == 1 and torch.allclose(outputs[0], mlp(x1))
    with pytest.raises(NotSavedError):
        hidden.sum()


def test_outside_a_session_unsaved_values_still_do_not_leave(mlp):
    model = seethrough.Model(mlp)
    with torch.no_grad():
        with model.trace(torch.randn(2, 4)):
            h = model.fc1.output
    with pytest.raises(NotSavedError):
        h.sum()


# -- wrapper methods ---------------------------------------------------------------

def test_to_cpu_eval_train_return_the_wrapper(mlp):
    x = torch.randn(2, 4)
    wrapper = NNsight(mlp)
    assert wrapper.to("cpu") is wrapper and wrapper.cpu() is wrapper
    assert wrapper.train() is wrapper and mlp.training
    assert wrapper.eval() is wrapper and not mlp.training
    assert wrapper.to(torch.float64) is wrapper and mlp.fc1.weight.dtype == torch.float64
    wrapper.to(torch.float32)
    with torch.no_grad():
        with NNsight(mlp).to("cpu").eval().trace(x) as tracer:
            out = tracer._model.output.save()
    assert torch.allclose(out, mlp(x))


def test_language_model_train_before_loading_is_kept(gpt2_dir):
    model = LanguageModel(str(gpt2_dir))
    assert model.train() is model and not model.dispatched
    model.dispatch()
    assert model._model.training
    assert model.eval() is model and not model._model.training
    assert model.cpu() is model


# -- .inputs = (args, kwargs) --------------------------------------------------------

def test_inputs_assignment_with_a_rebuilt_call(tiny_gpt2):
    before = hook_state(tiny_gpt2)  # HuggingFace may have hooks of its own on the shared model
    model = seethrough.Model(tiny_gpt2)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        with model.trace(ids):
            m = model.transformer.h[1]
            m.inputs = ((torch.zeros_like(m.input),),) + m.inputs[1:]
            out = model.output.logits.save()

    def pre(module, args, kwargs):
        return (torch.zeros_like(args[0]),), kwargs

    handle = tiny_gpt2.transformer.h[1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = tiny_gpt2(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        plain = tiny_gpt2(ids).logits
    assert torch.allclose(out, ref) and not torch.allclose(out, plain)
    assert_pristine(tiny_gpt2, before)


def test_inputs_assignment_same_structure(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with torch.no_grad():
        with model.trace(x):
            model.fc2.inputs = ((torch.ones(2, 8),), {})
            out = model.output.save()
    assert torch.allclose(out, mlp.fc2(torch.ones(2, 8)))


def test_rebuilt_call_from_a_partial_invoke_is_refused(tiny_gpt2):
    before = hook_state(tiny_gpt2)
    model = seethrough.Model(tiny_gpt2)
    with pytest.raises(seethrough.ShapeMismatchError, match="only rows"):
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(torch.tensor([[1, 2, 3]])):
                    m = model.transformer.h[0]
                    m.inputs = ((m.input,), {})
                with tracer.invoke(torch.tensor([[4, 5, 6]])):
                    pass
    assert_pristine(tiny_gpt2, before)


# -- rename= ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "rename, path, real",
    [
        ({"transformer.h": "layers_"}, ("layers_",), "transformer.h"),
        ({".transformer.h": "blocks"}, ("blocks",), "transformer.h"),
        ({".h": "blocks"}, ("transformer", "blocks"), "transformer.h"),
        ({"h": "blocks"}, ("transformer", "blocks"), "transformer.h"),
        ({"h.0": "first_layer"}, ("transformer", "first_layer"), "transformer.h.0"),
        ({"1": "second_layer"}, ("transformer", "h", "second_layer"), "transformer.h.1"),
        ({"attn": ["attention", "att"]}, ("transformer", "h", "0", "att"), "transformer.h.0.attn"),
    ],
)
def test_rename_keys_read_as_nnsight(tiny_gpt2, rename, path, real):
    model = seethrough.Model(tiny_gpt2, rename=rename)
    envoy = model
    for part in path:
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    assert envoy._module is tiny_gpt2.get_submodule(real)
    if isinstance(envoy._module, torch.nn.ModuleList):  # never called itself: read its first block
        envoy, real = envoy[0], real + ".0"
    ids = torch.tensor([[7, 8, 9]])
    _, seen = record_outputs(tiny_gpt2, [real], ids)
    with torch.no_grad():
        with model.trace(ids):
            value = envoy.output.save()
    first = seen[real][0]
    if isinstance(first, tuple):
        assert torch.equal(value[0], first[0])
    else:
        assert torch.equal(value, first)


def test_rename_does_not_touch_the_original_names(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2, rename={".h": "blocks"})
    assert model.transformer.h[0]._module is tiny_gpt2.transformer.h[0]
    assert "blocks" in dir(model.transformer)


@pytest.mark.parametrize("rename", [{"h": "output"}, {"h": "trace"}, {"h": "not an identifier"}, {"": "x"}])
def test_rename_refuses_aliases_that_cannot_work(tiny_gpt2, rename):
    with pytest.raises(ValueError, match="rename="):
        seethrough.Model(tiny_gpt2, rename=rename)


def test_rename_keys_may_go_through_other_renames(tiny_gpt2):
    # nnterp's renames: a key's parts may be aliases of other keys, in any order.
    rename = {"model.ln_final": "ln_final", "transformer": "model", "ln_f": "ln_final",
              "model.layers": "layers", "h": "layers", "a": "b", "b": "a"}  # a cycle is harmless
    model = seethrough.Model(tiny_gpt2, rename=rename)
    assert model.ln_final._module is tiny_gpt2.transformer.ln_f
    assert model.model.ln_final._module is tiny_gpt2.transformer.ln_f
    assert model.layers[1]._module is tiny_gpt2.transformer.h[1]
    assert "ln_final" in dir(model)
    with pytest.raises(AttributeError):
        model.a
    ids = torch.tensor([[7, 8, 9]])
    _, seen = record_outputs(tiny_gpt2, ["transformer.ln_f"], ids)
    with torch.no_grad():
        with model.trace(ids):
            norm = model.ln_final.output.save()
    assert torch.equal(norm, seen["transformer.ln_f"][0])


class _Subclass(LanguageModel):
    """A wrapper subclass that sets itself up in __init__, as nnterp's StandardizedTransformer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = self.config.vocab_size  # the module has a `vocab_size` too
        self.num_layers = len(self.transformer.h)


def test_wrapper_subclass_attributes_outside_a_trace(gpt2_dir):
    model = _Subclass(str(gpt2_dir))
    assert model.vocab_size == 50257 and model.num_layers == 2
    model.vocab_size = 7  # a plain attribute, also later
    assert model.vocab_size == 7
    with pytest.raises(seethrough.UsageAttributeError, match="submodule"):
        model.transformer = None  # would hide a submodule
    with pytest.raises(seethrough.UsageAttributeError, match="submodule"):
        model.layers = None  # a standard alias of one
    with torch.no_grad():
        with pytest.raises(seethrough.UsageAttributeError, match="inside a trace"):
            with model.trace("Hello"):
                model.config = None  # inside a trace: an envoy misuse, still refused


def test_loaded_tokenizer_gets_eos_as_pad_token_and_left_padding(tmp_path, gpt2_tokenizer):
    from seethrough.models import offline

    tokenizer = AutoTokenizer.from_pretrained(offline.save_random_lm(tmp_path / "a", "gpt2"))
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    folder = offline.save_random_lm(tmp_path / "b", "gpt2", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    model = LanguageModel(str(folder))
    assert model.tokenizer.pad_token == model.tokenizer.eos_token == "<|endoftext|>"
    batch = model.tokenizer(["a", "a b c"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]  # left, as nnsight
    mine = AutoTokenizer.from_pretrained(folder)
    assert LanguageModel(str(folder), tokenizer=mine).tokenizer.pad_token is None  # yours: untouched


def test_tokenizer_kwargs_right_padding_pads_batches_right(tmp_path):
    from seethrough.models import offline

    folder = offline.save_random_lm(tmp_path / "m", "llama")
    model = LanguageModel(str(folder), tokenizer_kwargs={"padding_side": "right"})
    assert model.tokenizer.padding_side == "right"
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = ["Hello", "The quick brown fox"]
    with torch.no_grad():
        with model.trace(prompts):
            ids = model.inputs[1]["input_ids"].save()
            logits = model.output.logits.save()
        for row, prompt in enumerate(prompts):
            alone = hf(**tokenizer(prompt, return_tensors="pt")).logits[0]
            assert torch.allclose(logits[row, : alone.shape[0]], alone, atol=1e-5)  # real tokens first
    assert ids[0, -1].item() == tokenizer.eos_token_id
    with pytest.raises(TypeError, match="tokenizer_kwargs"):
        LanguageModel(str(folder), tokenizer_kwargs=["padding_side"])


# -- padding without a pad token -----------------------------------------------------------

def test_eos_pads_when_there_is_no_pad_token(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = None
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    hf.config.pad_token_id = None
    model = LanguageModel(hf, tokenizer=tokenizer)
    prompts = ["short", "a much longer input than that"]
    with torch.no_grad():
        with model.trace() as tracer:
            with tracer.invoke(prompts[0]):
                ids = model.transformer.wte.input.save()
                short = model.lm_head.output.save()
            with tracer.invoke(prompts[1]):
                long = model.lm_head.output.save()
    eos = tokenizer.eos_token_id
    n_short = len(tokenizer(prompts[0])["input_ids"])
    assert ids.shape[1] == len(tokenizer(prompts[1])["input_ids"])
    assert (ids[0, : ids.shape[1] - n_short] == eos).all()  # padded on the left with EOS
    for text, rows in ((prompts[0], short), (prompts[1], long)):
        with torch.no_grad():
            alone = hf(**tokenizer(text, return_tensors="pt")).logits
        assert torch.allclose(rows[0, -alone.shape[1]:], alone[0], atol=1e-5)


# -- edit() as (tracer, edited), TransformersModel(task=...) ------------------------------------

def test_edit_as_tracer_and_edited(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)
    with model.edit() as (tracer, edited):
        edited.fc1.output[:] = 0
    with torch.no_grad():
        with edited.trace(x):
            out = edited.output.save()
        with model.trace(x):
            original = model.output.save()
    assert torch.allclose(out, mlp.fc2(torch.zeros(2, 8)))
    assert torch.allclose(original, mlp(x))
    assert_pristine(mlp)


def test_edit_tracer_follows_every_generation_step(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    model = LanguageModel(hf, tokenizer=tokenizer)
    with model.edit() as (tracer, edited):
        for step in tracer.all():
            edited.transformer.h[0].output[:] = 0
    with torch.no_grad():
        with edited.generate("Hello", max_new_tokens=3, do_sample=False) as gen:
            ids = gen.result.save()

    handle = hf.transformer.h[0].register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            ref = hf.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)
    finally:
        handle.remove()
    assert torch.equal(ids, ref)


@pytest.mark.parametrize("task, cls", [("text-generation", "GPT2LMHeadModel"), ("causal-lm", "GPT2LMHeadModel"),
                                       ("feature-extraction", "GPT2Model"), ("CAUSAL_LM", "GPT2LMHeadModel")])
def test_transformers_model_task(gpt2_dir, task, cls):
    model = TransformersModel(str(gpt2_dir), task=task)
    assert type(model._model).__name__ == cls


def test_transformers_model_unknown_task_is_refused(gpt2_dir):
    with pytest.raises(LanguageModelError, match="text-generation"):
        TransformersModel(str(gpt2_dir), task="translate-everything")
    with pytest.raises(LanguageModelError, match="not both"):
        TransformersModel(str(gpt2_dir), task="causal-lm", automodel="AutoModel")
