"""Runs of plain saves served without switching into the body (tracing/prefetch.py).

Every test runs a comprehension the fast path takes and the same body written
so that it cannot be batched (an ``if True`` clause), and compares both with
raw PyTorch forward hooks (or autograd, or HuggingFace ``generate``).  One
test counts the switches into the body greenlet, to show the fast path is
taken at all.
"""

from __future__ import annotations

import ast
import re

import greenlet
import pytest
import torch
from torch import nn
from fixtures.models import hf_generate

import seethrough
from seethrough.errors import ModulePathError, ModuleNotCalledError, NotInTraceError, OutOfOrderError
from seethrough.tracing.prefetch import PREFETCH, rewrite_prefetch
from seethrough.tracing.runtime import TaskGreenlet
from seethrough.tracing import capture


@pytest.fixture(scope="module")
def gpt2_4() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def ids(seed: int, rows: int = 1, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (rows, length), generator=generator)


def hooked(module: nn.Module, names: list[str], x: torch.Tensor, edits: dict | None = None, inputs: bool = False):
    """Reference: a plain forward; raw hooks record the named modules' first
    outputs (or inputs) and apply ``edits`` (name -> function of the output)."""
    seen: dict[str, object] = {}
    handles = []
    for name in names:
        sub = module.get_submodule(name)
        if inputs:
            handles.append(sub.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: _keep(seen, name, (args, kwargs)), with_kwargs=True))
        else:
            handles.append(sub.register_forward_hook(lambda m, a, o, name=name: _keep(seen, name, o)))
    for name, edit in (edits or {}).items():
        handles.insert(0, module.get_submodule(name).register_forward_hook(lambda m, a, o, edit=edit: edit(o)))
    try:
        out = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _keep(seen: dict, name: str, value: object) -> None:
    seen.setdefault(name, value)


class SwitchCounter:
    """Counts switches into body greenlets (greenlet's own trace hook)."""

    def __init__(self) -> None:
        self.into_bodies = 0

    def __enter__(self) -> "SwitchCounter":
        self.previous = greenlet.settrace(self._trace)
        return self

    def _trace(self, event: str, args: tuple) -> None:
        # (A new worker greenlet starts once, before it has a task: not counted.)
        if event in ("switch", "throw") and type(args[1]) is TaskGreenlet and getattr(args[1], "task", None) is not None:
            self.into_bodies += 1

    def __exit__(self, *exc: object) -> None:
        greenlet.settrace(self.previous)


# -- the rewrite -----------------------------------------------------------------------


def rewritten(source: str) -> str:
    """The body as capture compiles it (saves rewritten, then runs of them)."""
    body = [capture._SaveCalls().visit(stmt) for stmt in ast.parse(source).body]
    return ast.unparse(ast.Module(rewrite_prefetch(body), []))


@pytest.mark.parametrize("source", [
    "hs = [model.transformer.h[i].output.save() for i in range(3)]",
    "hs = [layer.output.save() for layer in model.transformer.h]",
    "hs = [layer.mlp.input.save() for layer in model.transformer.h[1:]]",
    "hs = [model.h[-1].inputs.save() for _ in (0, 1)]",
    "for k in range(2):\n    hs = [model.h[i].output.save() for i in range(k)]",
    "a = model.h[0].output.save()\nb = model.h[1].mlp.input.save()",
    "if True:\n    a = model.h[0].output.save()\n    b = other.h[1].output.save()",
    "for i in range(3):\n    hs.append(model.h[i].output.save())",
    "for layer in model.h:\n    hs.append(layer.mlp.output.save())",
])
def test_runs_of_plain_saves_are_recognised(source):
    assert PREFETCH[:-2] in rewritten(source)  # a prefetch or prefetch_run call


