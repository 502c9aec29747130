"""Every misuse gets a clear error: what was wrong, the user's line, the fix.

Each message is checked for the line of this file where the mistake was
made, and for a hint of what to do."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import seethrough
from fixtures.models import assert_pristine, assert_same_state, state_snapshot
from seethrough.errors import (
    ModulePathError,
    NotInTraceError,
    OutOfOrderError,
    SeethroughError,
    ShapeMismatchError,
    WeightsModifiedError,
)


def _line_of(marker: str) -> int:
    source, _ = inspect.getsourcelines(inspect.getmodule(_line_of))
    for index, line in enumerate(source):
        if marker in line and "_line_of" not in line and "_mentions_line" not in line:
            return index + 1
    raise AssertionError(marker)


def _mentions_line(message: str, marker: str) -> bool:
    return re.search(rf"test_errors\.py:{_line_of(marker)}\b", message) is not None


def test_unknown_module_path_suggests_close_names(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(ModulePathError) as info:
        model.fc3  # MARK-unknown
    message = str(info.value)
    assert isinstance(info.value, AttributeError)
    assert "`fc3`" in message and "`fc1`" in message and "Did you mean" in message
    assert _mentions_line(message, "MARK-unknown")
    assert "print(model)" in message


def test_unknown_path_inside_trace_leaves_model_clean(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(ModulePathError):
        with model.trace(torch.randn(1, 4)):
            model.fc1.output.save()
            model.fcc2.output  # MARK-unknown-in-trace
    assert_pristine(mlp)


def test_index_out_of_range(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    with pytest.raises(ModulePathError, match=r"has 2 submodules \(indices 0 to 1\)") as info:
        model.transformer.h[5]  # MARK-index
    assert _mentions_line(str(info.value), "MARK-index")


def test_access_outside_trace(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(NotInTraceError) as info:
        model.fc1.output  # MARK-outside
    message = str(info.value)
    assert _mentions_line(message, "MARK-outside")
    assert "with model.trace(input)" in message


def test_out_of_order_names_line_and_fix(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(OutOfOrderError) as info:
        with model.trace(torch.randn(1, 4)):
            model.fc2.output.save()
            model.fc1.output.save()  # MARK-order
    message = str(info.value)
    assert _mentions_line(message, "MARK-order")
    assert "in the order the model runs them" in message and "tracer.cache" in message
    assert_pristine(mlp)


def test_out_of_order_error_points_traceback_at_user_line(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(OutOfOrderError) as info:
        with model.trace(torch.randn(1, 4)):
            model.output.save()
            model.fc1.input  # MARK-tb
    last_user = [tb for tb in _walk(info.value.__traceback__) if tb.tb_frame.f_code.co_filename == __file__][-1]
    assert last_user.tb_lineno == _line_of("MARK-tb")


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_shape_mismatch_on_assignment(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(ShapeMismatchError) as info:
        with model.trace(torch.randn(2, 4)):
            model.fc1.output = torch.zeros(5, 3)  # MARK-shape
    message = str(info.value)
    assert "(5, 3)" in message and "(2, 8)" in message
    assert _mentions_line(message, "MARK-shape")
    assert isinstance(info.value, ValueError)
    assert_pristine(mlp)


def test_tuple_output_structure_mismatch(tiny_gpt2):
    model = seethrough.Model(tiny_gpt2)
    with pytest.raises(ShapeMismatchError, match="same structure"):
        with model.trace(torch.tensor([[1, 2]])):
            model.transformer.h[0].attn.output = torch.zeros(1, 2, 32)


def test_setting_other_envoy_attributes(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(AttributeError, match="cannot set `weight`") as info:
        model.fc1.weight = torch.nn.Parameter(torch.zeros(8, 4))  # MARK-set
    assert _mentions_line(str(info.value), "MARK-set")


def test_weights_modified_in_place_are_reported(mlp):
    model = seethrough.Model(mlp)
    with pytest.raises(WeightsModifiedError, match=r"model\.fc1\.weight"):
        with model.trace(torch.randn(1, 4)):
            with torch.no_grad():
                model.fc1.weight[0, 0] = 5.0
    mlp.fc1.weight.data[0, 0] = 0.0


def test_stop_outside_trace(mlp):
    model = seethrough.Model(mlp)
    with model.trace(torch.randn(1, 4)) as tracer:
        pass
    with pytest.raises(SeethroughError, match="outside its trace body"):
        tracer.stop()


def test_save_method_exists_only_inside_traces():
    with pytest.raises(AttributeError):
        torch.ones(1).save()


def test_failing_body_leaves_model_intact(mlp):
    model = seethrough.Model(mlp)
    snapshot = state_snapshot(mlp)
    cases = [
        # the user's own mistake keeps its type and message, unwrapped
        (lambda: model.fc1.output.foo(), AttributeError, ["'Tensor' object has no attribute 'foo'"], None),
        (lambda: model.fc9.output, ModulePathError, ["`fc9`", "Did you mean", "`fc1`"], "MARK-fc9"),  # MARK-fc9
        (
            lambda: setattr(model.fc1, "output", "text"),  # MARK-text
            ShapeMismatchError,
            ["cannot assign a str to model.fc1.output", "(1, 8)", "assign a tensor"],
            "MARK-text",
        ),
    ]
    for bad, error_type, parts, marker in cases:
        with pytest.raises(error_type) as info:
            with model.trace(torch.randn(1, 4)):
                model.fc1.output[:] = 0
                bad()
        assert type(info.value) is error_type, type(info.value)
        message = str(info.value)
        assert all(part in message for part in parts), message
        if marker is not None:
            assert _mentions_line(message, marker), message
        assert_pristine(mlp)
        assert_same_state(mlp, snapshot)


def test_every_library_error_is_a_seethrough_error():
    import seethrough.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10
    assert all(issubclass(c, SeethroughError) for c in classes)
