"""model.harvest(..., remote=True): micro-batches as ordinary requests to a real
loopback server; the store must equal the local one bit for bit."""

from __future__ import annotations

import hashlib

import pytest
import torch

import seethrough
from fixtures.threads import one_thread  # noqa: F401 - autouse: as the server's workers, bitwise-equal values
from seethrough.errors import ShapeMismatchError, UsageValueError
from test_harvest import TEXTS
from test_remote import on, served  # noqa: F401 - shared helpers
from test_server import server  # noqa: F401 - the shared server fixture

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def smollm2(smollm2_small_dir):
    return served(smollm2_small_dir, "smollm2")


def tensors(folder):
    store = seethrough.load(folder)
    return {name: store[name].tensor() for name in store.keys() + ["_prompt", "_position", "_token"]}


def test_remote_store_equals_local_store(smollm2, server, tmp_path):
    steer = torch.randn(576, generator=torch.Generator().manual_seed(1)) * 0.1
    for where, options in (("local", {}), ("remote", on(server))):
        with smollm2.harvest(TEXTS, to=tmp_path / where, batch_size=3, window=5, dtype="bfloat16",
                             in_flight=3, progress=False, **options) as run:
            run.keep("resid1", smollm2.model.layers[1].output)
            smollm2.model.layers[2].output[:] += steer
            run.keep("last", smollm2.model.norm.output[:, -1], per="prompt")
    local, remote = tensors(tmp_path / "local"), tensors(tmp_path / "remote")
    assert local.keys() == remote.keys()
    for name in local:
        assert torch.equal(local[name], remote[name]), name
    assert seethrough.load(tmp_path / "remote").per("last") == "prompt"


def _interrupting(items, after):
    for number, item in enumerate(items):
        if number == after:
            raise KeyboardInterrupt
        yield item


def test_remote_harvest_resumes_bit_for_bit(smollm2, server, tmp_path):
    options = dict(batch_size="auto", window=4, progress=False, **on(server))
    with smollm2.harvest(TEXTS, to=tmp_path / "clean", **options) as run:
        run.keep("resid0", smollm2.model.layers[0].output)
    with pytest.raises(KeyboardInterrupt):
        with smollm2.harvest(_interrupting(TEXTS, 9), to=tmp_path / "resumed", **options) as run:
            run.keep("resid0", smollm2.model.layers[0].output)
    with smollm2.harvest(TEXTS, to=tmp_path / "resumed", **options) as run:
        run.keep("resid0", smollm2.model.layers[0].output)
    assert run.summary["shards_resumed"] == 2
    digest = lambda folder: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    assert digest(tmp_path / "resumed") == digest(tmp_path / "clean")


def test_remote_errors_are_clear(smollm2, server, tmp_path):
    with pytest.raises(ShapeMismatchError, match="first dimension must be the batch"):
        with smollm2.harvest(TEXTS, to=tmp_path / "a", batch_size=4, progress=False, **on(server)) as run:
            run.keep("row0", smollm2.model.layers[0].output[0])
    with pytest.raises(seethrough.SeethroughError, match="nonexistent"):
        with smollm2.harvest(TEXTS, to=tmp_path / "b", batch_size=4, progress=False, **on(server)) as run:
            run.keep("x", smollm2.model.nonexistent.output)
    with pytest.raises(UsageValueError, match=r"only in `run.keep\(...\)` statements and `run.stop\(\)`"):
        with smollm2.harvest(TEXTS, to=tmp_path / "c", batch_size=4, progress=False, **on(server)) as run:
            run.keep("x", smollm2.model.layers[0].output)
            print(run.prompt_ids)


def test_remote_body_may_stop_early(smollm2, server, tmp_path):
    for where, options in (("local", {}), ("remote", on(server))):
        with smollm2.harvest(TEXTS, to=tmp_path / where, batch_size=4, progress=False, **options) as run:
            run.keep("resid0", smollm2.model.layers[0].output)
            run.stop()
    assert torch.equal(seethrough.load(tmp_path / "local")["resid0"].tensor(), seethrough.load(tmp_path / "remote")["resid0"].tensor())