@pytest.mark.parametrize("source", [
    "hs = [model.h[i].output.save() for i in range(3) if i]",  # a condition
    "hs = [model.h[i].output.save() for i in range(3) for j in range(2)]",  # two loops
    "hs = [model.h[i].output for i in range(3)]",  # no save
    "hs = [model.h[i].output.save().cpu() for i in range(3)]",  # more than a save
    "hs = [model.h[f(i)].output.save() for i in range(3)]",  # a computed index
    "hs = [model.h[i].next().output.save() for i in range(3)]",  # a call in the chain
    "hs = [model.h[i].source.output.save() for i in range(3)]",  # an accessor in the chain
    "hs = [model.h[i].output.save(path) for i in range(3)]",  # a save of its own
    "def f():\n    return [model.h[i].output.save() for i in range(3)]",  # a function's scope
    "hs = {i: model.h[i].output.save() for i in range(3)}",  # not a list
    "a = model.h[0].output.save()",  # a run of one: nothing to gain
    "a = model.h[0].output.save()\nb = a.h[1].output.save()",  # the second reads the first's name
    "a = model.h[0].output.save()\nmodel = model.h[1].output.save()",  # the second rebinds the first's root
    "a = model.h[0].output.save()\na = model.h[1].output.save()",  # the same name twice
    "a = model.h[0].output.save()\nb = model.h[k].output.save()",  # an index that is no constant
    "for i in range(3):\n    hs.append(model.h[i].output.save())\n    n = i",  # more in the loop
    "for i in range(3):\n    hs.append(model.h[i].output.save())\nelse:\n    pass",  # an else
    "for i in range(3):\n    i.append(model.h[i].output.save())",  # appends to the loop's variable
])
def test_anything_else_is_left_as_written(source):
    assert PREFETCH[:-2] not in rewritten(source)


# -- values ----------------------------------------------------------------------------


def test_saved_values_are_the_raw_hooks_and_the_body_runs_once(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(0)
    names = [f"transformer.h.{i}" for i in range(4)]
    _, seen = hooked(gpt2_4, names, x)
    with torch.no_grad():
        with SwitchCounter() as fast:
            with model.trace(x):
                hs = [model.transformer.h[i].output.save() for i in range(4)]
        with SwitchCounter() as slow:
            with model.trace(x):
                hs_slow = [model.transformer.h[i].output.save() for i in range(4) if True]
    assert [type(h) for h in hs] == [torch.Tensor] * 4
    for h, h_slow, name in zip(hs, hs_slow, names):
        assert torch.equal(h, seen[name]) and torch.equal(h_slow, seen[name])
    # Started once and resumed once with all four values, against once per value.
    assert fast.into_bodies == 2
    assert slow.into_bodies == 5


@pytest.mark.parametrize("body", ["tuple", "list", "envoys", "slice", "negative", "twice", "attn", "input", "inputs"])
def test_each_form_gives_the_raw_hooks_values(gpt2_4, body):
    model = seethrough.Model(gpt2_4)
    x = ids(1)
    h = model.transformer.h
    with torch.no_grad(), SwitchCounter() as counter:
        with model.trace(x):
            if body == "tuple":
                got = [model.transformer.h[i].output.save() for i in (0, 2, 3)]
            elif body == "list":
                got = [h[i].output.save() for i in [1, 3]]
            elif body == "envoys":
                got = [layer.mlp.output.save() for layer in h]
            elif body == "slice":
                got = [layer.output.save() for layer in h[2:]]
            elif body == "negative":
                got = [h[-1].output.save() for _ in range(1)] + [model.transformer.ln_f.output.save()]
            elif body == "twice":
                got = [h[1].output.save() for _ in range(2)]
            elif body == "attn":
                got = [h[i].attn.output.save() for i in range(4)]
            elif body == "input":
                got = [h[i].mlp.input.save() for i in range(4)]
            else:
                got = [h[i].mlp.inputs.save() for i in range(2)]
    names = {
        "tuple": ["transformer.h.0", "transformer.h.2", "transformer.h.3"],
        "list": ["transformer.h.1", "transformer.h.3"],
        "envoys": [f"transformer.h.{i}.mlp" for i in range(4)],
        "slice": ["transformer.h.2", "transformer.h.3"],
        "negative": ["transformer.h.3", "transformer.ln_f"],
        "twice": ["transformer.h.1", "transformer.h.1"],
        "attn": [f"transformer.h.{i}.attn" for i in range(4)],
        "input": [f"transformer.h.{i}.mlp" for i in range(4)],
        "inputs": [f"transformer.h.{i}.mlp" for i in range(2)],
    }[body]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, x, inputs=body in ("input", "inputs"))
    assert len(got) == len(names)
    for value, name in zip(got, names):
        expected = seen[name]
        if body == "input":
            expected = expected[0][0]
        if body == "inputs":
            assert isinstance(value, tuple) and len(value) == 2
            assert all(torch.equal(a, b) for a, b in zip(value[0], expected[0])) and value[1].keys() == expected[1].keys()
        elif isinstance(expected, tuple):
            assert isinstance(value, tuple) and all(
                (a is None and b is None) or torch.equal(a, b) for a, b in zip(value, expected))
        else:
            assert type(value) is torch.Tensor and torch.equal(value, expected)
    if body == "twice":
        assert got[0] is got[1]  # the same value twice, as the ordinary path serves it
    # Every form above was batched: the body started, and resumed once per comprehension.
    assert counter.into_bodies == (3 if body == "negative" else 2)


