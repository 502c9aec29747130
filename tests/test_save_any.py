"""``.save()`` on any value in a trace body (issue 7, section 2).

The captured body's argument-less ``X.save()`` calls are rewritten to
seethrough's save (see ``tracing/capture.py``), so lists, dicts, tuples,
numbers, strings and model outputs can be saved like tensors, while objects
with a ``save`` method of their own keep it.  Values are checked against raw
forward hooks, plain HuggingFace forward and HuggingFace ``generate``; the
remote tests against the same code run locally.
"""

from __future__ import annotations

import ast
import traceback

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.errors import NotSavedError
from seethrough.remote.server import sandbox
from seethrough.tracing.capture import capture_source_block
from seethrough.tracing.runtime import SAVE_METHOD

from fixtures.models import MLP, hf_generate, record_outputs
from fixtures.threads import single_thread

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    net = MLP()
    return seethrough.Model(net), net


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer




# -- every kind of value -------------------------------------------------------------------------


def test_containers_numbers_strings_and_outputs_save(mlp):
    model, net = mlp
    x = torch.randn(3, 4)
    with model.trace(x):
        empty = [].save()
        built = list().save()
        width = model.fc1.output.shape[-1].save()
        mapping = {"hidden": model.fc1.output, "rows": x.shape[0]}.save()
        pair = (model.act.output, "relu").save()
        number = (7).save()
        word = "done".save()
        built.append(model.fc2.output.sum().item())
        out = model.output.save()
    _, seen = record_outputs(net, ["fc1", "act", "fc2"], x)
    with torch.no_grad():
        reference = net(x)
    assert empty == [] and type(empty) is list
    assert width == 8 and type(width) is int
    assert torch.equal(mapping["hidden"], seen["fc1"][0]) and mapping["rows"] == 3
    assert type(pair) is tuple and torch.equal(pair[0], seen["act"][0]) and pair[1] == "relu"
    assert number == 7 and word == "done"
    assert built == [pytest.approx(seen["fc2"][0].sum().item())]
    assert torch.equal(out, reference)


def test_model_output_saves_and_equals_plain_forward(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.trace(PROMPT):
            logits = model.lm_head.output.save()
            out = model.output.save()
        reference = hf(**tokenizer(PROMPT, return_tensors="pt"))
    assert type(out) is type(reference)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)
    assert torch.equal(out.logits, logits)


