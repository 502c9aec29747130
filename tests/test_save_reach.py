"""``Tensor.save`` is installed only for traces whose bodies may reach code that
calls it (tracing/save_reach.py).

Whether the patch is there is observed from outside the library: a raw
PyTorch forward hook on the model records ``"save" in torch.Tensor.__dict__``
while the trace's forward runs.  Values are checked against raw hooks.
"""

from __future__ import annotations

import ast
import textwrap

import pytest
import torch

import seethrough
from seethrough.tracing.capture import _is_save_call
from seethrough.tracing.save_reach import NO_CALLS, analyse_reach, needs_tensor_save


def reach_of(source: str):
    return analyse_reach(ast.parse(textwrap.dedent(source)).body, _is_save_call)


@pytest.fixture
def net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 4)


@pytest.fixture
def patched_during_forward(net):
    """A list that gets, per forward, whether ``Tensor.save`` existed then."""
    seen: list[bool] = []
    handle = net[2].register_forward_hook(lambda m, a, o: seen.append("save" in torch.Tensor.__dict__))
    yield seen
    handle.remove()
    assert "save" not in torch.Tensor.__dict__


def reference_first_output(net, x) -> torch.Tensor:
    got = {}
    handle = net[0].register_forward_hook(lambda m, a, o: got.update(value=o.detach().clone()))
    net(x)
    handle.remove()
    return got["value"]


def grab_first(model):
    return model[0].output.save()


class Recorder:
    def __init__(self) -> None:
        self.kept = []

    def record(self, envoy) -> None:
        self.kept.append(envoy.output.save())


class SavingEnvoy(seethrough.Envoy):
    def keep(self):
        return self.output.save()


# -- what the text says ---------------------------------------------------------------


def test_a_body_without_calls_needs_nothing():
    assert reach_of("pass") is NO_CALLS
    assert reach_of("h = model[0].output.save()\nmodel[1].output[:] = 0") is NO_CALLS


def test_call_roots_and_opaque_calls_are_found():
    reach = reach_of("""
        h = helper(model.layers[0].output)
        n = torch.nn.functional.gelu(h).norm()
        with torch.no_grad():
            pass
    """)
    assert reach.call_roots == {"helper", "torch"} and not reach.opaque
    assert "h" in reach.body_names and "n" in reach.body_names
    assert reach_of("f()()").call_roots == {"f"}  # judged by f: what f returns is f's doing
    assert reach_of("[helper][0](x)").opaque  # a call on a value the text builds: not followed
    assert reach_of("h = model.x.output\nkeep = h.save\nkeep()").opaque  # `.save` not as `X.save()`
    assert not reach_of("', '.join(['a'])").opaque  # a str method


def test_the_values_of_the_names_decide(net):
    model = seethrough.Model(net)
    reach = reach_of("y = f(model[0].output)")
    assert not needs_tensor_save(reach, {"f", "model"}, ({"f": torch.relu, "model": model},))
    assert needs_tensor_save(reach, {"f", "model"}, ({"f": grab_first, "model": model},))
    assert needs_tensor_save(reach, {"f", "model"}, ({"model": model},))  # unknown: assume the worst
    # A user object (or one inside a container) read by the body could be called from anywhere.
    plain = reach_of("y = torch.relu(model[0].output) * scale[0]")
    names = {"torch", "model", "scale"}
    assert not needs_tensor_save(plain, names, ({"torch": torch, "model": model, "scale": [2.0]},))
    assert needs_tensor_save(plain, names, ({"torch": torch, "model": model, "scale": [Recorder()]},))
    assert needs_tensor_save(plain, names, ({"torch": torch, "model": model, "scale": list(range(100))},))
    handed = reach_of("ys = list(map(g, xs))")
    assert needs_tensor_save(handed, {"map", "list", "g", "xs"}, ({"g": grab_first, "xs": []},))
    assert not needs_tensor_save(handed, {"map", "list", "g", "xs"}, ({"g": abs, "xs": []},))
    # Builtins that run code from text (never rewritten) are not inert.
    text = reach_of("exec(source, namespace)")
    assert needs_tensor_save(text, {"exec", "source", "namespace"}, ({"source": "x = 1", "namespace": {}},))
    custom = seethrough.Model(net, envoys=SavingEnvoy)
    assert needs_tensor_save(reach_of("model[0].keep()"), {"model"}, ({"model": custom},))


# -- traces ---------------------------------------------------------------------------


