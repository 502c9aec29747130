"""The sandbox for remote trace bodies (seethrough.remote.server.sandbox, .reach, .execute).

The attack corpus (``tests/sandbox_corpus.py``) runs here in-process through
the server's own :func:`~seethrough.remote.server.execute.execute` on a served
GPT-2 (random weights, real tokenizer).  Each attack counts as contained only
when it is refused as the corpus says (or runs harmlessly on a copy) AND no
canary fired: the canary file does not exist, the loopback listener saw no
connection, and neither the secret environment variable nor the model's
folder appears in the answer, printed lines or error.  After each attack, a
clean request must give exactly the answer of a freshly loaded model
(activations, logits, a weight's gradient, a seeded RNG draw, tokenizer and
config reads), which is itself checked against plain HuggingFace and autograd.
Then unit tests of the rules and realistic bodies that must work.
"""

from __future__ import annotations

import ast
import gc
import importlib.util
import linecache
import os
import secrets
from typing import Any

import pytest
import torch

import seethrough
from fixtures.network import connections, listener  # noqa: F401 - listener is a fixture
from seethrough import LanguageModel
from seethrough.errors import SeethroughError
from seethrough.remote.server.execute import execute
from seethrough.remote.protocol import ProtocolError, Request, parse_request
from seethrough.remote.server.reach import ConfigView, TokenizerView
from seethrough.remote.server.sandbox import (
    SandboxViolation,
    isolated_rng_state,
    module_proxy,
    run_body,
    safe_builtins,
    safe_globals,
    validate,
)
from seethrough.tracing import capture
from sandbox_corpus import (ATTACKS, CLEAN_GENERATE_OPTIONS, CLEAN_GENERATE_SOURCE, CLEAN_SOURCE, MUTATIONS, NEW,
                            OPTION_ATTACKS, SECRET_ENV, STATE_FIELDS, Attack, Mutation)
from fixtures.models import MLP
from fixtures.threads import single_thread

PROMPT = "The quick brown fox"


def request(source: str, kind: str = "trace", **fields) -> Request:
    fields.setdefault("args", [PROMPT] if kind != "session" else [])
    fields.setdefault("variables", {"x": torch.linspace(-1, 1, 3)})
    return Request(model="gpt2", kind=kind, source=source, filename="attack.py", first_line=1,
                   tracer_name="tracer" if kind != "session" else None, envoys={"model": ""}, **fields)


def run_request(served, source: str, kind: str = "trace", **fields) -> tuple[dict, list[str]]:
    printed: list[str] = []

    def capture_print(*values, sep=" ", end="\n"):
        printed.append(sep.join(str(value) for value in values) + end)

    return execute(request(source, kind, **fields), served, print_function=capture_print), printed


def assert_same_answer(got: dict, expected: dict) -> None:
    assert "error" not in got, got.get("error")
    for name in STATE_FIELDS:
        a, b = got["values"][name], expected["values"][name]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), name
        else:
            assert a == b, name


