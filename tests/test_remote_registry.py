"""Registered modules (seethrough.register / nnsight.register): local code that a
remote body uses travels as source and is rebuilt on the server, inside the
sandbox (seethrough.remote.client.registry on the client, seethrough.remote.server.modules
on the server).

The helper package is written to a temporary folder that only this process
has on its path: the server (the real one of tests/test_server.py) can reach
it only through the request.  Every value is checked against the same code
run locally, and the local run against raw hooks.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.remote.client import registry
from seethrough.remote.client.collect import RemoteInputError
from seethrough.remote.server.modules import ModuleRules, validate_module
from seethrough.remote.refusal import SandboxViolation
from fixtures.models import record_outputs
from fixtures.threads import one_thread  # noqa: F401 - autouse: the server's one torch thread
from test_server import ALICE, server  # noqa: F401 - the shared server fixtures

pytestmark = [pytest.mark.timeout(300)]

PACKAGE = {
    "__init__.py": '''
        """Helpers for remote bodies (a package)."""
        from __future__ import annotations

        import torch

        from .core import SCALE, last_token


        class Probe:
            """Scales a tensor and counts its calls."""

            kind = "probe"

            def __init__(self, factor: float) -> None:
                self.factor = factor * SCALE
                self.calls = 0

            def __call__(self, h: torch.Tensor) -> torch.Tensor:
                self.calls += 1
                return torch.tanh(h) * self.factor


        class StopProbe(ValueError):
            pass
    ''',
    "core.py": '''
        import torch

        SCALE = 1.5


        def last_token(h):
            return h[:, -1].clone()
    ''',
}


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    """The package ``st_helpers_<n>`` on this process's path only, registered."""
    name = f"st_helpers_{tmp_path.name.replace('-', '_').lower()}"
    folder = tmp_path / name
    folder.mkdir()
    for file, text in PACKAGE.items():
        (folder / file).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    registry.register(name)  # by name, as nnterp's ndif_register("nnterp")
    yield module
    registry.unregister(name)
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[loaded]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> LanguageModel:
    model = LanguageModel(str(gpt2_dir))
    object.__setattr__(model, "_remote_name", "gpt2")  # the name the server serves this folder under
    return model


def _body(model, helpers, **options):
    with torch.no_grad():
        with model.trace("Hello world, again", **options):
            last = helpers.last_token(model.transformer.h[0].output).save()
            probe = helpers.Probe(2.0)
            scaled = probe(model.transformer.h[1].output).save()
            calls = probe.calls
            kind = probe.kind
    return last, scaled, calls, kind


def test_local_values_equal_raw_hooks(gpt2, helpers, gpt2_tokenizer):
    last, scaled, calls, kind = _body(gpt2, helpers)
    ids = gpt2_tokenizer("Hello world, again", return_tensors="pt")["input_ids"]
    _, seen = record_outputs(gpt2._model, ["transformer.h.0", "transformer.h.1"], ids)
    assert torch.equal(last, seen["transformer.h.0"][0][:, -1])
    assert torch.allclose(scaled, torch.tanh(seen["transformer.h.1"][0]) * 3.0)
    assert (calls, kind) == (1, "probe")


@pytest.mark.parametrize("where", ["local", "server"])
def test_registered_package_travels_and_is_rebuilt(gpt2, helpers, server, where):
    options = {"remote": "local"} if where == "local" else {"remote": True, "host": server.url, "api_key": ALICE}
    local = _body(gpt2, helpers)
    remote = _body(gpt2, helpers, **options)
    assert torch.equal(remote[0], local[0]) and torch.equal(remote[1], local[1])
    assert remote[2:] == local[2:]


def test_what_a_request_carries(gpt2, helpers):
    from seethrough.remote.client.collect import build_request
    from seethrough.tracing.capture import capture_source_block

    captured = capture_source_block("x = helpers.last_token(model.transformer.h[0].output).save()\n", "<t>",
                                    what="model.trace(...)")
    request = build_request(kind="trace", model=gpt2, captured=captured,
                            seed={"helpers": helpers, "model": gpt2}, globals_={})
    name = helpers.__name__
    assert request.imports["helpers"] == (name, "")
    assert set(request.packages) == {name, f"{name}.core"}  # the package and what it imports
    assert request.packages[name]["package"] and not request.packages[f"{name}.core"]["package"]


def test_register_errors_and_instances():
    with pytest.raises(seethrough.SeethroughError, match="cannot be imported"):
        registry.register("no_such_module_here")
    with pytest.raises(TypeError, match="module or its name"):
        registry.register(3)
    with pytest.raises(ValueError, match="torch, math and einops"):
        registry.register("torch")
    with pytest.raises(ValueError, match="no Python source"):
        registry.register("itertools")  # built in: no source file


def test_instances_of_registered_classes_do_not_travel(gpt2, helpers):
    probe = helpers.Probe(1.0)
    with pytest.raises(RemoteInputError, match="instances .* do not"):
        with gpt2.trace("Hello", remote="local"):
            out = probe(gpt2.transformer.h[0].output).save()  # noqa: F841


def test_nnsight_register_is_this_one():
    from seethrough import ndif, nnsight as face

    assert face.register is ndif.register is seethrough.register is registry.register


RULES = ModuleRules("pkg.mod", False, frozenset({"pkg", "pkg.mod", "pkg.other"}))


@pytest.mark.parametrize("source, what", [
    ("import os\n", "import os"),
    ("from typing import Any\n", "typing"),
    ("def f():\n    return open('x')\n", "open"),
    ("class A(metaclass=M):\n    pass\n", "metaclass"),
    ("def f():\n    class A:\n        pass\n", "top level"),
    ("@decorate\ndef f():\n    pass\n", "decorators"),
    ("class A:\n    def __del__(self):\n        pass\n", "__del__"),
    ("class A:\n    def f(self):\n        self._secret = 1\n", "_secret"),
    ("class A:\n    def f(self, other):\n        other.weight = 1\n", "weight"),
    ("class A:\n    print('side effect')\n", "class body"),
    ("class A(x.B):\n    pass\n", "base"),
    ("from ..elsewhere import f\n", "elsewhere"),
])
def test_module_source_goes_through_the_sandbox(source, what):
    with pytest.raises(SandboxViolation, match=what):
        validate_module(source, "<registered module pkg.mod>", RULES)


def test_module_rules_allow_what_helpers_need():
    source = textwrap.dedent('''
        from __future__ import annotations
        import torch
        from . import other
        from .other import g
        import pkg.other


        class A(ValueError):
            """doc"""
            size: int = 3

            def __init__(self, n):
                self.n = n

            def __call__(self, x):
                return x * self.n
    ''')
    validate_module(source, "<registered module pkg.mod>", RULES)


@pytest.mark.parametrize("source, error", [
    ("import torch\n\nclass Bad(torch.Tensor):\n    pass\n", "RemoteRequestError"),  # refused at intake
    ("from torch import Tensor\n\nclass Bad(Tensor):\n    pass\n", "SandboxViolation"),  # when it is built
])
def test_classes_derive_only_from_request_classes_or_exceptions(gpt2, tmp_path, monkeypatch, source, error):
    (tmp_path / "st_bad_base.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import st_bad_base

    registry.register(st_bad_base)
    try:
        with pytest.raises(Exception, match="base") as info:
            with gpt2.trace("Hello", remote="local"):
                bad = st_bad_base.Bad  # noqa: F841
        assert type(info.value).__name__ == error
    finally:
        registry.unregister(st_bad_base)
        sys.modules.pop("st_bad_base", None)