def test_invokes_see_earlier_edits_and_not_later_replacements(gpt2_4):
    """Three invokes over the whole batch: the first edits block 1 in place,
    the second saves blocks 0-3, the third replaces block 2's output.  The
    saver sees the first edit at block 1 (it comes earlier), not the third's
    replacement at block 2 (it comes later), and block 3 computed from it."""
    model = seethrough.Model(gpt2_4)
    x1, x2 = ids(2), ids(3)
    x = torch.cat([x1, x2])
    results = {}
    for way in ("fast", "slow"):
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(x1):
                    pass
                with tracer.invoke(x2):
                    pass
                with tracer.invoke():
                    model.transformer.h[1].output[:, 0] = 1.0
                with tracer.invoke():
                    if way == "fast":
                        hs = [model.transformer.h[i].output.save() for i in range(4)]
                    else:
                        hs = [model.transformer.h[i].output.save() for i in range(4) if True]
                with tracer.invoke():
                    model.transformer.h[2].output = torch.full_like(model.transformer.h[2].output, 2.0)
        results[way] = [h.clone() for h in hs]

    def edit1(o):
        o[:, 0] = 1.0

    saved = {}

    def keep(name):
        def hook(m, a, o):
            saved[name] = o.clone()
        return hook

    g = gpt2_4
    handles = [g.transformer.h[1].register_forward_hook(lambda m, a, o: edit1(o))]
    handles += [g.transformer.h[i].register_forward_hook(keep(i)) for i in range(4)]
    handles.append(g.transformer.h[2].register_forward_hook(lambda m, a, o: torch.full_like(o, 2.0)))
    try:
        with torch.no_grad():
            g(x)
    finally:
        for handle in handles:
            handle.remove()
    for i in range(4):
        assert torch.equal(results["fast"][i], saved[i]), i
        assert torch.equal(results["slow"][i], saved[i]), i
    assert (results["fast"][1][:, 0] == 1.0).all()
    assert not (results["fast"][2] == 2.0).all()


def test_batched_invokes_get_their_rows(gpt2_4):
    model = seethrough.Model(gpt2_4)
    xs = [ids(4, rows=2), ids(5, rows=1)]
    with torch.no_grad(), SwitchCounter() as counter:
        with model.trace() as tracer:
            outs = []
            for x in xs:
                with tracer.invoke(x):
                    outs.append([model.transformer.h[i].output.save() for i in range(4)])
    names = [f"transformer.h.{i}" for i in range(4)]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, torch.cat(xs))
    assert torch.equal(outs[0][0], seen[names[0]][:2]) and torch.equal(outs[1][3], seen[names[3]][2:])
    for i, name in enumerate(names):
        assert torch.equal(torch.cat([outs[0][i], outs[1][i]]), seen[name])
    assert counter.into_bodies == 1 + 2 * 2  # the trace body, and each invoke started and resumed once


def test_a_run_of_assignments_gives_the_raw_hooks_values(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(13)
    names = ["transformer.h.0", "transformer.h.2", "transformer.h.3.mlp", "transformer.h.3"]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, x)
        _, seen_inputs = hooked(gpt2_4, ["transformer.h.3.mlp"], x, inputs=True)
        with SwitchCounter() as counter:
            with model.trace(x):
                a = model.transformer.h[0].output.save()
                b = model.transformer.h[2].output.save()
                c = model.transformer.h[3].mlp.input.save()
                d = model.transformer.h[3].output.save()
    assert counter.into_bodies == 2
    assert torch.equal(a, seen[names[0]]) and torch.equal(b, seen[names[1]]) and torch.equal(d, seen[names[3]])
    assert torch.equal(c, seen_inputs["transformer.h.3.mlp"][0][0])


