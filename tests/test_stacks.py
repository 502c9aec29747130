"""tracing/stacks.py: where trace greenlets run, so that no trace crashes the process.

The first two tests are the pytest file that once killed the interpreter
(SIGSEGV in the second test: torch's C++ IndexError walked the C stack of a
worker greenlet reused from the first test, entered at another depth).  The
stress tests run many traces, with and without errors, in a shuffled order at
varied stack depths over four wrapped models (tests/stress_traces.py), in this
process and, so that a crash shows as a failure instead of ending the run, in
a subprocess.  Both fail on the code before the fix (SIGSEGV), and the script
also fails with the hub's padding removed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import greenlet
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import seethrough
from seethrough.tracing import stacks

import stress_traces


# -- the file from the report, kept as it was ----------------------------------
@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return seethrough.Model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)).eval())


@pytest.fixture(scope="module")
def tiny():
    net = torch.nn.Sequential(OrderedDict([("layer1", torch.nn.Linear(5, 10)), ("layer2", torch.nn.Linear(10, 2))]))
    return seethrough.NNsight(net)


@torch.no_grad()
def test_gpt2(gpt2):
    with gpt2.trace(input_ids=torch.tensor([[1, 2, 3, 4, 5]])):
        hidden = gpt2.transformer.h[0].output.save()
    assert hidden.shape[1] == 5


def test_index(tiny):
    with pytest.raises(IndexError):
        with tiny.trace(torch.rand((1, 5))):
            bad = tiny.layer1.output[999].save()


# -- the stress run, as pytest tests ---------------------------------------------
_MODELS: dict = {}
_PLAN = stress_traces.plan(seed=11, iterations=96, models=dict.fromkeys(["mlp", "gpt2", "llama", "rnn"]))


@pytest.mark.parametrize(("model_name", "scenario", "depth"), _PLAN, ids=[f"{i}-{m}-{s}-d{d}" for i, (m, s, d) in enumerate(_PLAN)])
def test_stress_trace(model_name: str, scenario: str, depth: int) -> None:
    """One trace of the shuffled plan: the right value (vs raw hooks) or the
    right exception, no hook left, and the next trace works."""
    if not _MODELS:
        _MODELS.update(stress_traces.build_models())
    rng = random.Random(f"{model_name}{scenario}{depth}")
    stress_traces.litter(rng)
    stress_traces.run_one(_MODELS, model_name, scenario, depth, rng)


@pytest.mark.slow
def test_stress_script_survives() -> None:
    """The same scenarios as a script, 300 traces, in a subprocess: exit code 0
    (a crash would be -11, SIGSEGV).  Seed 3 crashed both the code before the
    fix and the hub without its padding."""
    script = Path(__file__).with_name("stress_traces.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, str(script), "--iterations", "300", "--seed", "3"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "300 traces over 4 models and 8 scenarios survived" in done.stdout


# -- the hub itself --------------------------------------------------------------
def test_run_on_hub_returns_and_raises_with_the_original_type() -> None:
    assert stacks.run_on_hub(lambda: 41 + 1) == 42

    def fails() -> None:
        raise LookupError("from the job")

    with pytest.raises(LookupError, match="from the job") as info:
        stacks.run_on_hub(fails)
    names = [entry.name for entry in info.traceback]
    assert "fails" in names  # the traceback reaches the job's own frame


def test_jobs_run_in_a_forward_greenlet_under_the_threads_hub() -> None:
    seen: list[greenlet.greenlet] = []
    caller = greenlet.getcurrent()

    def job() -> None:
        seen.append(greenlet.getcurrent())
        seen.append(stacks.run_on_hub(greenlet.getcurrent))  # a nested job: another forward greenlet

    stacks.run_on_hub(job)
    outer, inner = seen
    hub = stacks._hub().greenlet
    assert outer is not caller and inner is not outer
    assert outer.parent is hub and inner.parent is hub
    assert stacks.run_on_hub(greenlet.getcurrent) in (outer, inner)  # parked ones are reused


def test_trace_greenlets_descend_from_the_hub() -> None:
    """A body runs in a worker whose parent is the trace's forward greenlet,
    itself a child of the hub: no trace greenlet is started elsewhere."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model = seethrough.Model(net)
    with model.trace(torch.ones(1, 3)):
        me = greenlet.getcurrent()
        chain = []
        while me is not None:
            chain.append(me)
            me = me.parent
        chain = seethrough.save(chain)
    hub = stacks._hub().greenlet
    assert isinstance(chain[0], seethrough.tracing.runtime.TaskGreenlet)
    assert chain[2] is hub


def test_each_thread_has_its_own_hub() -> None:
    hubs: list = []

    def work() -> None:
        stacks.run_on_hub(lambda: None)
        hubs.append(stacks._hub())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    stacks.run_on_hub(lambda: None)
    assert hubs[0] is not stacks._hub()


def test_stress_in_two_threads_at_once() -> None:
    """Each thread's traces run on its own hub, started at whatever depth its
    first trace had: two threads interleaving failing and passing traces get
    the right values and errors (vs raw hooks) and the process survives."""
    errors: list[BaseException] = []

    def work(seed: int, start_depth: int) -> None:
        try:
            models = stress_traces.build_models()  # each thread its own (the checks see every hook on a model)
            runs = stress_traces.plan(seed, 40, models)
            rng = random.Random(seed)
            stress_traces._at_depth(start_depth, lambda: [
                (stress_traces.litter(rng), stress_traces.run_one(models, m, s, d, rng)) for m, s, d in runs
            ])
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed, depth)) for seed, depth in ((5, 0), (6, 30))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_a_thread_started_deep_in_recursion_gets_a_working_hub() -> None:
    """The hub starts below its first caller only as far as the recursion
    limit leaves room: a first trace near that limit still works."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model = seethrough.Model(net)
    out: list = []

    def near_the_limit(depth: int) -> None:
        if depth:
            return near_the_limit(depth - 1)
        with model.trace(torch.ones(1, 3)):
            got = model[0].output.save()
        out.append(got)

    def work() -> None:
        near_the_limit(sys.getrecursionlimit() - 180)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert torch.equal(out[0], net(torch.ones(1, 3)))
