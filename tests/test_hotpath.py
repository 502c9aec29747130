"""The fast paths of a trace behave exactly as the general ones.

Each shortcut taken on the hot path (see ``bench/trace_overhead.py``) has a
general path next to it; these tests drive both, against raw PyTorch hooks
and plain Python as the reference.
"""

from __future__ import annotations

import sys

import pytest
import torch
from fixtures.models import MLP, assert_pristine, hook_state, record_outputs
from torch import nn

import seethrough
from seethrough.tracing.hooks import DirectHookSet, HandleHookSet, HookSet


def _first_outputs(module: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: each named submodule's first output, by raw forward hooks."""
    _, seen = record_outputs(module, names, x)
    return {name: outputs[0] for name, outputs in seen.items()}


# -- hooks: the direct dictionaries and PyTorch's public API ------------------------


@pytest.mark.parametrize("hook_set_class", [DirectHookSet, HandleHookSet])
def test_hook_sets_fire_and_leave_nothing(hook_set_class):
    torch.manual_seed(0)
    module = MLP()
    before = hook_state(module)
    x = torch.randn(2, 4)
    expected = _first_outputs(module, ["fc1", "act"], x)
    seen: dict[str, torch.Tensor] = {}
    hooks = hook_set_class()
    hooks.add_outputs([module.fc1], lambda mod, args, out: seen.__setitem__("fc1", out.clone()))
    hooks.add_input(module.act, lambda mod, args, kwargs: seen.__setitem__("act_in", args[0].clone()))
    # An output hook that returns a value replaces the output, as PyTorch's do.
    hooks.add_outputs([module.act], lambda mod, args, out: out * 0)
    with torch.no_grad():
        result = module(x)
    assert torch.equal(seen["fc1"], expected["fc1"])
    assert torch.equal(seen["act_in"], expected["fc1"])
    with torch.no_grad():
        assert torch.equal(result, module.fc2(torch.zeros_like(expected["act"])))
    hooks.remove_all()
    assert_pristine(module, before)
    with torch.no_grad():
        assert torch.equal(module(x), _first_outputs(module, ["fc2"], x)["fc2"])


def test_the_hook_set_in_use_is_the_direct_one_where_torch_has_the_dictionaries():
    expected = DirectHookSet if hasattr(nn.Module(), "_forward_pre_hooks_with_kwargs") else HandleHookSet
    assert type(HookSet()) is expected


# -- no exception being handled while the body runs ----------------------------------


class _Probe(nn.Module):
    """Records the exception being handled in its forward, and the context
    of one it raises and catches itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sys.exception())
        try:
            raise KeyError("inside")
        except KeyError as error:
            self.seen.append(error.__context__)
        return self.lin(x)


def test_forward_in_a_trace_runs_with_no_exception_being_handled():
    probe = _Probe()
    model = seethrough.Model(probe)
    x = torch.randn(1, 4)
    probe(x)
    plain = list(probe.seen)
    probe.seen.clear()
    with model.trace(x):
        out = model.lin.output.save()
    assert probe.seen == plain == [None, None]
    assert torch.equal(out, probe.lin(x))


def test_a_trace_inside_an_except_block_leaves_that_exception_handled():
    probe = _Probe()
    model = seethrough.Model(probe)
    x = torch.randn(1, 4)
    try:
        raise ValueError("the user's")
    except ValueError as outer:
        with model.trace(x):
            out = model.lin.output.save()
        assert sys.exception() is outer
        # Inside the forward no exception of seethrough's is being handled
        # (nor, unlike a plain call here, the user's: it is not chained to).
        assert probe.seen == [None, None]
    assert sys.exception() is None
    assert torch.equal(out, probe.lin(x))


def test_an_error_from_the_body_has_no_context_from_the_takeover():
    model = seethrough.Model(MLP())
    with pytest.raises(ZeroDivisionError) as info:
        with model.trace(torch.randn(1, 4)):
            h = model.fc1.output.save()
            h / 0 if False else 1 / 0
    assert info.value.__context__ is None
    assert_pristine(model._model)


# -- child envoys found by plain attribute lookup ----------------------------------------


class _Named(nn.Module):
    """Submodules named like Envoy methods and a plain one."""

    def __init__(self) -> None:
        super().__init__()
        self.get = nn.Linear(4, 4)  # `Envoy.get` is a method
        self.modules_ = nn.Identity()
        self.body = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.get(x))


def test_child_envoys_keep_methods_first_and_resolve_plain_children():
    model = seethrough.Model(_Named())
    assert callable(model.get) and model.get("body") is model.body  # the method, not the child
    assert model["get"]._module is model._model.get  # the child, by indexing
    first = model.body
    assert model.body is first and "body" in model.__dict__
    x = torch.randn(1, 4)
    with model.trace(x):
        b = model.body.output.save()
    expected = _first_outputs(model._model, ["body"], x)["body"]
    assert torch.equal(b, expected)


def test_an_edited_clone_makes_its_own_child_envoys():
    torch.manual_seed(0)
    model = seethrough.Model(MLP())
    original_fc1 = model.fc1  # cached on the original before cloning
    with model.edit() as edited:
        model.fc1.output[:] = 0
    assert edited.fc1 is not original_fc1 and edited.fc1._root is edited
    assert model.fc1 is original_fc1 and original_fc1._root is model
    x = torch.randn(2, 4)
    with edited.trace(x):
        out_edited = edited.output.save()
    with model.trace(x):
        out_plain = model.output.save()
    module = model._model
    assert torch.equal(out_plain, module(x))
    assert torch.equal(out_edited, module.fc2(module.act(torch.zeros(2, 8))))


class _LoggingEnvoy(seethrough.Envoy):
    """A custom envoy that sees every attribute reached through __getattr__."""

    def __getattr__(self, name):
        self.__dict__.setdefault("_asked", []).append(name)
        return super().__getattr__(name)


def test_a_custom_envoy_with_its_own_getattr_keeps_seeing_every_child_access():
    model = seethrough.Model(nn.Sequential(MLP()), envoys=_LoggingEnvoy)
    outer = model.get("0")
    outer.fc1
    outer.fc1
    assert outer.__dict__["_asked"].count("fc1") == 2


# -- save(): the tensor fast path and the general one -----------------------------------


class _OwnSave:
    def __init__(self) -> None:
        self.saved_to = None

    def save(self):
        self.saved_to = "own"
        return self


def test_save_on_tensors_subclasses_and_objects_with_their_own_save():
    torch.manual_seed(0)
    module = MLP()
    model = seethrough.Model(module)
    x = torch.randn(2, 4)
    with model.trace(x):
        h = model.fc1.output.save()  # a plain tensor: the fast path
        w = model.fc1.weight.save()  # a Parameter (a Tensor subclass): the general path
        mine = _OwnSave().save()  # the object's own save wins
        rows = [1, 2].save()
    assert torch.equal(h, _first_outputs(module, ["fc1"], x)["fc1"])
    assert w is module.fc1.weight
    assert mine.saved_to == "own"
    assert rows == [1, 2]
