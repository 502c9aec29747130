"""Traces from several threads, and what a trace keeps alive afterwards."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine
from seethrough.errors import NotSavedError


def test_two_threads_trace_the_same_model(mlp):
    from seethrough.tracing import capture

    capture._cache.clear()  # both threads capture the same block at the same time
    model = seethrough.Model(mlp)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(seed: int) -> None:
        try:
            generator = torch.Generator().manual_seed(seed)
            barrier.wait()
            for _ in range(40):
                x = torch.randn(3, 4, generator=generator)
                with torch.no_grad():
                    with model.trace(x):
                        model.act.output[:, seed] = 0
                        hidden = model.act.output.save()
                        out = model.output.save()
                    expected_hidden = torch.relu(mlp.fc1(x))
                    expected_hidden[:, seed] = 0
                    assert torch.allclose(hidden, expected_hidden, atol=1e-6)
                    assert torch.allclose(out, mlp.fc2(expected_hidden), atol=1e-6)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert_pristine(mlp)


def _activation_probe(module: torch.nn.Module) -> list[weakref.ref]:
    refs: list[weakref.ref] = []
    module.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    return refs


def test_unsaved_activations_are_freed_without_gc(mlp):
    model = seethrough.Model(mlp)
    refs = _activation_probe(mlp.fc1)
    gc.collect()
    gc.disable()
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = mlp.fc2(torch.relu(mlp.fc1(x)))  # before the trace: refs[-1] is the trace's
    try:
        with model.trace(x) as tracer:
            hidden = model.fc1.output * 2
            kept = model.output.save()
        # freed although `tracer`, `hidden` and `kept` are all still bound here
        assert len(refs) == 2 and refs[-1]() is None, "an unsaved activation outlived the trace"
        assert isinstance(tracer, seethrough.Tracer)
        assert torch.allclose(kept, expected)  # the saved value survives, with the right numbers
        with pytest.raises(NotSavedError, match=r"`hidden` was computed inside the trace"):
            hidden + 1  # the unsaved value is a placeholder, not the tensor
    finally:
        gc.enable()


def test_saved_activation_is_freed_when_user_drops_it(mlp):
    model = seethrough.Model(mlp)
    refs = _activation_probe(mlp.fc1)
    gc.collect()
    gc.disable()
    try:
        with model.trace(torch.randn(2, 4)) as tracer:
            hidden = model.fc1.output.save()
        assert refs[-1]() is not None
        del hidden, tracer
        assert refs[-1]() is None, "the library still holds a saved value"
    finally:
        gc.enable()


def test_failed_trace_frees_activations_without_gc(mlp):
    model = seethrough.Model(mlp)
    refs = _activation_probe(mlp.fc1)
    gc.collect()
    gc.disable()
    try:
        try:
            with model.trace(torch.randn(2, 4)):
                model.fc1.output.save()
                raise RuntimeError("boom")
        except RuntimeError as error:
            del error
        assert refs[-1]() is None
    finally:
        gc.enable()


def test_no_growth_over_many_traces(mlp):
    model = seethrough.Model(mlp)
    x = torch.randn(2, 4)

    def run(n: int) -> None:
        for _ in range(n):
            with model.trace(x):
                model.fc1.output.save()

    run(50)
    gc.collect()
    before = len(gc.get_objects())
    run(300)
    gc.collect()
    after = len(gc.get_objects())
    assert after - before < 50, f"{after - before} objects more after 300 traces"