@pytest.fixture(scope="module")
def served(gpt2_dir) -> LanguageModel:
    return LanguageModel(str(gpt2_dir), dispatch=True)


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Equal up to ``tolerance`` times the largest magnitude in ``expected``: float sums
    taken in another order (other thread counts) differ by about 1e-6 of the scale."""
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    worst = (got - expected).abs().max().item()
    assert worst <= tolerance * scale, f"largest difference {worst:g} exceeds {tolerance:g} x scale {scale:g}"


def assert_clean_values_match_plain_hf(values: dict, gpt2_dir) -> Any:
    """CLEAN_SOURCE's saved values equal plain HuggingFace and autograd (one torch
    thread, as the server's workers); returns the reference tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with single_thread():  # as the server's workers: bitwise-equal values
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
        seen = {}
        hook = model.transformer.ln_f.register_forward_hook(lambda m, a, o: seen.update(final=a[0]))
        logits = model(**tokenizer(PROMPT, return_tensors="pt")).logits
        hook.remove()
        seen["final"].retain_grad()
        logits.sum().backward()
    # The request may run on more torch threads than the reference (CI machines have many
    # cores), which reorders float sums: compare relative to each tensor's scale.
    assert_close_to_scale(values["logits"], logits.detach())
    assert_close_to_scale(values["final_grad"], seen["final"].grad)
    assert_close_to_scale(values["weight_grad"], model.transformer.h[0].mlp.c_fc.weight.grad)
    assert torch.equal(values["draw"], torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert values["ids"] == tokenizer("hello world")["input_ids"]
    return tokenizer


@pytest.fixture(scope="module")
def fresh_answer(gpt2_dir, served) -> dict:
    """The clean request's answer from a model nothing has run on, checked against HuggingFace and autograd."""
    answer, printed = run_request(LanguageModel(str(gpt2_dir), dispatch=True), CLEAN_SOURCE)
    assert "error" not in answer, answer
    values = answer["values"]
    tokenizer = assert_clean_values_match_plain_hf(values, gpt2_dir)
    assert values["names"] == list(tokenizer.model_input_names)
    assert values["config"]["n_layer"] == 2 and "_name_or_path" not in values["config"]
    assert printed == [f"{len(tokenizer)} {tokenizer.eos_token_id}\n"]
    return answer




@pytest.fixture
def canaries(tmp_path, listener, monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv(SECRET_ENV, secret)
    path = tmp_path / "canary"
    yield {"canary": str(path), "port": str(listener.getsockname()[1]), "secret": SECRET_ENV}, secret, path
    assert not path.exists(), "an attack wrote the canary file"
    assert connections(listener) == 0, "an attack opened a network connection"


def fill(source: str, values: dict) -> str:
    for key, value in values.items():
        source = source.replace("{" + key + "}", value)
    return source


# The corpus's own shape, checked once at import (data, not a test of the library).
_NAMES = [attack.name for attack in ATTACKS] + [attack.name for attack in OPTION_ATTACKS]
assert len(_NAMES) >= 120 and len(NEW) >= 60 and len(set(_NAMES)) == len(_NAMES), "the attack corpus shrank"
assert {attack.group for attack in ATTACKS} >= {
    "network and the client", "secrets and paths", "code execution", "files", "state of later requests",
    "library internals", "raw memory", "classes"}, "an attack class lost all its attacks"


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.name)
def test_attack_is_contained(attack: Attack, served, fresh_answer, canaries, gpt2_dir):
    values, secret, _ = canaries
    source = fill(attack.source, values)
    if attack.static:
        with pytest.raises(SandboxViolation) as info:
            validate(source)
        message = str(info.value)
        assert message.startswith(f"line {attack.line}:"), message
        assert attack.construct in message, message
        assert "not allowed in a remote trace body" in message, message
        assert info.value.lineno == attack.line
    else:
        validate(source)  # passes the static checks: the run-time allowlist has to stop it
    answer, printed = run_request(served, source, attack.kind)
    text = repr(answer) + "".join(printed)
    assert secret not in text, "the secret came back"
    assert str(gpt2_dir) not in text, "the server's model folder came back"
    error = answer.get("error")
    if attack.outcome == "runs" and not attack.static:
        assert error is None, error
    else:
        assert error is not None, f"the attack ran: {answer}"
        # KeyError: a hidden key of a config copy; ModulePathError: no such attribute at all
        assert error["type"] in ("SandboxViolation", "NameError", "KeyError", "ModulePathError"), error
        assert attack.says in error["message"], error["message"]
        assert error["line"] is not None, error
    again, _ = run_request(served, CLEAN_SOURCE)
    assert_same_answer(again, fresh_answer)


@pytest.fixture(scope="module")
def fresh_generation(gpt2_dir) -> dict:
    answer, _ = run_request(LanguageModel(str(gpt2_dir), dispatch=True), CLEAN_GENERATE_SOURCE, "generate",
                            generate=dict(CLEAN_GENERATE_OPTIONS))
    assert "error" not in answer, answer
    assert len(answer["values"]["steps"]) == 3
    return answer


assert len(MUTATIONS) >= 30 and len({m.name for m in MUTATIONS}) == len(MUTATIONS), "the mutation corpus shrank"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mutation: mutation.name)
def test_nothing_a_body_changes_persists(mutation: Mutation, served, fresh_answer, fresh_generation):
    try:
        validate(mutation.source)
    except SandboxViolation:
        pass  # refused before running (execute() refuses it too)
    run_request(served, mutation.source, mutation.kind)
    assert_same_answer(run_request(served, CLEAN_SOURCE)[0], fresh_answer)
    generated, _ = run_request(served, CLEAN_GENERATE_SOURCE, "generate", generate=dict(CLEAN_GENERATE_OPTIONS))
    assert "error" not in generated, generated
    assert torch.equal(generated["values"]["tokens"], fresh_generation["values"]["tokens"])
    for a, b in zip(generated["values"]["steps"], fresh_generation["values"]["steps"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attack", OPTION_ATTACKS, ids=lambda attack: attack.name)
def test_request_options_are_allowlisted(attack):
    wire = request("x = 1", attack.kind, generate=dict(attack.generate), kwargs=dict(attack.kwargs)).to_wire()
    with pytest.raises(ProtocolError) as info:
        parse_request(wire)
    assert attack.says in str(info.value) and "remove it" in str(info.value)


def test_allowed_generation_options_pass():
    wire = request("x = 1", "generate", kwargs={"attention_mask": None}, generate={
        "max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "num_beams": 2,
        "repetition_penalty": 1.1, "no_repeat_ngram_size": 2, "stop_strings": ["."], "eos_token_id": 1,
        "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True, "min_new_tokens": 1}).to_wire()
    assert parse_request(wire).generate["num_beams"] == 2
    traced = request("x = 1", kwargs={"output_hidden_states": True, "output_attentions": False}).to_wire()
    assert parse_request(traced).kwargs == {"output_hidden_states": True, "output_attentions": False}


def test_nothing_of_a_body_stays_in_caches(served):
    """Line caches, parse caches and compiled blocks of a remote body are dropped when it ends."""
    big = "".join(f"v{i} = {i}\n" for i in range(20_000))
    body = big + "with tracer.invoke(PROMPT_TEXT):\n    h = model.transformer.h[0].output[0].save()\n"
    answer, _ = run_request(served, body, args=[], variables={"PROMPT_TEXT": PROMPT},
                            functions={"helper": "def helper(t):\n    return t * 2\n"})
    assert "error" not in answer, answer
    gc.collect()
    assert not [name for name in linecache.cache if str(name).startswith("remote:")]
    assert not [name for name in capture._parse_cache if name.startswith("remote:")]
    assert not [key for key in capture._cache if key[0].co_filename.startswith("remote:")]
    assert not capture._transforms


def test_each_request_draws_from_a_fresh_seed(served):
    draws = [run_request(served, "import torch\nr = torch.rand(4).save()")[0]["values"]["r"] for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    seeded = run_request(served, "import torch\ntorch.manual_seed(3)\nr = torch.rand(4).save()")[0]["values"]["r"]
    assert torch.equal(seeded, torch.rand(4, generator=torch.Generator().manual_seed(3)))


def test_views_are_copies_and_read_only(served):
    config = ConfigView(served._module.config)
    assert config.hidden_size == 32 == config.n_embd and "name_or_path" not in config.keys()
    config.to_dict()["n_layer"] = 99
    assert config.n_layer == 2
    with pytest.raises(SandboxViolation, match="read-only"):
        config.n_layer = 5
    tokenizer = TokenizerView(served.tokenizer)
    for view, name in ((config, "n_layer"), (tokenizer, "padding_side"), (module_proxy("torch"), "nn")):
        with pytest.raises(SandboxViolation, match="read-only"):
            delattr(view, name)  # deleting is changing too (one rule for every view: reach.ReadOnlyView)
    tokenizer.model_input_names.append("evil")
    assert served.tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert tokenizer("hi", return_tensors="pt")["input_ids"].shape == (1, 1)
    with pytest.raises(SandboxViolation, match="return_tensors"):
        tokenizer("hi", return_tensors="np")


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
    with pytest.raises(SandboxViolation, match="only .output, .input and .inputs of envoys"):
        run("F.output = print", F=functional)  # refused by the run-time allowlist
    with pytest.raises(SandboxViolation, match="modules are read-only"):
        functional.output = print  # and by the proxy itself


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
        first = run_body("import torch\nnoise = torch.randn(5)", {})["noise"]
        run_body("import torch\ntorch.manual_seed(1234)\nnoise = torch.randn(5)", {})
    assert torch.equal(torch.rand(3), expected)
    with isolated_rng_state():
        second = run_body("import torch\nnoise = torch.randn(5)", {})["noise"]
    assert not torch.equal(first, second)  # a fresh seed each time


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
        "import torch\n"
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
        "out = F.linear(x, torch.ones(2, 4))\n"
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
    """The body passes whole (its AST is the plain parse), and the same body
    with any one line turned into a forbidden construct is refused at that
    line: the checker reads every line, it does not wave bodies through."""
    assert ast.dump(validate(REALISTIC_BODY)) == ast.dump(ast.parse(REALISTIC_BODY))
    lines = REALISTIC_BODY.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.rstrip().endswith(":"):
            continue
        indent = line[: len(line) - len(line.lstrip())]
        broken = "\n".join(lines[: number - 1] + [indent + "leak = model.__class__"] + lines[number:])
        with pytest.raises(SandboxViolation, match=f"line {number}: `model.__class__`"):
            validate(broken)


ASSIGNABLE = ("model.fc1.output = h", "model.fc1.input = h", "model.fc1.inputs = (h,)", "h.grad = h",
              "h.output[:, 0] += 1")
# The same shapes of statement, on attributes that would reach past the envoys.
NOT_ASSIGNABLE = ("model.fc1.weight = h", "model.fc1.forward = h", "h.data = h", "h.requires_grad = True",
                  "model.fc1.output.foo = h")


@pytest.mark.parametrize("statement", ASSIGNABLE)
def test_assignable_attributes_pass_validation(statement):
    assert ast.dump(validate(statement)) == ast.dump(ast.parse(statement))


@pytest.mark.parametrize("statement", NOT_ASSIGNABLE)
def test_other_attribute_assignments_are_refused(statement):
    with pytest.raises(SandboxViolation, match=f"`{statement.split(' =')[0]}` is not allowed"):
        validate(statement)


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


RESEARCH_BODY = """import torch
import torch.nn.functional as F
layers = model.transformer.h
n = len(layers)
widths = [layer.mlp.c_fc.weight.shape[-1] for layer in layers]
heads = model.transformer.h[0].attn.num_heads
cfg = (model.config.n_layer, model.config.hidden_size, model.config.num_hidden_layers)
unembed = model.lm_head.weight.T.clone()
h0 = model.transformer.h[0].output
norms = h0.norm(dim=-1).tolist()
steer = torch.ones(h0.shape[-1], device=model.device) * 0.5
model.transformer.h[1].output[:, -1] += steer.to(h0.dtype)
logits = model.output.logits
probs = F.softmax(logits[:, -1], dim=-1)
top = probs.topk(5)
tokens = model.tokenizer.convert_ids_to_tokens(top.indices[0].tolist())
text = model.tokenizer.decode(top.indices[0, :2])
enc = model.tokenizer("hello there", return_tensors="pt")
shape = tuple(enc.input_ids.shape) + tuple(enc["attention_mask"].shape)
vals = {k: round(v, 6) for k, v in zip(tokens, top.values[0].tolist())}
summary = ", ".join(f"{k}={v:.4f}" for k, v in vals.items())
device = str(model.device) + model.device.type
tiny = h0.dtype.is_floating_point and torch.finfo(h0.dtype).eps > 0
saved_probs = probs.save()
"""
RESEARCH_NAMES = ("n", "widths", "heads", "cfg", "norms", "tokens", "text", "shape", "vals", "summary", "device",
                  "tiny", "saved_probs")


def test_research_code_runs_remotely_as_it_does_locally(served, gpt2_dir):
    """Everyday interpretability code passes the allowlist and gives the values of a local trace."""
    answer, _ = run_request(served, RESEARCH_BODY)
    assert "error" not in answer, answer
    local = LanguageModel(str(gpt2_dir), dispatch=True)
    namespace: dict = {"model": local}
    with local.trace(PROMPT):
        exec(compile(RESEARCH_BODY, "<research>", "exec"), namespace)  # noqa: S102 - the same text, locally
    for name in RESEARCH_NAMES:
        got, expected = answer["values"][name], namespace[name]
        if isinstance(expected, torch.Tensor):
            assert torch.equal(got, expected), name
        else:
            assert got == expected, name
