"""How the remote client reaches what higher layers provide, without importing them.

* Remote errors come back as the class the server raised, found among the
  subclasses of ``SeethroughError`` (no import of the layer that defines it):
  a models-layer class (``LanguageModelError``) and the server-side
  sandbox's (``SandboxViolation``), raised on a real server and rebuilt here.
* ``LanguageModel.from_server`` is the one way a wrapper of a served model is
  built; ``LanguageModel(name, host=...)`` and ``seethrough.models.remote_model``
  give the same wrapper.  Its remote traces are checked against a plain
  HuggingFace forward read by a raw hook on the same weights.
* ``remote="local"`` runs through the one server entry point the protocol
  declares (``LOCAL_SERVER``), loaded by name only when used: importing
  seethrough loads no server module, and a missing entry point is a clear error.

The server is the one ``tests/test_server.py`` starts (shared fixtures).
"""

from __future__ import annotations

import pytest
import torch

import seethrough
from seethrough import LanguageModel, LanguageModelError, SeethroughError
from seethrough.config import cache_dir
from seethrough.models import offline
from seethrough.remote.client import backend
from seethrough.remote.client import connection as client
from seethrough.remote.client.connection import ModelNotServedError, RemoteError, rebuild_error
from seethrough.remote.protocol import error_answer
from seethrough.remote.refusal import SandboxViolation
from test_server import ALICE, server  # noqa: F401 - the shared server fixtures
from fixtures.threads import one_thread  # noqa: F401 - autouse: the server's one torch thread

pytestmark = [pytest.mark.timeout(300)]



def plain_block_output(folder, text: str, block: int = 0) -> torch.Tensor:
    """Reference: a GPT-2 block's output on a plain HuggingFace forward, read by a raw hook."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    seen = []
    handle = hf.transformer.h[block].register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hf(**AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt"))
    finally:
        handle.remove()
    return seen[0]


# -- errors rebuilt by class, found without importing their layer ------------------------------------


class ForeignError(SeethroughError):
    """A user's own subclass: never what a remote error of the same name becomes."""


@pytest.mark.parametrize("cls", [LanguageModelError, SandboxViolation, seethrough.WeightsModifiedError,
                                 client.ModelNotServedError])
def test_a_seethrough_error_is_rebuilt_as_its_own_class(cls):
    answer = error_answer(cls.__name__, "it went wrong", module=cls.__module__, filename="/work/body.py", line=7,
                          code="x = 1")
    error = rebuild_error(answer)
    assert type(error) is cls
    assert "it went wrong" in str(error) and "/work/body.py:7" in str(error) and "x = 1" in str(error)


def test_a_class_that_moved_module_is_found_by_its_unique_name():
    # The server's version may define the class in another module: the name still finds it.
    assert type(rebuild_error(error_answer("LanguageModelError", "m", module="seethrough.models.old"))) \
        is LanguageModelError


def test_unknown_and_foreign_names_become_remote_errors_of_that_name():
    for name, module in (("NoSuchError", "seethrough.remote.server.execute"), ("ForeignError", "seethrough.errors"),
                         ("ForeignError", ForeignError.__module__), ("LanguageModelError", "somelib.errors")):
        error = rebuild_error(error_answer(name, "m", module=module))
        assert type(error).__name__ == name and isinstance(error, RemoteError), (name, module)
        assert not isinstance(error, (ForeignError, LanguageModelError))
    # A stand-in made once is not what a later error of that name is matched to.
    first = type(rebuild_error(error_answer("NoSuchError", "m", module="seethrough.x")))
    second = type(rebuild_error(error_answer("NoSuchError", "m", module="seethrough.x")))
    assert first is not second and issubclass(second, RemoteError)
    assert type(rebuild_error(error_answer("IndexError", "m"))) is IndexError


