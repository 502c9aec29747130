"""The declared contracts between the layers (``seethrough.tracing.contract``,
``seethrough.envoy.EnvoyRoot``) are what the implementations offer.

Tracing and envoys may not import the model wrappers (``tests/test_layers.py``);
they use them through these protocols.  A protocol that drifted from the
wrappers would only show as an AttributeError in some trace: these tests
compare every member of each protocol with the real classes, parameter
names included.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import seethrough
from seethrough.envoy import Envoy, EnvoyRoot
from seethrough.models.language import LanguageModel
from seethrough.models.model import Model
from seethrough.tracing.contract import ModuleHandle, PreparedInputs, TracedModel


def _methods(protocol: type) -> dict[str, Any]:
    return {
        name: value for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("__")
    }


def _parameters(function: Any) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("protocol", [TracedModel, EnvoyRoot])
@pytest.mark.parametrize("wrapper", [Model, LanguageModel])
def test_the_wrappers_offer_every_method_with_its_parameters(protocol, wrapper):
    methods = _methods(protocol)
    assert methods, "the protocol declares methods"
    for name, declared in methods.items():
        real = getattr(wrapper, name, None)
        assert callable(real), f"{wrapper.__name__} lacks {name}"
        assert _parameters(real)[: len(_parameters(declared))] == _parameters(declared), name


def test_the_handle_methods_are_the_envoys():
    for name, declared in _methods(ModuleHandle).items():
        assert _parameters(getattr(Envoy, name)) == _parameters(declared), name


def test_real_objects_satisfy_the_protocols(mlp):
    model = seethrough.Model(mlp)
    assert isinstance(model, TracedModel) and isinstance(model, EnvoyRoot)
    assert isinstance(model.fc1, ModuleHandle)
    assert model._module is mlp and model.fc1._module is mlp.fc1 and model.fc1._path == "fc1"
    prepared = model._prepare_input((mlp.fc1.weight.new_ones(2, 4),), {})
    assert isinstance(prepared, PreparedInputs) and prepared.rows == 2
    plan, chain = model._hook_plan(mlp.fc1)
    assert [module for module, _ in plan] == [mlp.fc1, mlp] and chain
    assert model._child_path("", "fc1") == "fc1" and model._child_path("", "nope") is None
    assert [envoy._path for envoy in model._resolve_modules(["fc1", model.fc2])] == ["fc1", "fc2"]


def test_a_missing_member_is_noticed(mlp):
    class Partial:
        _module = mlp
        _edits: list = []

    assert not isinstance(Partial(), TracedModel)  # a check that can fail