def test_a_loop_of_appends_gives_the_raw_hooks_values(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(17)
    names = [f"transformer.h.{i}" for i in range(4)]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, x)
        with SwitchCounter() as counter:
            with model.trace(x):
                hs = []
                for i in range(4):
                    hs.append(model.transformer.h[i].output.save())
                last = i
        assert counter.into_bodies == 2
        with SwitchCounter() as counter:
            with model.trace(x):
                blocks = list().save()
                for layer in model.transformer.h:
                    blocks.append(layer.output.save())
        assert counter.into_bodies == 2
    assert last == 3 and len(hs) == len(blocks) == 4
    assert all(torch.equal(h, seen[n]) and torch.equal(b, seen[n]) for h, b, n in zip(hs, blocks, names))


def test_a_loop_that_fails_keeps_what_came_before(gpt2_4):
    model = seethrough.Model(gpt2_4)
    results = {}
    for way in ("fast", "slow"):
        hs = i = None
        with pytest.raises(OutOfOrderError) as info:
            with model.trace(ids(18)):
                hs = []
                if way == "fast":
                    for i in (0, 3, 1, 2):
                        hs.append(model.transformer.h[i].output.save())  # line: fast
                else:
                    for i in (0, 3, 1, 2):
                        hs.append(model.transformer.h[i].output.save())  # line: slow
                        pass
        results[way] = (len(hs), i, info.value)
        assert f"# line: {way}" in str(info.value)
    assert results["fast"][:2] == results["slow"][:2] == (2, 1)
    strip = lambda e: re.sub(r"at \S+:\d+: `[^`]*`", "at LINE", str(e))  # noqa: E731
    assert strip(results["fast"][2]) == strip(results["slow"][2])


def test_a_run_in_invokes_runs_as_written(gpt2_4):
    """With invokes, another invoke may read a name as soon as it is assigned:
    a run of assignments is not batched there (its values are the same)."""
    model = seethrough.Model(gpt2_4)
    x = ids(14)
    with torch.no_grad():
        _, seen = hooked(gpt2_4, ["transformer.h.0", "transformer.h.1"], x)
        with SwitchCounter() as counter:
            with model.trace() as tracer:
                with tracer.invoke(x):
                    a = model.transformer.h[0].output.save()
                    b = model.transformer.h[1].output.save()
                with tracer.invoke():
                    a_seen = (a + 0).save()  # waits for the first invoke's `a`
    assert torch.equal(a, seen["transformer.h.0"]) and torch.equal(b, seen["transformer.h.1"])
    assert torch.equal(a_seen, a)
    assert counter.into_bodies >= 4  # the first invoke resumed once per value