def test_list_saved_empty_comes_back_filled_after_generation(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.generate(PROMPT, max_new_tokens=5) as tracer:
            hs = list().save()
            for step in tracer.iter[:]:
                hs.append(model.lm_head.output[0, -1].argmax().item())
    expected = hf_generate(hf, tokenizer, PROMPT, max_new_tokens=5)
    assert hs == expected[0, -5:].tolist()


def test_saved_list_of_tensors_holds_the_forward_values(smol):
    model, hf, tokenizer = smol
    with torch.no_grad():
        with model.trace(PROMPT):
            kept = [].save()
            for layer in model.model.layers:
                kept.append(layer.output[0, -1])
        _, seen = record_outputs(hf, [f"model.layers.{i}" for i in range(4)], **tokenizer(PROMPT, return_tensors="pt"))
    assert len(kept) == 4
    for index, value in enumerate(kept):
        reference = seen[f"model.layers.{index}"][0]
        reference = reference[0] if isinstance(reference, tuple) else reference
        assert torch.equal(value, reference[0, -1])


def test_save_in_invokes_and_in_functions_defined_in_the_body(mlp):
    model, net = mlp
    a, b = torch.randn(2, 4), torch.randn(1, 4)
    with model.trace() as tracer:
        with tracer.invoke(a):
            rows_a = [].save()
            rows_a.append(model.fc1.output.shape[0])

        def collect(value):
            return [value].save()

        with tracer.invoke(b):
            rows_b = collect(model.fc1.output.shape[0])
    assert rows_a == [2] and rows_b == [1]
    assert collect(5) == [5]  # after the trace, saving does nothing and returns the value


def test_helper_functions_outside_the_body_still_save_tensors(mlp):
    model, net = mlp
    x = torch.randn(2, 4)

    def grab(envoy):
        return envoy.output.save()  # not captured: the Tensor patch serves it

    with model.trace(x):
        hidden = grab(model.fc1)
    _, seen = record_outputs(net, ["fc1"], x)
    assert torch.equal(hidden, seen["fc1"][0])


# -- objects with a save of their own -----------------------------------------------------------


class Checkpoint:
    """A user object with a save method of its own."""

    def __init__(self) -> None:
        self.written: list = []

    def save(self, path=None):
        self.written.append(path)
        if path is not None and hasattr(path, "write_text"):
            path.write_text("checkpoint")
        return f"wrote {path}"


def test_own_save_with_arguments_is_kept(mlp, tmp_path):
    model, _ = mlp
    box = Checkpoint()
    target = tmp_path / "box.pt"
    with model.trace(torch.randn(1, 4)):
        result = box.save(target)
        keyword = box.save(path="kw")
        hidden = model.fc1.output.save()
    assert result == f"wrote {target}" and box.written == [target, "kw"]
    assert target.read_text() == "checkpoint" and isinstance(hidden, torch.Tensor)


def test_own_zero_argument_save_is_kept_and_seethrough_save_marks_it(mlp):
    model, _ = mlp
    box = Checkpoint()
    holder = type("Holder", (), {})()
    holder.save = lambda: "instance save"
    with model.trace(torch.randn(1, 4)):
        own = box.save()  # the object's own method, as in nnsight
        by_instance = holder.save()
        marked = seethrough.save(box)
    assert own == "wrote None" and box.written == [None]
    assert by_instance == "instance save"
    assert marked is box


def test_super_save_in_a_class_defined_in_the_body(mlp):
    model, _ = mlp
    with model.trace(torch.randn(1, 4)):
        class Child(Checkpoint):
            def save(self, path=None):
                return "child " + super().save()

        said = Child().save()
    assert said == "child wrote None"


def test_saving_a_value_that_was_not_saved_before_is_an_error(mlp):
    model, _ = mlp
    with model.trace(torch.randn(1, 4)):
        hidden = model.fc1.output  # not saved: a placeholder after the trace
    with pytest.raises(NotSavedError, match="hidden"):
        with model.trace(torch.randn(1, 4)):
            again = hidden.save()


# -- the rewrite itself --------------------------------------------------------------------------


def test_errors_on_rewritten_lines_point_at_the_users_line(mlp):
    model, _ = mlp
    with pytest.raises(AttributeError, match="'list' object has no attribute 'nope'") as info:
        with model.trace(torch.randn(1, 4)):
            first = model.fc1.output.save()
            broken = [].save().nope
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.line.strip() == "broken = [].save().nope"


def test_the_parsed_tree_is_not_changed_and_names_are_the_users():
    source = "h = model.layer.output.save()\nitems = [].save()\nobj.save(path)\n"
    captured = capture_source_block(source, "<save-any-test>")
    assert SAVE_METHOD not in captured.loaded  # what a remote client sends is the user's names
    assert captured.loaded >= {"model", "obj", "path"}
    assert "save" in captured.attributes
    # The source text that travels is the user's, unchanged.
    assert captured.body_source == source
    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    assert SAVE_METHOD not in names


def test_remote_bodies_cannot_spell_the_internal_name():
    with pytest.raises(sandbox.SandboxViolation):
        sandbox.validate(f"x = {SAVE_METHOD}(model)\n", "<body>")
    sandbox.validate("hs = list().save()\nn = x.shape[-1].save()\n", "<body>")


# -- remote: the same code, the same values ------------------------------------------------------

from test_server import ALICE, server  # noqa: E402,F401 - the shared server fixtures


def _remote_generate_body(model, options):
    with model.generate("Once upon a time", max_new_tokens=3, do_sample=False, **options) as tracer:
        hs = list().save()
        logits = [].save()
        sizes = {"width": model.model.layers[0].output.shape[-1]}.save()
        for step in tracer.iter[:]:
            hs.append(model.lm_head.output[0, -1].argmax().item())
            logits.append(model.output.logits[:, -1])
    return hs, sizes, logits


@pytest.mark.timeout(300)
def test_save_any_value_remotely_equals_local(server, smollm2_small_dir):
    with single_thread():  # the server's workers run with one thread: bitwise-equal values
        model = LanguageModel(str(smollm2_small_dir))
        object.__setattr__(model, "_remote_name", "smollm2")
        local = _remote_generate_body(model, {})
        remote = _remote_generate_body(model, {"remote": True, "host": server.url, "api_key": ALICE})
    assert remote[0] == local[0] and len(local[0]) == 3
    assert remote[1] == local[1] == {"width": 576}
    assert len(local[2]) == 3
    for a, b in zip(local[2], remote[2]):
        assert torch.equal(a, b)


def _session_body(model, options):
    with model.session(**options):
        found = [].save()
        for prompt in ("The cat sat on the", "A dog ran to the"):
            with model.trace(prompt):
                found.append(model.lm_head.output[0, -1].argmax().item())
    return found


@pytest.mark.timeout(300)
def test_save_at_session_level_remotely_equals_local(server, smollm2_small_dir):
    with single_thread():  # as the server's workers: bitwise-equal values
        model = LanguageModel(str(smollm2_small_dir))
        object.__setattr__(model, "_remote_name", "smollm2")
        local = _session_body(model, {})
        remote = _session_body(model, {"remote": True, "host": server.url, "api_key": ALICE})
    assert len(local) == 2 and remote == local
    hf, tokenizer = model._model, model.tokenizer
    with torch.no_grad():
        expected = [int(hf(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax())
                    for p in ("The cat sat on the", "A dog ran to the")]
    assert local == expected


def test_local_session_with_save_runs_and_keeps_its_names(smol):
    model, hf, tokenizer = smol

    def run():
        with model.session() as session:
            found = [].save()
            for prompt in ("The cat sat on the", "A dog ran to the"):
                with model.trace(prompt):
                    found.append(model.lm_head.output[0, -1].argmax().item())
            count = len(found)
        return found, count, session

    found, count, session = run()
    with torch.no_grad():
        expected = [int(hf(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax())
                    for p in ("The cat sat on the", "A dog ran to the")]
    assert found == expected and count == 2
    assert repr(session).startswith("<Session")