def test_errors_raised_on_a_server_come_back_as_their_class(server, gpt2_dir):
    model = LanguageModel(str(gpt2_dir), remote_name="gpt2")
    on = {"remote": True, "host": server.url, "api_key": ALICE}
    with pytest.raises(LanguageModelError, match="only in `model.generate") as info:  # models layer, on the server
        with model.trace("Hello", **on):
            tokens = model.generator.output.save()
    assert "remote run" in str(info.value) and __file__ in str(info.value)
    with pytest.raises(SandboxViolation, match="torch.hub"):  # the server's sandbox, at run time
        with model.trace("Hello", **on):
            hub = torch.hub


# -- one way to build a wrapper of a served model ------------------------------------------------------


def test_from_server_builds_the_served_model_and_traces_it_remotely(server, gpt2_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path))
    model = LanguageModel.from_server("gpt2", host=server.url, api_key=ALICE)
    assert type(model) is LanguageModel and not model.dispatched
    assert model._remote_name == "gpt2" and model._remote_host == server.url
    assert any(tmp_path.joinpath("remote-models").iterdir())  # the description, in the cache
    with pytest.raises(LanguageModelError, match="only on the seethrough server"):
        model.dispatch()
    with model.trace("Served from afar", api_key=ALICE, remote=True):  # `host=` from from_server
        hidden = model.transformer.h[1].output.save()
    torch.testing.assert_close(hidden, plain_block_output(gpt2_dir, "Served from afar", 1), atol=1e-5, rtol=1e-5)
    # Every older way gives the same wrapper.
    same = [LanguageModel("gpt2", host=server.url, api_key=ALICE),
            seethrough.models.remote_model("gpt2", host=server.url, api_key=ALICE)]
    for other in same:
        assert type(other) is LanguageModel and not other.dispatched
        assert [p for p, _ in other._model.named_modules()] == [p for p, _ in model._model.named_modules()]
        assert other._remote_name == "gpt2" and other.config.to_dict() == model.config.to_dict()


def test_a_name_the_server_does_not_serve_fails_at_once_naming_what_it_serves(server):
    for build in (lambda: LanguageModel.from_server("nope", host=server.url, api_key=ALICE),
                  lambda: LanguageModel("nope", host=server.url, api_key=ALICE)):
        with pytest.raises(ModelNotServedError, match="serves: 'gpt2', 'smollm2'"):
            build()


def test_from_server_takes_the_constructors_options(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path))
    model = LanguageModel.from_server("gpt2", host=server.url, api_key=ALICE, rename={"transformer.h": "blocks"})
    assert model.blocks[0].path == "transformer.h.0"
    served = client.served_model("gpt2", server.url, ALICE)
    with pytest.raises(LanguageModelError, match="from_server"):
        LanguageModel(served, host=server.url)


def test_the_cache_folder_is_a_configuration_fact(monkeypatch, tmp_path):
    monkeypatch.setenv("SEETHROUGH_CACHE", str(tmp_path / "c"))
    assert offline.cache_dir is cache_dir and cache_dir() == tmp_path / "c"


# -- remote="local" through the declared server entry point ----------------------------------------------


def test_remote_local_runs_through_the_declared_server_entry_point(tiny_gpt2, gpt2_tokenizer, monkeypatch):
    from seethrough.remote.protocol import LOCAL_SERVER
    from seethrough.remote.server.local import run_local

    assert LOCAL_SERVER == "seethrough.remote.server.local:run_local" and backend.local_server() is run_local
    model = LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer)
    with model.trace("Hello", remote="local"):
        hidden = model.transformer.h[0].output.save()
    with model.trace("Hello"):
        expected = model.transformer.h[0].output.save()
    torch.testing.assert_close(hidden, expected)
    monkeypatch.setattr(backend, "LOCAL_SERVER", "seethrough.remote.server.no_such_module:run_local")
    with pytest.raises(RemoteError, match="no_such_module.*cannot be loaded"):
        with model.trace("Hello", remote="local"):
            model.transformer.h[0].output.save()


def test_importing_seethrough_loads_no_server_module():
    import subprocess
    import sys

    code = ("import sys, seethrough, seethrough.remote.client.backend, seethrough.harvest\n"
            "print(sorted(m for m in sys.modules if m.startswith('seethrough.remote.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
