"""Many traces, with and without errors, in shuffled orders, entered at varied
stack depths, across several wrapped models: the process must survive them all.

Each scenario runs one trace and checks what it must: the values against raw
PyTorch forward hooks when it succeeds, the exception type when it fails, and
afterwards that the model carries no hook and its next trace works.  The
errors cover the ones that once crashed the interpreter (a C++ error raised by
torch inside a trace body, e.g. ``tensor[999]``, after a trace entered at
another stack depth) and their relatives: shape errors in the forward pass
after an edit, OutOfOrderError, KeyboardInterrupt in a body, an exception in
a user's own forward hook, errors inside nested helper calls.

Used by tests/test_stacks.py (in-process, and as a script in a subprocess so
that a crash shows as a failed exit code), and runnable by hand::

    python tests/stress_traces.py --iterations 600 --seed 3
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

import seethrough


class Recurrent(nn.Module):
    """A cell called three times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return self.head(x)


def build_models() -> dict[str, tuple[Any, nn.Module, Callable[[random.Random], Any], Callable[[nn.Module], nn.Module]]]:
    """name -> (wrapper, raw module, input maker, the hooked submodule)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mlp = nn.Sequential(OrderedDict([("fc1", nn.Linear(5, 10)), ("act", nn.ReLU()), ("fc2", nn.Linear(10, 2))])).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)).eval()
    llama = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
    ).eval()
    rnn = Recurrent().eval()

    def ids(rng: random.Random) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[rng.randrange(256) for _ in range(rng.randint(2, 7))]])}

    return {
        "mlp": (seethrough.NNsight(mlp), mlp, lambda rng: torch.rand(rng.randint(1, 3), 5), lambda m: m.fc1),
        "gpt2": (seethrough.Model(gpt2), gpt2, ids, lambda m: m.transformer.h[0]),
        "llama": (seethrough.Model(llama), llama, ids, lambda m: m.model.layers[0]),
        "rnn": (seethrough.NNsight(rnn), rnn, lambda rng: torch.rand(2, 6), lambda m: m.cell),
    }


def _call(inputs: Any, module: nn.Module) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(inputs)


def _reference(raw: nn.Module, sub: nn.Module, inputs: Any) -> torch.Tensor:
    """The sub-module's first output in a plain forward, seen by a raw hook."""
    seen: list[torch.Tensor] = []
    handle = sub.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()) if not seen else None)
    try:
        with torch.no_grad():
            _call(inputs, raw)
    finally:
        handle.remove()
    return seen[0]


def _envoy(wrapper: Any, raw: nn.Module, sub: nn.Module) -> Any:
    for name, module in raw.named_modules():
        if module is sub:
            envoy = wrapper
            for part in name.split("."):
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
            return envoy
    raise AssertionError("sub-module not found")


def _trace(wrapper: Any, inputs: Any) -> Any:
    return wrapper.trace(**inputs) if isinstance(inputs, dict) else wrapper.trace(inputs)


def _helper_index(value: torch.Tensor) -> torch.Tensor:
    return _helper_deeper(value)


def _helper_deeper(value: torch.Tensor) -> torch.Tensor:
    return value[999]  # IndexError, raised by torch's C++ code


