"""Tracebacks of errors raised in a trace (``seethrough._frames``) and
``CONFIG.APP.DEBUG``: off (the default), they show only the user's frames
(and those of torch or the model the user's code reached); on (in code, or
``SEETHROUGH_DEBUG=1`` / nnsight's ``NNSIGHT_DEBUG=1``), seethrough's own
frames too, as Python gives them.

Each test inspects the traceback of a real error: the user's own shape error
in an edit (the same error torch raises for the same assignment on a plain
tensor), an out-of-order read, an error inside a session, and a module's
forward refusing its input."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import seethrough
from seethrough import CONFIG
from seethrough._frames import is_library_file

HERE = os.path.abspath(__file__)
PACKAGE = os.path.dirname(os.path.abspath(seethrough.__file__))


@pytest.fixture
def debug(monkeypatch):
    """Set CONFIG.APP.DEBUG for one test (no environment variable set)."""
    for name in ("SEETHROUGH_DEBUG", "NNSIGHT_DEBUG"):
        monkeypatch.delenv(name, raising=False)

    def set_to(value):
        CONFIG.APP.DEBUG = value

    yield set_to
    CONFIG.APP.DEBUG = None


def _frames(error: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(error.__traceback__)


def _library(error: BaseException) -> list[str]:
    return [f"{Path(f.filename).name}:{f.name}" for f in _frames(error) if is_library_file(os.path.abspath(f.filename))]


def _user_lines(error: BaseException) -> list[str]:
    return [f.line for f in _frames(error) if os.path.abspath(f.filename) == HERE]


def _set_row_to(hidden, value):  # a helper of the user's, called from the body
    hidden[:] = value


def _shape_error(mlp) -> RuntimeError:
    model = seethrough.Model(mlp)
    with pytest.raises(RuntimeError) as info:
        with model.trace(torch.randn(1, 4)):
            _set_row_to(model.fc1.output, torch.zeros(3, 3))
    return info.value


def _out_of_order(mlp, batched: bool = True) -> seethrough.OutOfOrderError:
    """Two saves in the wrong order: asked for as one batch (two plain saves
    in a row, see tracing/prefetch.py), or one by one (a statement between)."""
    model = seethrough.Model(mlp)
    with pytest.raises(seethrough.OutOfOrderError) as info:
        if batched:
            with model.trace(torch.randn(1, 4)):
                late = model.fc2.output.save()
                early = model.fc1.output.save()
        else:
            with model.trace(torch.randn(1, 4)):
                late = model.fc2.output.save()
                between = 1
                early = model.fc1.output.save()
    return info.value


def test_debug_is_off_by_default_and_follows_code_then_environment(monkeypatch):
    for name in ("SEETHROUGH_DEBUG", "NNSIGHT_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    CONFIG.APP.DEBUG = None
    try:
        assert CONFIG.APP.DEBUG is False
        for name in ("SEETHROUGH_DEBUG", "NNSIGHT_DEBUG"):
            monkeypatch.setenv(name, "1")
            assert CONFIG.APP.DEBUG is True  # read when asked: setting it mid-session works
            monkeypatch.setenv(name, "0")
            assert CONFIG.APP.DEBUG is False  # "0", "false", "no", "off" and "" mean off
            monkeypatch.delenv(name)
        monkeypatch.setenv("NNSIGHT_DEBUG", "true")
        CONFIG.APP.DEBUG = False  # a value set in code wins over the environment
        assert CONFIG.APP.DEBUG is False
        CONFIG.APP.DEBUG = None  # back to the environment
        assert CONFIG.APP.DEBUG is True
    finally:
        CONFIG.APP.DEBUG = None


def test_off_a_users_shape_error_shows_only_the_users_frames(mlp, debug):
    debug(False)
    error = _shape_error(mlp)
    reference = torch.zeros(1, 8)  # the same assignment on a plain tensor of the layer's shape
    with pytest.raises(RuntimeError) as plain:
        reference[:] = torch.zeros(3, 3)
    assert str(error) == str(plain.value)  # the user's error keeps its type and message
    assert _library(error) == []
    lines = _user_lines(error)
    assert lines[-1] == "hidden[:] = value"  # the innermost frame is the user's helper
    assert "_set_row_to(model.fc1.output, torch.zeros(3, 3))" in lines
    assert not any("greenlet" in f.filename for f in _frames(error))


def test_on_a_users_shape_error_shows_the_librarys_frames_too(mlp, debug):
    debug(True)
    error = _shape_error(mlp)
    library = _library(error)
    assert any(name.startswith("tracer.py") for name in library)  # the trace's exit
    assert any(name.startswith("interleaver.py") for name in library)  # handing values to the body
    lines = _user_lines(error)
    assert lines[-1] == "hidden[:] = value" and "_set_row_to(model.fc1.output, torch.zeros(3, 3))" in lines


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_off_an_out_of_order_read_ends_at_the_users_line(mlp, debug, batched):
    debug(False)
    error = _out_of_order(mlp, batched)
    assert _library(error) == []
    assert _user_lines(error)[-1] == "early = model.fc1.output.save()"
    assert "early = model.fc1.output.save()" in str(error)  # and the message names it


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_on_an_out_of_order_read_shows_where_the_library_raised_it(mlp, debug, batched):
    debug(True)
    error = _out_of_order(mlp, batched)
    library = _library(error)
    # the `.output` accessor, or the batch that asked for both values
    reader = "prefetch.py:collect" if batched else "envoy.py:_read"
    assert any(name.startswith(reader) for name in library), library
    # raised where the body waited for the value: the interleaver's request, or the batch's one wait
    assert library[-1].startswith("prefetch.py:collect" if batched else "interleaver.py"), library
    assert "early = model.fc1.output.save()" in _user_lines(error)


def test_off_errors_from_sessions_skips_and_the_models_forward_hide_only_seethrough(mlp, debug):
    debug(False)
    model = seethrough.Model(mlp)
    x = torch.randn(1, 4)
    with pytest.raises(seethrough.OutOfOrderError) as in_session:
        with model.session():
            with model.trace(x):
                late = model.fc2.output.save()
                early = model.fc1.output.save()
    assert _library(in_session.value) == [] and _user_lines(in_session.value)[-1] == "early = model.fc1.output.save()"
    with pytest.raises(seethrough.OutOfOrderError) as skipped:
        with model.trace(x):
            hidden = model.fc1.output.save()
            model.fc1.skip(hidden)  # too late: fc1 has run
    assert _library(skipped.value) == [] and _user_lines(skipped.value)[-1] == "with model.trace(x):"
    with pytest.raises(RuntimeError) as forward:
        with model.trace(torch.randn(1, 5)):  # the model's own error: fc1 takes 4 features
            out = model.output.save()
    frames = _frames(forward.value)
    assert _library(forward.value) == []
    assert frames[-1].filename.endswith(os.path.join("torch", "nn", "modules", "linear.py"))  # torch's frames stay


def test_nnsight_debug_in_the_environment_of_a_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        "import torch, seethrough\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "model = seethrough.NNsight(net)\n"
        "with model.trace(torch.randn(1, 4)):\n"
        "    late = model[2].output.save()\n"
        "    early = model[0].output.save()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(PACKAGE).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("SEETHROUGH_DEBUG", None)
    shown = {}
    for setting in ("", "1"):
        env["NNSIGHT_DEBUG"] = setting
        result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and "OutOfOrderError" in result.stderr, result.stderr
        shown[setting] = result.stderr
    assert PACKAGE not in shown[""] and 'user_script.py", line 6' in shown[""]
    # two saves in a row are asked for as one batch (tracing/prefetch.py)
    assert os.path.join(PACKAGE, "tracing", "prefetch.py") in shown["1"] and 'user_script.py", line 6' in shown["1"]
