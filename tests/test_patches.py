"""Class patches that exist only while traces run (``seethrough.tracing.patches``).

``ClassPatch`` is the one reference-counted helper behind ``Tensor.save``,
``Tensor.backward`` and ``Tensor.grad``: these tests check it on a class of
their own (absent, own and inherited attributes, many threads), then that
the Tensor is exactly as PyTorch defines it after nested, failing and
backward-using traces.  The reference is the Tensor class's own dictionary
as captured when this file was imported, before any trace ran.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import seethrough
from seethrough.tracing.backward import BACKWARD_PATCH
from seethrough.tracing.patches import SAVE_PATCH, ClassPatch

_TENSOR_BEFORE = {name: torch.Tensor.__dict__.get(name) for name in ("save", "backward", "grad")}


def _tensor_is_as_pytorch_made_it() -> None:
    for name, before in _TENSOR_BEFORE.items():
        assert torch.Tensor.__dict__.get(name) is before, f"Tensor.{name} differs from PyTorch's"
    assert SAVE_PATCH.users == 0 and BACKWARD_PATCH.users == 0


class _Base:
    def inherited(self) -> str:
        return "base"


class _Owner(_Base):
    def own(self) -> str:
        return "own"


def test_an_absent_attribute_is_removed_again_after_the_last_user():
    patch = ClassPatch(_Owner, "added", lambda self: "patched")
    patch.enter()
    patch.enter()
    assert _Owner().added() == "patched"
    patch.exit()
    assert _Owner().added() == "patched"  # one user left
    patch.exit()
    assert "added" not in _Owner.__dict__ and not hasattr(_Owner(), "added")


def test_an_own_attribute_comes_back_as_the_same_object():
    before = _Owner.__dict__["own"]
    patch = ClassPatch(_Owner, "own", lambda self: "patched")
    patch.enter()
    assert _Owner().own() == "patched"
    patch.exit()
    assert _Owner.__dict__["own"] is before and _Owner().own() == "own"


def test_an_inherited_attribute_shows_again_without_a_copy_on_the_class():
    patch = ClassPatch(_Owner, "inherited", lambda self: "patched")
    patch.enter()
    assert _Owner().inherited() == "patched" and _Base().inherited() == "base"
    patch.exit()
    assert "inherited" not in _Owner.__dict__ and _Owner().inherited() == "base"


def test_many_threads_entering_and_leaving_leave_the_class_as_it_was():
    patch = ClassPatch(_Owner, "busy", 1)
    start = threading.Barrier(8)
    seen: list[bool] = []

    def work() -> None:
        start.wait()
        for _ in range(500):
            patch.enter()
            seen.append(getattr(_Owner, "busy", None) == 1)  # present while this thread holds it
            patch.exit()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(seen) and len(seen) == 8 * 500
    assert patch.users == 0 and "busy" not in _Owner.__dict__


@pytest.fixture
def two_models() -> tuple[seethrough.Model, seethrough.Model]:
    torch.manual_seed(0)
    outer = seethrough.Model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    inner = seethrough.Model(nn.Sequential(nn.Linear(4, 4)))
    return outer, inner


def test_nested_traces_restore_the_tensor_class(two_models):
    outer, inner = two_models
    x = torch.randn(2, 4)
    with outer.trace(x):
        h = outer[0].output.save()
        with inner.trace(h):
            g = inner[0].output.save()
        inner_done = ("save" in torch.Tensor.__dict__, SAVE_PATCH.users)
        loss = outer.output.sum()
        with loss.backward():
            grad = h.grad.save()
    assert inner_done == (True, 1)  # the outer trace still needs `save` after the inner one ended
    ref = x @ outer._model[0].weight.T + outer._model[0].bias
    assert torch.allclose(h, ref)
    assert torch.equal(grad, (ref > 0).float())  # d sum(relu(h)) / dh
    _tensor_is_as_pytorch_made_it()
    del g


def test_failing_traces_restore_the_tensor_class(two_models):
    outer, inner = two_models
    x = torch.randn(2, 4)
    with pytest.raises(ZeroDivisionError):
        with outer.trace(x):
            h = outer[0].output.save()
            with inner.trace(h):
                inner[0].output.save()
                1 / 0
    _tensor_is_as_pytorch_made_it()
    with pytest.raises(RuntimeError, match="boom"):
        with outer.trace(x):
            h = outer[0].output
            loss = outer.output.sum()
            with loss.backward():
                h.grad.save()
                raise RuntimeError("boom")
    _tensor_is_as_pytorch_made_it()
    # And the next trace works as before.
    with outer.trace(x):
        out = outer.output.save()
    assert torch.equal(out, outer._model(x))
    _tensor_is_as_pytorch_made_it()
