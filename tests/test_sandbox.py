"""The sandbox for remote trace bodies (seethrough.remote.sandbox).

A corpus of escape attempts: each is either refused by ``validate`` (and the
message names the line and the construct) or fails when run, with canaries
(a file that must not be written, an environment variable that must not be
set) proving that nothing happened.  Then realistic bodies that must work.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

import seethrough
from seethrough.errors import SeethroughError
from seethrough.remote.sandbox import (
    SandboxViolation,
    isolated_rng_state,
    module_proxy,
    run_body,
    safe_builtins,
    safe_globals,
    validate,
)
from fixtures.models import MLP

CANARY_ENV = "SEETHROUGH_SANDBOX_CANARY"


@dataclass(frozen=True)
class Escape:
    name: str
    source: str
    line: int | None = None  # refused statically at this line...
    construct: str | None = None  # ...naming this construct; None: must fail at run time


ESCAPES = [
    # imports of dangerous modules
    Escape("import os", "import os\nos.system('touch {canary}')", 1, "import os"),
    Escape("import sys", "x = 1\nimport sys", 2, "import sys"),
    Escape("import subprocess", "import subprocess as sp", 1, "import subprocess"),
    Escape("import builtins", "import builtins\nbuiltins.open('{canary}', 'w')", 1, "import builtins"),
    Escape("import importlib", "import importlib", 1, "import importlib"),
    Escape("import ctypes", "import ctypes", 1, "import ctypes"),
    Escape("import pickle", "import pickle", 1, "import pickle"),
    Escape("import marshal", "import marshal", 1, "import marshal"),
    Escape("from io import", "from io import open as o", 1, "from io import"),
    Escape("import socket", "import socket", 1, "import socket"),
    Escape("import shutil", "import shutil", 1, "import shutil"),
    Escape("from pathlib", "from pathlib import Path\nPath('{canary}').touch()", 1, "from pathlib import"),
    Escape("import numpy", "import numpy as np", 1, "import numpy"),
    Escape("relative import", "from . import wire", 1, "from . import"),
    Escape("star import", "from math import *", 1, "from math import"),
    Escape("torch submodule import", "import torch.utils.cpp_extension", 1, "import torch.utils.cpp_extension"),
    Escape("from torch import private", "from torch import _C", 1, "from torch import _C"),
    Escape("__import__", "__import__('os').system('touch {canary}')", 1, "__import__"),
    # dunder walks
    Escape("subclasses walk", "y = 1\nsubs = ().__class__.__bases__[0].__subclasses__()", 2, "__subclasses__"),
    Escape("class of tensor", "x.__class__", 1, "x.__class__"),
    Escape("function globals", "def f():\n    pass\nb = f.__globals__['__builtins__']", 3, "__globals__"),
    Escape("function code", "def f():\n    pass\nc = f.__code__", 3, "f.__code__"),
    Escape("module dict", "model.__dict__", 1, "model.__dict__"),
    Escape("builtins name", "__builtins__['open']('{canary}', 'w')", 1, "__builtins__"),
    Escape("print self", "print.__self__", 1, "__self__"),
    Escape("import torch as t; t.__dict__", "import torch as t\nt.__dict__['load']", 2, "t.__dict__"),
    # frames
    Escape("generator frame", "def g():\n    yield 1\nit = g()\nglobs = it.gi_frame.f_back.f_globals", 4, "f_globals"),
    Escape("generator code", "def g():\n    yield 1\ncode = g().gi_code", 3, "gi_code"),
    Escape("coroutine", "async def c():\n    pass", 1, "async def"),
    Escape("await", "def f():\n    x = 1\n    return [y async for y in x]", 3, "async for"),
    Escape("traceback frame", "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame", 4, "__traceback__"),
    Escape("tb_next without dunder", "def f(tb):\n    return tb.tb_next.tb_frame.f_globals", 2, "f_globals"),
    # string-driven attribute lookups
    Escape("str.format walk", 'leak = "{0.__class__}".format(x)', 1, ".format"),
    Escape("str.format on a name", 'fmt = "{0.__globals__}"\nleak = fmt.format(print)', 2, "fmt.format"),
    Escape("format_map", 'str.format_map("{x.__class__}", {"x": x})', 1, "format_map"),
    Escape("getattr", "getattr(x, '__class__')", 1, "getattr"),
    Escape("setattr", "setattr(model, 'forward', print)", 1, "setattr"),
    Escape("delattr", "delattr(model, 'fc1')", 1, "delattr"),
    Escape("hasattr", "hasattr(x, 'T')", 1, "hasattr"),
    Escape("vars", "vars(model)", 1, "vars"),
    Escape("globals", "g = globals()['__builtins__']", 1, "globals"),
    Escape("locals", "def f():\n    return locals()", 2, "locals"),
    Escape("dir", "dir(x)", 1, "dir"),
    Escape("eval", "eval('1 + 1')", 1, "eval"),
    Escape("exec", "exec('import os')", 1, "exec"),
    Escape("compile", "compile('1', 'f', 'exec')", 1, "compile"),
    Escape("open", "open('{canary}', 'w').write('owned')", 1, "open"),
    Escape("breakpoint", "breakpoint()", 1, "breakpoint"),
    Escape("input", "input()", 1, "input"),
    Escape("help", "help(x)", 1, "help"),
    Escape("exit", "exit(1)", 1, "exit"),
    Escape("quit", "quit()", 1, "quit"),
    # the class machinery
    Escape("type()", "t = type(x)", 1, "type"),
    Escape("object", "object.__subclasses__()", 1, "__subclasses__"),
    Escape("object()", "o = object()", 1, "object"),
    Escape("super", "def f():\n    return super()", 2, "super"),
    Escape("class definition", "class Evil:\n    pass", 1, "class Evil"),
    Escape("mro", "bases = ValueError.mro()", 1, "ValueError.mro"),
    Escape("memoryview", "memoryview(b'abc')", 1, "memoryview"),
    # torch surfaces
    Escape("torch.load", "import torch\ntorch.load('{canary}')", 2, "torch.load"),
    Escape("torch.from_file", "import torch\ntorch.from_file('{canary}')", 2, "torch.from_file"),
    Escape("torch._C", "import torch\ntorch._C", 2, "torch._C"),
    Escape("torch.hub.load", "import torch\ntorch.hub.load('a', 'b')", 2, "torch.hub.load"),
    Escape("set default dtype", "import torch\ntorch.set_default_dtype(torch.float64)", 2, "set_default_dtype"),
    Escape("numpy tofile", "x.numpy().tofile('{canary}')", 1, "tofile"),
    Escape("numpy", "arr = x.numpy()", 1, "x.numpy"),
    Escape("untyped storage", "s = x.untyped_storage()", 1, "untyped_storage"),
    Escape("storage", "s = x.storage()", 1, "x.storage"),
    Escape("uninitialized memory", "leak = x.new_empty(1000)", 1, "new_empty"),
    Escape("resize", "x.resize_(10**6)", 1, "resize_"),
    Escape("share memory", "x.share_memory_()", 1, "share_memory_"),
    Escape("cuda", "y = x.cuda()", 1, "x.cuda"),
    Escape("grad_fn hook", "def f(g):\n    return g\nx.grad_fn.register_hook(f)", 3, "register_hook"),
    Escape("tensor hook", "x.register_hook(print)", 1, "register_hook"),
    # the served model
    Escape("model._model", "m = model._model", 1, "model._model"),
    Escape("forward hook", "h = model.fc1.register_forward_hook(print)", 1, "register_forward_hook"),
    Escape("save_pretrained", "model.config.save_pretrained('{canary}')", 1, "save_pretrained"),
    Escape("load_state_dict", "model.load_state_dict({})", 1, "load_state_dict"),
    Escape("module apply", "model.apply(print)", 1, "model.apply"),
    Escape("replace forward", "model.fc1.forward = print", 1, "model.fc1.forward"),
    Escape("replace weight", "model.fc1.weight = None", 1, "model.fc1.weight"),
    Escape("delete attribute", "del model.fc1", 1, "model.fc1"),
    Escape("train mode", "model.train()", 1, "model.train"),
    Escape("to_empty", "model.to_empty(device='cpu')", 1, "to_empty"),
    Escape("push_to_hub", "model.push_to_hub('me/model')", 1, "push_to_hub"),
    Escape("tokenizer backend", "tok.backend_tokenizer.save('{canary}')", 1, "backend_tokenizer"),
    # syntax that smuggles
    Escape("decorator", "@print\ndef f():\n    pass", 1, "@print"),
    Escape("lambda smuggling a builtin", "steal = lambda: __import__", 1, "__import__"),
    Escape("lambda smuggling a walk", "steal = lambda o: o.__globals__", 1, "__globals__"),
    Escape("nested function", "def outer():\n    def inner():\n        return open('{canary}', 'w')\n    return inner", 3, "open"),
    Escape("comprehension hiding a walk", "c = [s for s in ().__class__.__base__.__subclasses__()]", 1, "__subclasses__"),
    Escape("walrus", "if (o := open):\n    pass", 1, "open"),
    Escape("rebinding a builtin", "getattr = print", 1, "getattr"),
    Escape("private argument", "def f(_secret):\n    return _secret", 1, "_secret"),
    Escape("private keyword", "print(1, __class__=2)", 1, "__class__"),
    Escape("match attribute walk", "match x:\n    case int(__class__=c):\n        pass", 2, "__class__"),
    Escape("global statement", "def f():\n    global x\n    x = 1", 2, "global x"),
    Escape("bare except", "try:\n    pass\nexcept:\n    pass", 3, "except:"),
    Escape("catch BaseException", "try:\n    pass\nexcept BaseException:\n    pass", 3, "BaseException"),
    Escape("frame prefix", "f = x.f_locals", 1, "f_locals"),
    # refused only when run
    Escape("torch.save at run time", "import torch\ntorch.save(x, '{canary}')"),
    Escape("torch.ops", "import torch as t\nt.ops.aten.add"),
    Escape("torch.hub listing", "import torch\ntorch.hub.list('me/repo')"),
    Escape("torch.utils via alias", "import torch as t\nt.utils.cpp_extension"),
    Escape("torch.jit", "import torch\ntorch.jit.script(print)"),
    Escape("torch.cuda", "import torch\ntorch.cuda.init()", 2, "torch.cuda"),
    Escape("torch.backends", "import torch\ntorch.backends.cudnn"),
    Escape("torch.distributed", "import torch\ntorch.distributed"),
    Escape("torch.multiprocessing", "import torch\ntorch.multiprocessing", 2, "torch.multiprocessing"),
    Escape("torch.library", "import torch\ntorch.library"),
    Escape("torch.classes", "import torch\ntorch.classes"),
    Escape("torch.compile", "import torch\ntorch.compile(print)", 2, "torch.compile"),
    Escape("functional reaching torch", "import torch.nn.functional as F\nF.handle_torch_function"),
    Escape("legacy constructor", "import torch\nleak = torch.Tensor(10000)"),
    Escape("writing to a module proxy", "import torch\ntorch.output = print"),
    Escape("deleting from a module proxy", "import torch\ndel torch.grad"),
    Escape("os.system without import", "os.system('touch {canary}')", 1, "os.system"),
    Escape("os without import", "os.makedirs('{canary}')"),
    Escape("environ without import", "environ['" + CANARY_ENV + "'] = '1'"),
    Escape("undefined file helper", "handle = open_file('{canary}', 'w')"),
]


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    os.environ.pop(CANARY_ENV, None)
    yield path
    assert not path.exists(), "an escape wrote the canary file"
    assert CANARY_ENV not in os.environ, "an escape set the canary environment variable"


def extra_for_escapes():
    return {"x": torch.randn(3, requires_grad=True) * 1, "model": seethrough.Model(MLP()), "tok": None}


def test_corpus_is_large_enough():
    assert len(ESCAPES) >= 35
    assert len({escape.name for escape in ESCAPES}) == len(ESCAPES)


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda escape: escape.name)
def test_escape_attempts_are_refused_or_contained(escape, canary):
    source = escape.source.replace("{canary}", str(canary))
    if escape.construct is not None:
        with pytest.raises(SandboxViolation) as info:
            validate(source)
        message = str(info.value)
        assert message.startswith(f"line {escape.line}:"), message
        assert escape.construct in message, message
        assert "not allowed in a remote trace body" in message, message
        assert info.value.lineno == escape.line
    else:
        validate(source)  # passes the static checks...
        with pytest.raises((SandboxViolation, NameError)):  # ...and still cannot do anything
            run_body(source, extra_for_escapes())


def test_static_messages_say_why_and_what_to_do_instead():
    with pytest.raises(SandboxViolation) as info:
        validate("import torch\nx = 1\nimport os")
    assert str(info.value) == (
        "line 3: `import os` is not allowed in a remote trace body: remote bodies may import only einops, math, "
        "torch, torch.fft, torch.linalg, torch.nn, torch.nn.functional; compute with torch, math and einops"
    )
    with pytest.raises(SandboxViolation, match=r"line 2: `x.numpy` .* NumPy arrays expose raw memory.*\.tolist\(\)"):
        validate("y = 1\nz = x.numpy()")
    with pytest.raises(SandboxViolation, match=r"use an f-string"):
        validate("'{}'.format(1)")


def test_runtime_violations_name_the_users_line():
    source = "import torch\n\ny = torch.ones(2)\ntorch.hub.list('x')"
    with pytest.raises(SandboxViolation, match=r"^line 4: `torch.hub` is not available in remote trace bodies"):
        run_body(source, {})


def test_helper_files_are_named_in_messages():
    with pytest.raises(SandboxViolation, match=r"^line 2 of helpers.py: `open`"):
        validate("def f():\n    return open('x')", "helpers.py")


def test_syntax_errors_become_violations_with_the_line():
    with pytest.raises(SandboxViolation, match=r"^line 2: syntax error") as info:
        validate("x = 1\nif x\n    pass")
    assert info.value.lineno == 2


def test_non_text_and_giant_sources_are_refused():
    with pytest.raises(SandboxViolation, match="must be source text"):
        validate(b"x = 1")  # type: ignore[arg-type]
    with pytest.raises(SandboxViolation, match="over the limit"):
        validate("x = 1\n" * 300_000)
    with pytest.raises(SandboxViolation):
        validate("x = " + "(" * 5000 + ")" * 5000)  # parser recursion, not a crash


def test_sandbox_violation_is_a_seethrough_error():
    assert issubclass(SandboxViolation, SeethroughError)


def test_missing_einops_gives_a_clear_error():
    if importlib.util.find_spec("einops") is not None:
        pytest.skip("einops is installed")
    with pytest.raises(ModuleNotFoundError, match="einops is not installed on this seethrough server"):
        run_body("import einops", {})


# -- the namespace -------------------------------------------------------------------


def test_builtins_hold_only_safe_names():
    table = safe_builtins(print)
    for name in ("open", "eval", "exec", "compile", "getattr", "setattr", "vars", "globals", "type", "object",
                 "super", "memoryview", "input", "breakpoint", "help", "exit", "quit", "dir", "locals"):
        assert name not in table, name
    for name in ("len", "range", "isinstance", "sorted", "zip", "ValueError", "print", "__import__"):
        assert name in table, name


def test_guarded_import_hands_out_proxies_only():
    guarded = safe_builtins()["__import__"]
    with pytest.raises(SandboxViolation, match="`import os` is not allowed"):
        guarded("os")
    with pytest.raises(SandboxViolation, match=r"`import \.wire` is not allowed"):
        guarded("wire", None, None, (), 1)
    proxy = guarded("torch")
    assert proxy is not torch and "sandbox" in repr(proxy)
    with pytest.raises(SandboxViolation, match="`torch.load` is not available"):
        proxy.load  # noqa: B018


def test_module_proxies_can_be_injected_as_variables():
    functional = module_proxy("torch.nn.functional")
    ns, _ = run("y = F.relu(x)", F=functional, x=torch.tensor([-1.0, 2.0]))
    assert torch.equal(ns["y"], torch.tensor([0.0, 2.0]))
    assert module_proxy("torch").nn.functional is functional
    with pytest.raises(SandboxViolation, match="`os` is not available"):
        module_proxy("os")
    with pytest.raises(SandboxViolation, match="only .grad, .input, .inputs, .output can be assigned"):
        run("F.relu = print", F=functional)  # refused before running
    with pytest.raises(SandboxViolation, match="modules are read-only"):
        run("F.output = print", F=functional)


def test_safe_globals_refuses_private_names_and_modules():
    with pytest.raises(SandboxViolation, match="'__builtins__'"):
        safe_globals({"__builtins__": __builtins__})
    with pytest.raises(SandboxViolation, match="'_secret'"):
        safe_globals({"_secret": 1})
    with pytest.raises(SandboxViolation, match="module 'os'"):
        safe_globals({"os": os})
    namespace = safe_globals({"x": 1})
    assert namespace["x"] == 1 and "open" not in namespace["__builtins__"]


def test_rng_state_is_restored():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with isolated_rng_state():
        run_body("import torch\ntorch.manual_seed(1234)\nnoise = torch.randn(5)", {})
    assert torch.equal(torch.rand(3), expected)


# -- realistic bodies --------------------------------------------------------------------


def run(source: str, **extra):
    lines: list[str] = []

    def capture(*values, sep=" ", end="\n"):
        lines.append(sep.join(str(value) for value in values) + end)

    namespace = run_body(source, extra, print_function=capture)
    return namespace, "".join(lines)


def test_tensor_arithmetic_and_torch_functions():
    x = torch.randn(2, 5)
    ns, _ = run(
        "import torch\n"
        "probs = torch.softmax(x, -1)\n"
        "top = torch.topk(probs, 2)\n"
        "y = (x * 2 + 1) @ x.T\n"
        "mean = x.mean(dim=0, keepdim=True)\n"
        "z = torch.where(x > 0, x, torch.zeros_like(x))\n"
        "cast = x.to(torch.float16).to(x.device)\n"
        "e = torch.empty(2, 3)\n"
        "ok = isinstance(x, torch.Tensor) and not isinstance(3, torch.Tensor)\n"
        "n = torch.linalg.vector_norm(x, dim=-1)\n"
        "spec = torch.fft.rfft(x)\n",
        x=x,
    )
    assert torch.allclose(ns["probs"], torch.softmax(x, -1))
    assert torch.equal(ns["top"].indices, torch.topk(torch.softmax(x, -1), 2).indices)
    assert torch.allclose(ns["y"], (x * 2 + 1) @ x.T)
    assert torch.equal(ns["z"], torch.relu(x))
    assert ns["cast"].dtype == torch.float16
    assert torch.equal(ns["e"], torch.zeros(2, 3))  # torch.empty never leaks old memory
    assert ns["ok"] is True
    assert torch.allclose(ns["n"], x.norm(dim=-1))
    assert torch.allclose(ns["spec"], torch.fft.rfft(x))


def test_functional_imports_helpers_loops_and_comprehensions():
    x = torch.randn(3, 4)
    ns, _ = run(
        "import torch.nn.functional as F\n"
        "from torch.nn import functional as G\n"
        "from torch import nn, linalg\n"
        "import math\n"
        "def scaled(t, factor=2.0):\n"
        "    def inner(u):\n"
        "        return u * factor\n"
        "    return inner(t)\n"
        "acts = F.gelu(x) + G.relu(x)\n"
        "rows = [scaled(row).sum().item() for row in x]\n"
        "table = {i: r for i, r in enumerate(rows) if r > -100}\n"
        "total = 0\n"
        "for _ in range(3):\n"
        "    total += 1\n"
        "while total < 5:\n"
        "    total += 1\n"
        "angle = math.cos(math.pi)\n"
        "layer = nn.Linear(4, 2)\n"
        "out = layer(x)\n"
        "if (k := len(rows)) == 3:\n"
        "    found = k\n"
        "square = (lambda v: v * v)(3)\n"
        "try:\n"
        "    [][1]\n"
        "except IndexError as error:\n"
        "    caught = str(error)\n"
        "match rows:\n"
        "    case [first, *rest]:\n"
        "        head = first\n",
        x=x,
    )
    assert torch.allclose(ns["acts"], torch.nn.functional.gelu(x) + torch.relu(x))
    assert ns["rows"] == pytest.approx([(r * 2).sum().item() for r in x])
    assert list(ns["table"]) == [0, 1, 2]
    assert ns["total"] == 5 and ns["angle"] == -1.0 and ns["found"] == 3 and ns["square"] == 9
    assert ns["out"].shape == (3, 2) and ns["caught"] == "list index out of range"
    assert ns["head"] == ns["rows"][0]


def test_print_goes_to_the_given_function():
    _, printed = run("import torch\nh = torch.arange(3)\nprint('hidden', h.tolist(), sep=': ')\nprint(f'{h.sum():d} total')",)
    assert printed == "hidden: [0, 1, 2]\n3 total\n"


def test_model_and_tracer_style_attributes_work():
    """Public module attributes, assignment of .output-style names, no_grad, seeds."""
    model = seethrough.Model(MLP())
    holder = {"output": None}
    ns, _ = run(
        "import torch\n"
        "w = model.fc1.weight.shape\n"
        "with torch.no_grad():\n"
        "    y = model.fc2(torch.ones(1, 8))\n"
        "torch.manual_seed(0)\n"
        "noise = torch.randn(2)\n"
        "gen = torch.Generator().manual_seed(3)\n"
        "names = [name for name, _ in model.fc1.named_parameters()]\n",
        model=model, holder=holder,
    )
    assert ns["w"] == (8, 4) and ns["y"].shape == (1, 3)
    assert ns["names"] == ["weight", "bias"]


REALISTIC_BODY = """
import torch
import torch.nn.functional as F
with tracer.invoke("The Eiffel Tower is in"):
    h5 = model.model.layers[5].output[0].save()
    model.model.layers[8].output[0][:, -1] = 0
    model.model.layers[3].mlp.output += steer.to(h5.device, torch.float32)
    attn = model.model.layers[2].self_attn.output[0]
    clean = attn.detach().clone().float().softmax(-1).cpu()