def test_a_run_that_fails_keeps_what_came_before_and_names_the_line(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(15)
    errors = {}
    for way in ("fast", "slow"):
        a = None
        with pytest.raises(OutOfOrderError) as info:
            with model.trace(x):
                if way == "fast":
                    a = model.transformer.h[3].output.save()
                    b = model.transformer.h[1].output.save()  # line: fast b
                else:
                    a = model.transformer.h[3].output.save()
                    pass
                    b = model.transformer.h[1].output.save()  # line: slow b
        assert type(a) is torch.Tensor  # handed back, though the trace failed
        errors[way] = info.value
        entries = [entry for entry in info.traceback if entry.path.name == "test_prefetch.py"]
        assert f"# line: {way} b" in str(entries[-1].statement)
    assert f"# line: fast b" in str(errors["fast"])
    strip = lambda e: re.sub(r"at \S+:\d+: `[^`]*`", "at LINE", str(e))  # noqa: E731
    assert strip(errors["fast"]) == strip(errors["slow"])


def test_a_name_a_run_cannot_read_fails_at_its_statement(gpt2_4):
    model = seethrough.Model(gpt2_4)
    a = None
    with pytest.raises(NameError):
        with model.trace(ids(16)):
            a = model.transformer.h[0].output.save()
            b = undefined_name.h[1].output.save()  # noqa: F821
    assert type(a) is torch.Tensor


# -- errors: as the ordinary path gives them ---------------------------------------------


def _error(run) -> BaseException:
    with pytest.raises(Exception) as info:
        run()
    return info.value


def test_out_of_order_raises_the_ordinary_error_at_the_users_line(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(6)

    def fast():
        with model.trace(x):
            hs = [model.transformer.h[i].output.save() for i in (3, 1)]  # line: fast

    def slow():
        with model.trace(x):
            hs = [model.transformer.h[i].output.save() for i in (3, 1) if True]  # line: slow

    fast_error, slow_error = _error(fast), _error(slow)
    assert type(fast_error) is type(slow_error) is OutOfOrderError
    strip = lambda e: re.sub(r"at \S+:\d+: `[^`]*`", "at LINE", str(e))  # noqa: E731
    assert strip(fast_error) == strip(slow_error)
    assert "# line: fast" in str(fast_error) and "test_prefetch.py:" in str(fast_error)
    assert "`model.transformer.h[1].output`" in str(fast_error)


def test_a_wrong_module_path_raises_the_ordinary_error(gpt2_4):
    model = seethrough.Model(gpt2_4)
    x = ids(7)
    for path in ("hh", "h_index"):
        def fast():
            with model.trace(x):
                if path == "hh":
                    hs = [model.transformer.hh[i].output.save() for i in range(2)]
                else:
                    hs = [model.transformer.h[i].output.save() for i in (0, 9)]

        def slow():
            with model.trace(x):
                if path == "hh":
                    hs = [model.transformer.hh[i].output.save() for i in range(2) if True]
                else:
                    hs = [model.transformer.h[i].output.save() for i in (0, 9) if True]

        fast_error, slow_error = _error(fast), _error(slow)
        assert type(fast_error) is type(slow_error) is ModulePathError
        strip = lambda e: re.sub(r"at \S+:\d+: `[^`]*`", "at LINE", str(e))  # noqa: E731
        assert strip(fast_error) == strip(slow_error)
        assert "test_prefetch.py:" in str(fast_error)


def test_a_module_the_forward_never_calls(gpt2_4):
    model = seethrough.Model(gpt2_4)
    extra = nn.Linear(32, 32)
    gpt2_4.transformer.add_module("unused", extra)
    try:
        with pytest.raises(ModuleNotCalledError):
            with model.trace(ids(8)):
                hs = [model.transformer.unused.output.save() for _ in range(2)]
        with pytest.raises(OutOfOrderError, match=r"h\[0\]"):  # waited at block 0 for a module never called
            with model.trace(ids(8)):
                hs = [x.output.save() for x in (model.transformer.h[1], model.transformer.h[0])]
    finally:
        del gpt2_4.transformer.unused


def test_outside_a_trace_it_raises_as_written(gpt2_4):
    model = seethrough.Model(gpt2_4)
    with pytest.raises(NotInTraceError):
        hs = [model.transformer.h[i].output.save() for i in range(2)]


# -- what keeps the ordinary path -------------------------------------------------------


class Custom(seethrough.Envoy):
    """A custom envoy with a property of its own (which the batch must not run early)."""

    reads = 0

    @property
    def blocks(self):
        Custom.reads += 1
        return self.h


def test_custom_envoys_caches_and_generators_keep_the_ordinary_path(gpt2_4):
    x = ids(9)
    names = [f"transformer.h.{i}" for i in range(4)]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, x)
    plain = seethrough.Model(gpt2_4)
    custom = seethrough.Model(gpt2_4, envoys={type(gpt2_4.transformer): Custom})
    with torch.no_grad():
        with SwitchCounter() as counter:
            with custom.trace(x):
                hs = [custom.transformer.blocks[i].output.save() for i in range(4)]
        assert counter.into_bodies == 5 and Custom.reads == 4
        with SwitchCounter() as counter:
            with custom.trace(x):
                hs = [custom.transformer.h[i].output.save() for i in range(4)]  # navigation of its own: batched
        assert counter.into_bodies == 2 and Custom.reads == 4
        with SwitchCounter() as counter:
            with plain.trace(x):
                hs2 = [plain.transformer.h[i].output.save() for i in (j for j in range(4))]
        assert counter.into_bodies == 5
        with plain.trace(x) as tracer:
            cache = tracer.cache(modules=[plain.transformer.h[0]])
            hs3 = [plain.transformer.h[i].output.save() for i in (3, 0)]  # h[0] after h[3]: from the cache
    for got in (hs, hs2):
        assert all(torch.equal(a, seen[n]) for a, n in zip(got, names))
    assert torch.equal(hs3[0], seen[names[3]]) and torch.equal(hs3[1], seen[names[0]])


def test_a_list_changed_while_iterated_is_iterated_as_python_does(gpt2_4):
    """Another invoke appends to the list the comprehension iterates, while
    the comprehension waits: the ordinary loop sees the new item; so does the batch."""
    model = seethrough.Model(gpt2_4)
    x = ids(10)
    results = {}
    for way in ("fast", "slow"):
        layers = [0, 1]
        with torch.no_grad():
            with model.trace() as tracer:
                with tracer.invoke(x):
                    if way == "fast":
                        hs = [model.transformer.h[i].output.save() for i in layers]
                    else:
                        hs = [model.transformer.h[i].output.save() for i in layers if True]
                with tracer.invoke():
                    model.transformer.h[0].output  # noqa: B018 - waits for block 0, after the first invoke
                    layers.append(3)
        results[way] = hs
    assert len(results["slow"]) == 3
    assert len(results["fast"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(results["fast"], results["slow"]))


# -- gradients, generation, remote ---------------------------------------------------------


def test_gradients_flow_through_batched_values_as_autograd_gives(gpt2_4):
    model = seethrough.Model(gpt2_4)
    xs = [ids(11), ids(12)]
    gpt2_4.zero_grad()
    with model.trace() as tracer:
        with tracer.invoke(xs[0]):
            pass
        with tracer.invoke(xs[1]):
            hs = [model.transformer.h[i].output.save() for i in range(4)]
    (hs[1].sum() + hs[3].pow(2).sum()).backward()
    got = {name: p.grad.clone() for name, p in gpt2_4.named_parameters() if p.grad is not None}
    gpt2_4.zero_grad()
    _, seen = hooked(gpt2_4, ["transformer.h.1", "transformer.h.3"], torch.cat(xs))
    (seen["transformer.h.1"][1:].sum() + seen["transformer.h.3"][1:].pow(2).sum()).backward()
    expected = {name: p.grad.clone() for name, p in gpt2_4.named_parameters() if p.grad is not None}
    gpt2_4.zero_grad()
    assert got.keys() == expected.keys() and got
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_generation_saves_the_first_steps_values(smollm2_small):
    """In ``model.generate``, a read outside a step loop is the first step's
    value (the prompt's forward), with or without the batch."""
    hf, tokenizer = smollm2_small
    model = seethrough.LanguageModel(hf, tokenizer=tokenizer)
    prompt = "The capital of France is"
    results = {}
    for way in ("fast", "slow"):
        with torch.no_grad(), SwitchCounter() as counter:
            with model.generate(prompt, max_new_tokens=3) as tracer:
                if way == "fast":
                    hs = [model.model.layers[i].output.save() for i in range(3)]
                else:
                    hs = [model.model.layers[i].output.save() for i in range(3) if True]
                out = tracer.result.save()
        results[way] = (hs, out, counter.into_bodies)
    assert results["fast"][2] == 3  # started, resumed with the three values, resumed with the result
    assert results["slow"][2] == 5
    first: dict[int, torch.Tensor] = {}
    handles = [hf.model.layers[i].register_forward_hook(lambda m, a, o, i=i: _keep(first, i, o)) for i in range(3)]
    try:
        reference = hf_generate(hf, tokenizer, [prompt], max_new_tokens=3)
    finally:
        for handle in handles:
            handle.remove()
    for way in ("fast", "slow"):
        hs, out, _ = results[way]
        assert torch.equal(out, reference)
        for i in range(3):
            assert torch.equal(hs[i], first[i]), (way, i)


def test_remote_local_gives_the_same_values(tiny_gpt2, gpt2_tokenizer):
    model = seethrough.LanguageModel(tiny_gpt2, tokenizer=gpt2_tokenizer)
    prompt = "The Eiffel Tower is in"
    with model.trace(prompt, remote="local"):
        remote = [model.transformer.h[i].output.save() for i in range(2)]
    with torch.no_grad():
        with model.trace(prompt):
            local = [model.transformer.h[i].output.save() for i in range(2)]
    assert len(remote) == 2 and all(torch.equal(a, b) for a, b in zip(remote, local))


def test_a_remote_session_body_outside_traces_raises_as_written(gpt2_4):
    """The compiled helpers are bound in a remote session's own namespace too:
    a run of saves outside any trace fails as the plain code does."""
    model = seethrough.Model(gpt2_4)
    with pytest.raises(NotInTraceError, match=r"h\[0\]\.output"):
        with model.session(remote="local"):
            hs = [model.transformer.h[i].output.save() for i in range(2)]
    with pytest.raises(NotInTraceError, match=r"h\[0\]\.output"):
        with model.session(remote="local"):
            hs = []
            for i in range(2):
                hs.append(model.transformer.h[i].output.save())


def test_values_between_the_first_and_last_are_recorded_without_an_event(gpt2_4, monkeypatch):
    """The lean path: while a batch is the only body that wants a value, its
    hook records it and asks for the next one without serving an event; only
    the last value (which resumes the body) goes through ``_deliver``.  An
    invoke's values are its rows of the batch, narrowed at an event: with
    invokes every value is served the ordinary way, as the raw hooks' rows."""
    from seethrough.tracing.interleaver import Interleaver

    delivered = []
    original = Interleaver._deliver

    def counting(self, key, kind, value):
        delivered.append(key)
        return original(self, key, kind, value)

    monkeypatch.setattr(Interleaver, "_deliver", counting)
    model = seethrough.Model(gpt2_4)
    x = ids(21)
    names = [f"transformer.h.{i}" for i in range(4)]
    with torch.no_grad():
        _, seen = hooked(gpt2_4, names, x)
        with model.trace(x):
            hs = [model.transformer.h[i].output.save() for i in range(4)]
        alone = len(delivered)
        delivered.clear()
        with model.trace() as tracer:
            with tracer.invoke(x):
                both = [model.transformer.h[i].output.save() for i in range(4)]
            with tracer.invoke(x):
                second = model.transformer.h[2].output.save()
    assert alone == 1
    assert sorted(delivered) == sorted(set(delivered)) and len(delivered) == 4
    # (the two invokes run as one batch of two rows: the same up to float rounding)
    for h, b, name in zip(hs, both, names):
        assert torch.equal(h, seen[name]) and torch.allclose(b, seen[name], atol=1e-6)
    assert torch.allclose(second, seen["transformer.h.2"], atol=1e-6)


def test_failing_batches_leave_the_model_as_they_found_it(gpt2_4):
    """A batch adds its hooks ahead and records values without events; after
    traces where that fails (a value out of order, one never called, an error
    raised by the body once the batch is complete), the model has no hook or
    patched forward left, the same weights, and the next trace gives the raw
    hooks' values."""
    from fixtures.models import assert_pristine, state_snapshot

    model = seethrough.Model(gpt2_4)
    x = ids(22)
    weights = state_snapshot(gpt2_4)
    extra = nn.Linear(32, 32)
    gpt2_4.transformer.add_module("unused", extra)
    try:
        with pytest.raises(OutOfOrderError):
            with model.trace(x):
                hs = [model.transformer.h[i].output.save() for i in (0, 3, 1, 2)]
        with pytest.raises(ModuleNotCalledError):
            with model.trace(x):
                hs = [model.transformer.unused.output.save() for _ in range(3)]
        with pytest.raises(ZeroDivisionError):
            with model.trace(x):
                hs = [model.transformer.h[i].output.save() for i in range(4)]
                1 / 0
    finally:
        del gpt2_4.transformer.unused
    assert_pristine(gpt2_4)
    assert all(torch.equal(weights[k], v) for k, v in gpt2_4.state_dict().items())
    names = [f"transformer.h.{i}" for i in range(4)]
    _, seen = hooked(gpt2_4, names, x)
    with model.trace(x):
        hs = [model.transformer.h[i].output.save() for i in range(4)]
    assert all(torch.equal(h, seen[name]) for h, name in zip(hs, names))