# Each scenario: (wrapper, raw, sub, inputs) -> the exception type it must raise, or None.
def ok_save(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> None:
    envoy = _envoy(wrapper, raw, sub)
    with torch.no_grad():
        with _trace(wrapper, inputs):
            hidden = envoy.output.save()
    assert torch.allclose(hidden, _reference(raw, sub, inputs), atol=1e-5)


def index_error(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with _trace(wrapper, inputs):
        bad = envoy.output[999].save()
    return IndexError


def index_error_in_helper(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with torch.no_grad():
        with _trace(wrapper, inputs):
            bad = _helper_index(envoy.output).save()
    return IndexError


def matmul_error(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with _trace(wrapper, inputs):
        bad = (envoy.output @ torch.ones(3, 3)).save()  # a shape error from torch's C++ code
    return RuntimeError


def forward_error_after_edit(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with torch.no_grad():
        with _trace(wrapper, inputs):
            # The wrong dtype: a later module fails inside the forward pass (a C++ error there).
            envoy.output = torch.zeros(envoy.output.shape, dtype=torch.float64)
    return RuntimeError


def out_of_order(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with torch.no_grad():
        with _trace(wrapper, inputs):
            last = wrapper.output.save()
            first = envoy.output.save()
    return seethrough.OutOfOrderError


def keyboard_interrupt(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)
    with torch.no_grad():
        with _trace(wrapper, inputs):
            hidden = envoy.output
            raise KeyboardInterrupt
    return KeyboardInterrupt


def error_in_user_hook(wrapper: Any, raw: nn.Module, sub: nn.Module, inputs: Any) -> type:
    envoy = _envoy(wrapper, raw, sub)

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        torch.zeros(2)[5]  # a C++ IndexError inside the forward pass

    handle = sub.register_forward_hook(hook)
    try:
        with torch.no_grad():
            with _trace(wrapper, inputs):
                hidden = envoy.output.save()
    finally:
        handle.remove()
    return IndexError


SCENARIOS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (ok_save, index_error, index_error_in_helper, matmul_error, forward_error_after_edit, out_of_order,
              keyboard_interrupt, error_in_user_hook)
}


def _at_depth(depth: int, function: Callable[[], Any]) -> Any:
    """``function()`` called ``depth`` calls deeper, through C code as well
    (the trace is entered at another C stack depth)."""
    if not depth:
        return function()
    kind = depth % 3
    if kind == 0:
        return list(map(lambda _: _at_depth(depth - 1, function), [0]))[0]
    if kind == 1:
        return sorted([0], key=lambda _: _at_depth(depth - 1, function) or 0) and None
    return _at_depth(depth - 1, function)


def litter(rng: random.Random) -> None:
    """Leave return addresses of torch's C++ code in the stack below the
    current frame (where a later, shallower trace's greenlets may look)."""
    _at_depth(rng.randint(0, 60), lambda: torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).sum())


def run_one(models: dict, model_name: str, scenario_name: str, depth: int, rng: random.Random) -> None:
    """One scenario on one model, entered ``depth`` calls deep; raises AssertionError on a wrong outcome."""
    wrapper, raw, make_input, pick = models[model_name]
    sub = pick(raw)
    inputs = make_input(rng)
    scenario = SCENARIOS[scenario_name]
    expected: Any = None
    raised: BaseException | None = None
    try:
        expected = _at_depth(depth, lambda: scenario(wrapper, raw, sub, inputs))
        if scenario_name == "ok_save":
            expected = None
    except BaseException as error:  # noqa: BLE001 - compared below (KeyboardInterrupt included)
        raised = error
    if scenario_name == "ok_save":
        assert raised is None, f"{model_name}/{scenario_name}: {raised!r}"
    else:
        wanted = {
            "index_error": IndexError, "index_error_in_helper": IndexError, "matmul_error": RuntimeError,
            "forward_error_after_edit": RuntimeError, "out_of_order": seethrough.OutOfOrderError,
            "keyboard_interrupt": KeyboardInterrupt, "error_in_user_hook": IndexError,
        }[scenario_name]
        assert expected is None, f"{model_name}/{scenario_name}: the trace did not raise"
        assert isinstance(raised, wanted), f"{model_name}/{scenario_name}: {raised!r} is not a {wanted.__name__}"
    for name, module in raw.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{model_name}: {name} keeps a hook"
    # The next trace still works and gives the raw-hook value.
    ok_save(wrapper, raw, sub, make_input(rng))


def plan(seed: int, iterations: int, models: dict) -> list[tuple[str, str, int]]:
    """A shuffled list of (model, scenario, depth): every pair at least once, then random ones."""
    rng = random.Random(seed)
    pairs = [(m, s) for m in models for s in SCENARIOS]
    runs = [(m, s, rng.randint(0, 40)) for m, s in pairs]
    while len(runs) < iterations:
        m, s = rng.choice(pairs)
        runs.append((m, s, rng.randint(0, 40)))
    rng.shuffle(runs)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = build_models()
    rng = random.Random(args.seed)
    runs = plan(args.seed, args.iterations, models)
    for model_name, scenario_name, depth in runs:
        litter(rng)
        run_one(models, model_name, scenario_name, depth, rng)
    print(f"stress: {len(runs)} traces over {len(models)} models and {len(SCENARIOS)} scenarios survived (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