with tracer.invoke():
    logits = model.lm_head.output
    probs = F.softmax(logits[:, -1], dim=-1)
    top = probs.topk(5).indices.tolist()
    model.model.layers[1].skip(model.model.layers[1].input)
    second = model.model.layers[0].next().output.save()
    loss = logits.sum()
    with loss.backward():
        grad = model.model.layers[4].output[0].grad.save()
for step in tracer.iter[:3]:
    tracer.log(step, model.lm_head.output.argmax(-1))
cache = tracer.cache(modules=[model.model.layers[0]])
print(f"{h5.shape=}", tracer.result)
tracer.stop()
"""


def test_realistic_trace_bodies_pass_validation():
    validate(REALISTIC_BODY)


def test_assignable_attributes_pass_validation():
    validate("model.fc1.output = h\nmodel.fc1.input = h\nmodel.fc1.inputs = (h,)\nh.grad = h\nh.output[:, 0] += 1")


@pytest.mark.skipif(importlib.util.find_spec("einops") is None, reason="einops is not installed")
def test_einops_when_installed():
    x = torch.randn(2, 3, 4)
    ns, _ = run(
        "from einops import rearrange, reduce\n"
        "y = rearrange(x, 'b s d -> s b d')\n"
        "m = reduce(x, 'b s d -> b d', 'mean')\n",
        x=x,
    )
    assert torch.equal(ns["y"], x.permute(1, 0, 2))
    assert torch.allclose(ns["m"], x.mean(1))
    with pytest.raises(SandboxViolation, match="unknown reduction"):
        run("import einops\neinops.reduce(x, 'b s d -> b d', 'numpy')", x=x)
