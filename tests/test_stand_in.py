"""The stand-in for nnsight (seethrough.stand_in, seethrough._stand_in, seethrough.nnsight).

Each test leaves the import system as it found it (the ``clean`` fixture);
the tests of what ``import seethrough`` does run in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import typing
import warnings
from pathlib import Path

import pytest
import torch

import seethrough
from seethrough import _stand_in

SRC = str(Path(seethrough.__file__).resolve().parents[1])


def _nnsight_modules() -> dict:
    return {name: module for name, module in sys.modules.items() if name == "nnsight" or name.startswith("nnsight.")}


@pytest.fixture
def clean():
    """No stand-in and no nnsight module before and after the test."""
    _stand_in.undo()
    saved_path = list(sys.path)
    before = _nnsight_modules()
    for name in before:
        del sys.modules[name]
    yield
    _stand_in.undo()
    for name in _nnsight_modules():
        del sys.modules[name]
    sys.modules.update(before)
    sys.path[:] = saved_path


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=240)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_seethrough_changes_nothing():
    out = _run("""
        import sys, seethrough
        print('nnsight' in sys.modules, any(type(f).__name__ == '_Finder' for f in sys.meta_path))
        try:
            import nnsight
            print(nnsight.__file__)
        except ImportError:
            print('not importable')
    """)
    assert out.split("\n")[0] == "False False"
    assert "seethrough" not in out.split("\n")[1]


def test_import_seethrough_stand_in_switches_it_on():
    out = _run("""
        import seethrough.stand_in
        import nnsight
        from nnsight.intervention.envoy import Envoy
        import seethrough
        print(nnsight.LanguageModel is seethrough.LanguageModel, Envoy is seethrough.Envoy)
    """)
    assert out.strip() == "True True"


def test_nnsight_names_are_seethrough_objects(clean):
    handle = seethrough.stand_in_for_nnsight()
    assert handle.active and _stand_in.is_active()
    import nnsight
    from nnsight import CONFIG, Envoy, LanguageModel, NNsight, save
    from nnsight.intervention.envoy import Envoy as DeepEnvoy
    from nnsight.intervention.interleaver import OutOfOrderError
    from nnsight.intervention.tracing.globals import Object
    from nnsight.modeling.language import LanguageModel as DeepLanguageModel
    from nnsight.ndif import register
    from nnsight.tracing.hint import Object as HintObject

    assert LanguageModel is DeepLanguageModel is seethrough.LanguageModel
    assert NNsight is seethrough.Model and Envoy is DeepEnvoy is seethrough.Envoy
    assert save is seethrough.save and CONFIG is seethrough.CONFIG
    assert register is nnsight.register is seethrough.register
    assert OutOfOrderError is seethrough.OutOfOrderError
    assert Object is HintObject and issubclass(Object, torch.Tensor)
    # The module objects are seethrough's own, with their own names and specs.
    import seethrough.intervention.envoy as envoy_module

    assert sys.modules["nnsight.intervention.envoy"] is envoy_module
    assert envoy_module.__spec__.name == "seethrough.intervention.envoy"
    assert nnsight.intervention is sys.modules["seethrough.intervention"]


def test_version_reads_as_nnsight_081(clean):
    from packaging.version import Version

    seethrough.stand_in_for_nnsight()
    import nnsight

    version = Version(nnsight.__version__)
    assert version.release == (0, 8, 1) and version.local.startswith("seethrough")
    assert Version("0.5") < version < Version("0.9")


def test_object_is_a_type_hint_of_traced_values(clean):
    seethrough.stand_in_for_nnsight()
    from nnsight.intervention.tracing.globals import Object

    trace_tensor = typing.Union[torch.Tensor, Object]  # nnterp's TraceTensor
    assert typing.get_args(trace_tensor) == (torch.Tensor, Object)
    assert not isinstance(torch.zeros(2), Object)
    net = torch.nn.Linear(3, 2)
    model = seethrough.NNsight(net)
    x = torch.randn(1, 3)
    with torch.no_grad():
        with model.trace(x):
            out = model.output.as_subclass(Object).save()  # its `save` is seethrough's
    assert isinstance(out, Object) and torch.equal(out.as_subclass(torch.Tensor), net(x).detach())


def test_missing_submodule_and_name_say_so(clean):
    seethrough.stand_in_for_nnsight()
    import nnsight

    with pytest.raises(ModuleNotFoundError, match=r"nnsight\.schema.*seethrough\.stand_in") as info:
        import nnsight.schema.config  # noqa: F401
    assert info.value.name == "nnsight.schema"
    with pytest.raises(ModuleNotFoundError, match=r"nnsight\.intervention\.serialization"):
        import nnsight.intervention.serialization  # noqa: F401
    with pytest.raises(AttributeError, match=r"ndif_status.*stand"):
        nnsight.ndif_status


def test_undo_and_context_manager(clean):
    with seethrough.stand_in_for_nnsight():
        import nnsight

        assert nnsight.__name__ == "seethrough.nnsight"
    assert not _stand_in.is_active()
    assert "nnsight" not in sys.modules
    assert not any(isinstance(f, _stand_in._Finder) for f in sys.meta_path)
    _stand_in.activate()
    _stand_in.activate()  # idempotent: one finder
    assert sum(isinstance(f, _stand_in._Finder) for f in sys.meta_path) == 1
    _stand_in.undo()
    assert not any(isinstance(f, _stand_in._Finder) for f in sys.meta_path)


def _fake_nnsight(root: Path) -> None:
    package = root / "nnsight"
    (package / "intervention").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0.0.fake'\nFAKE = True\n")
    (package / "intervention" / "__init__.py").write_text("")
    (package / "intervention" / "envoy.py").write_text("class Envoy:\n    fake = True\n")


def test_wins_over_an_installed_nnsight(clean, tmp_path):
    _fake_nnsight(tmp_path)
    sys.path.insert(0, str(tmp_path))
    seethrough.stand_in_for_nnsight()
    import nnsight
    from nnsight.intervention.envoy import Envoy

    assert not hasattr(nnsight, "FAKE") and Envoy is seethrough.Envoy
    _stand_in.undo()
    import nnsight as real
    from nnsight.intervention.envoy import Envoy as RealEnvoy

    assert real.FAKE and RealEnvoy.fake


def test_replaces_an_nnsight_imported_before_and_puts_it_back(clean, tmp_path):
    _fake_nnsight(tmp_path)
    sys.path.insert(0, str(tmp_path))
    import nnsight as real
    import nnsight.intervention.envoy as real_envoy

    with pytest.warns(UserWarning, match="already imported"):
        seethrough.stand_in_for_nnsight()
    import nnsight

    from nnsight.intervention.envoy import Envoy

    assert nnsight is not real and nnsight.LanguageModel is seethrough.LanguageModel
    assert sys.modules["nnsight.intervention.envoy"] is not real_envoy and Envoy is seethrough.Envoy
    _stand_in.undo()
    assert sys.modules["nnsight"] is real and sys.modules["nnsight.intervention.envoy"] is real_envoy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing real imported now: no warning
        for name in list(_nnsight_modules()):
            del sys.modules[name]
        seethrough.stand_in_for_nnsight()


def test_nnsight_face_imports_without_the_switch(clean):
    import seethrough.nnsight as face

    assert face.LanguageModel is seethrough.LanguageModel and not _stand_in.is_active()
    assert "nnsight" not in sys.modules