def test_plain_bodies_run_without_the_patch(net, x, patched_during_forward):
    model = seethrough.Model(net)
    with model.trace(x):
        pass
    with model.trace(x):
        h = model[0].output.save()
        model[1].output[:] = torch.relu(model[1].output)
    with model.trace() as tracer:
        with tracer.invoke(x):
            a = model[0].output.save()
        with tracer.invoke(x * 2):
            b = model[0].output.save()
    assert patched_during_forward == [False, False, False]
    assert torch.equal(h, reference_first_output(net, x))
    # (two invokes run as one batch of 6 rows: equal up to the batch size's rounding)
    torch.testing.assert_close(a, reference_first_output(net, x))
    torch.testing.assert_close(b, reference_first_output(net, x * 2))


def test_a_helper_that_saves_gets_the_patch(net, x, patched_during_forward):
    model = seethrough.Model(net)
    with model.trace(x):
        h = grab_first(model)
    assert patched_during_forward == [True]
    assert torch.equal(h, reference_first_output(net, x))


def test_a_helper_handed_to_map_gets_the_patch(net, x, patched_during_forward):
    model = seethrough.Model(net)
    with model.trace(x):
        saved = list(map(grab_first, [model]))
    assert patched_during_forward == [True]
    assert torch.equal(saved[0], reference_first_output(net, x))


def test_a_method_of_the_users_object_gets_the_patch(net, x, patched_during_forward):
    model = seethrough.Model(net)
    recorder = Recorder()
    with model.trace(x):
        recorder.record(model[0])
    assert patched_during_forward == [True]
    assert torch.equal(recorder.kept[0], reference_first_output(net, x))


def test_a_custom_envoy_that_saves_gets_the_patch(net, x, patched_during_forward):
    model = seethrough.Model(net, envoys=SavingEnvoy)
    with model.trace(x):
        h = model[0].keep()
    assert patched_during_forward == [True]
    assert torch.equal(h, reference_first_output(net, x))


def test_an_invoke_opened_while_the_trace_runs_installs_it(net, x, patched_during_forward):
    model = seethrough.Model(net)
    with model.trace() as tracer:
        with tracer.invoke(x):
            a = model[0].output.save()
        with tracer.invoke(x * 2):
            b = grab_first(model)
    assert patched_during_forward == [True]
    # (two invokes run as one batch of 6 rows: equal up to the batch size's rounding)
    torch.testing.assert_close(a, reference_first_output(net, x))
    torch.testing.assert_close(b, reference_first_output(net, x * 2))


def test_a_helper_defined_in_the_body_works(net, x, patched_during_forward):
    model = seethrough.Model(net)
    with model.trace(x):
        def local_grab(m):
            return m[0].output.save()

        h = local_grab(model)
    assert torch.equal(h, reference_first_output(net, x))


class Report:
    """A model output of the user's own class, with a method that saves."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def keep(self) -> torch.Tensor:
        return self.hidden.save()


class Reporting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Report:
        return Report(self.inner(x))


def test_a_save_reached_unseen_fails_loudly_with_the_fix(x):
    """What the text cannot show (a method of an object the model returns)
    fails with Python's AttributeError and a note naming the fix."""
    model = seethrough.Model(Reporting())
    with pytest.raises(AttributeError) as caught:
        with model.trace(x):
            h = model.output.keep()
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "seethrough.save(value)" in notes
    with pytest.raises(AttributeError) as caught:
        with model.session():
            with model.trace(x):
                h = model.output.keep()
    assert len([note for note in caught.value.__notes__ if "seethrough.save(value)" in note]) == 1  # said once
    assert "save" not in torch.Tensor.__dict__
    with model.trace(x):
        report = model.output.save()
    assert isinstance(report, Report)


def test_the_missing_save_note_goes_to_tensors_only():
    from seethrough.tracing.save_reach import explain_missing_tensor_save

    def error_of(value):
        try:
            value.save()
        except AttributeError as error:
            return error
        raise AssertionError(f"{type(value).__name__} has a `save` outside a trace")

    for value in (torch.zeros(2), torch.nn.Parameter(torch.zeros(2))):  # a Parameter is a Tensor too
        error = error_of(value)
        explain_missing_tensor_save(error)
        assert any("seethrough.save(value)" in note for note in getattr(error, "__notes__", ()))
    other = error_of(object())
    explain_missing_tensor_save(other)
    assert not getattr(other, "__notes__", None)
