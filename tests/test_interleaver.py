"""The interleaver alone: built with small real collaborators on a plain torch
module, no model wrapper, no tracer, no captured source.

Each body is a function run as a :class:`Task`; it asks the interleaver for
values (``request``) and replaces them (``assign``) as trace bodies do.  The
reference is raw PyTorch forward hooks on the same module: what a hook sees,
and what the forward returns when a hook edits a value.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from seethrough.errors import InvokeError, OutOfOrderError
from seethrough.tracing.cache import Cache
from seethrough.tracing.hooks import ModuleTree
from seethrough.tracing.interleaver import Interleaver
from seethrough.tracing.tasks import Task

_CALL = compile("work()", "<interleaver test body>", "exec")


class Handle:
    """The smallest envoy: what the interleaver reads of one (``ModuleHandle``)."""

    def __init__(self, module: nn.Module, path: str) -> None:
        self._module = module
        self._path = path

    def _display_path(self) -> str:
        return f"net.{self._path}"

    def _remembered_hook_plan(self, plan_of):
        return plan_of(self._module)  # kept by a real envoy across traces; here worked out each time


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _interleaver(root: nn.Module, **collaborators: Any) -> Interleaver:
    return Interleaver(root, ModuleTree(root).hook_plan, **collaborators)


def _task(interleaver: Interleaver, body: Callable[[Task], None], rows: slice | None = None, is_invoke: bool = True) -> Task:
    ns: dict[str, Any] = {}
    task = Task(None, 0, f"body {len(interleaver.tasks) + 1}", _CALL, ns, rows, frozenset(), is_invoke)  # type: ignore[arg-type]
    ns["work"] = lambda: body(task)
    interleaver.add(task)
    return task


def _run(interleaver: Interleaver, root: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> Any:
    """What a trace run does: start the bodies, run the forward with them, close."""
    interleaver.batch_size = batch_size if batch_size is not None else x.shape[0]
    try:
        for task in interleaver.tasks:
            interleaver.start(task)
        return interleaver.run_forward(root, x)
    finally:
        interleaver.close()


def _raw_hook_run(root: nn.Module, module: nn.Module, x: torch.Tensor, edit: Callable | None = None) -> tuple[Any, Any]:
    """``root(x)`` with a raw forward hook on ``module``: (what the hook saw, the output)."""
    seen = {}

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        seen["output"] = output.clone()
        return edit(output) if edit is not None else None

    handle = module.register_forward_hook(hook)
    try:
        out = root(x)
    finally:
        handle.remove()
    return seen["output"], out


def _no_hooks_left(root: nn.Module) -> None:
    for name, module in root.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def test_a_requested_output_is_what_a_raw_hook_sees(net):
    x = torch.randn(2, 4)
    raw_seen, raw_out = _raw_hook_run(net, net[2], x)
    raw_first, _ = _raw_hook_run(net, net[0], x)
    got = {}

    def body(task: Task) -> None:
        got["first"] = interleaver.request(task, Handle(net[0], "0"), "output").clone()
        got["last"] = interleaver.request(task, Handle(net[2], "2"), "output").clone()

    interleaver = _interleaver(net)
    _task(interleaver, body)
    out = _run(interleaver, net, x)
    assert torch.equal(got["first"], raw_first)
    assert torch.equal(got["last"], raw_seen)
    assert torch.equal(out, raw_out)
    _no_hooks_left(net)


def test_a_requested_input_is_what_a_raw_pre_hook_sees(net):
    x = torch.randn(2, 4)
    seen = {}
    handle = net[2].register_forward_pre_hook(lambda mod, args: seen.setdefault("args", args[0].clone()))
    net(x)
    handle.remove()
    got = {}

    def body(task: Task) -> None:
        args, kwargs = interleaver.request(task, Handle(net[2], "2"), "input")
        got["args"], got["kwargs"] = args[0].clone(), kwargs

    interleaver = _interleaver(net)
    _task(interleaver, body)
    _run(interleaver, net, x)
    assert torch.equal(got["args"], seen["args"]) and got["kwargs"] == {}
    _no_hooks_left(net)


def test_an_assigned_output_changes_the_forward_as_a_raw_hook_edit_does(net):
    x = torch.randn(3, 4)
    _, raw_out = _raw_hook_run(net, net[0], x, edit=lambda output: output * 2 - 1)
    _, plain_out = _raw_hook_run(net, net[0], x)
    assert not torch.allclose(raw_out, plain_out)  # the edit matters

    def body(task: Task) -> None:
        handle = Handle(net[0], "0")
        hidden = interleaver.request(task, handle, "output")
        interleaver.assign(task, handle, "output", hidden * 2 - 1, "output")

    interleaver = _interleaver(net)
    _task(interleaver, body)
    out = _run(interleaver, net, x)
    assert torch.equal(out, raw_out)
    _no_hooks_left(net)


def test_a_body_edits_in_place_in_the_forwards_no_grad_mode(net):
    # generate() runs its forwards under no_grad while the body was written with grad
    # on: an in-place edit with a leaf that requires grad works as in a raw hook there.
    x = torch.randn(2, 4)
    v = (torch.randn(8) * 3).requires_grad_()

    def edit(output: torch.Tensor) -> None:
        output[-1] += v  # a view of the output, edited in place

    with torch.no_grad():
        _, raw_out = _raw_hook_run(net, net[0], x, edit=lambda output: edit(output))
    modes = {}

    def body(task: Task) -> None:
        modes["before"] = torch.is_grad_enabled()
        edit(interleaver.request(task, Handle(net[0], "0"), "output"))
        modes["at the edit"] = torch.is_grad_enabled()
        with torch.enable_grad():  # a mode the body sets itself holds until it waits
            modes["own"] = torch.is_grad_enabled()

    interleaver = _interleaver(net)
    assert torch.is_grad_enabled()
    _task(interleaver, body)
    with torch.no_grad():
        out = _run(interleaver, net, x)
    assert modes == {"before": False, "at the edit": False, "own": True}
    assert torch.is_grad_enabled()
    assert torch.equal(out, raw_out) and not out.requires_grad
    _no_hooks_left(net)


def test_a_bodys_own_no_grad_holds_across_waits_in_a_grad_forward(net):
    x = torch.randn(2, 4)
    modes = []

    def body(task: Task) -> None:
        with torch.no_grad():
            interleaver.request(task, Handle(net[0], "0"), "output")
            modes.append(torch.is_grad_enabled())
            interleaver.request(task, Handle(net[2], "2"), "output")
            modes.append(torch.is_grad_enabled())
        modes.append(torch.is_grad_enabled())

    interleaver = _interleaver(net)
    _task(interleaver, body)
    out = _run(interleaver, net, x)
    assert modes == [False, False, True]
    assert out.requires_grad  # the forward kept its own mode


def test_each_task_sees_and_edits_only_its_rows(net):
    x = torch.randn(3, 4)
    raw_first, _ = _raw_hook_run(net, net[0], x)

    def edit_rows_1_to_3(output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[1:3] = 0
        return output

    _, raw_out = _raw_hook_run(net, net[0], x, edit=edit_rows_1_to_3)
    got = {}

    def reader(task: Task) -> None:
        got["a"] = interleaver.request(task, Handle(net[0], "0"), "output").clone()

    def zeroer(task: Task) -> None:
        handle = Handle(net[0], "0")
        got["b"] = interleaver.request(task, handle, "output").clone()
        interleaver.assign(task, handle, "output", torch.zeros(2, 8), "output")

    interleaver = _interleaver(net)
    _task(interleaver, reader, rows=slice(0, 1))
    _task(interleaver, zeroer, rows=slice(1, 3))
    out = _run(interleaver, net, x)
    assert torch.equal(got["a"], raw_first[0:1]) and torch.equal(got["b"], raw_first[1:3])
    assert torch.equal(out, raw_out)


def test_an_out_of_order_request_raises_at_the_bodys_line(net):
    x = torch.randn(2, 4)

    def body(task: Task) -> None:
        interleaver.request(task, Handle(net[2], "2"), "output")
        interleaver.request(task, Handle(net[0], "0"), "output")  # ran before net[2]: never comes again

    interleaver = _interleaver(net)
    _task(interleaver, body)
    with pytest.raises(OutOfOrderError) as info:
        _run(interleaver, net, x)
    message = str(info.value)
    assert "`net.0.output`" in message and "had already run" in message
    _no_hooks_left(net)


def test_a_request_after_the_forward_raises(net):
    x = torch.randn(2, 4)

    def body(task: Task) -> None:
        interleaver.request_result(task)  # wait until the forward has returned
        interleaver.request(task, Handle(net[0], "0"), "output")

    interleaver = _interleaver(net)
    _task(interleaver, body)
    with pytest.raises(OutOfOrderError, match="already finished"):
        _run(interleaver, net, x)


def test_the_result_is_what_the_forward_returned(net):
    x = torch.randn(2, 4)
    got = {}

    def body(task: Task) -> None:
        got["result"] = interleaver.request_result(task)

    interleaver = _interleaver(net)
    _task(interleaver, body)
    out = _run(interleaver, net, x)
    assert got["result"] is out and torch.equal(out, net(x))


def test_the_outside_invoke_message_comes_from_its_collaborator(net):
    def body(task: Task) -> None:
        interleaver.request(task, Handle(net[0], "0"), "output")

    interleaver = _interleaver(net, outside_invoke=lambda envoy, kind: f"no invoke reads {envoy._display_path()}.{kind}")
    _task(interleaver, body, is_invoke=False)
    with pytest.raises(InvokeError, match=r"no invoke reads net\.0\.output"):
        _run(interleaver, net, torch.randn(2, 4))


def test_a_task_still_blocked_at_the_end_gets_its_blockers_error(net):
    class Stuck(Exception):
        pass

    def body(task: Task) -> None:
        interleaver.block(task, lambda: False, lambda: Stuck(task.label))  # a condition that never holds

    interleaver = _interleaver(net)
    _task(interleaver, body)
    with pytest.raises(Stuck, match="body 1"):
        _run(interleaver, net, torch.randn(2, 4))


def test_a_task_still_blocked_without_an_error_of_its_blocker_gets_a_plain_one(net):
    def body(task: Task) -> None:
        interleaver.block(task, lambda: False)

    interleaver = _interleaver(net)
    _task(interleaver, body)
    with pytest.raises(InvokeError, match="body 1 was still waiting when the forward pass ended"):
        _run(interleaver, net, torch.randn(2, 4))


def test_a_cache_serves_values_after_their_module_ran(net):
    x = torch.randn(2, 4)
    raw_first, _ = _raw_hook_run(net, net[0], x)
    first = Handle(net[0], "0")
    cache = Cache([first], include_output=True, include_inputs=False, keep_graph=False)
    got = {}

    def body(task: Task) -> None:
        interleaver.request(task, Handle(net[2], "2"), "output")
        got["first"] = interleaver.request(task, first, "output")  # net[0] ran before: from the cache

    interleaver = _interleaver(net)
    interleaver.add_cache(cache)
    _task(interleaver, body)
    _run(interleaver, net, x)
    assert torch.equal(got["first"], raw_first)
    assert torch.equal(cache["model.0"].output, raw_first)


def test_hooking_a_module_hooks_its_ancestors_and_nothing_else():
    inner = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    root = nn.Sequential(nn.Linear(2, 2), inner)
    plan, chain = ModuleTree(root).hook_plan(inner[1])
    assert [module for module, _ in plan] == [inner[1], inner, root] and chain
    assert [key for _, key in plan] == [(id(m), "output") for m in (inner[1], inner, root)]
    shared = nn.Linear(2, 2)
    twice = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    plan, chain = ModuleTree(twice).hook_plan(shared)
    assert {id(m) for m, _ in plan} == {id(shared), id(twice["a"]), id(twice["b"]), id(twice)} and not chain

    interleaver = _interleaver(root)

    def body(task: Task) -> None:
        interleaver.request(task, Handle(inner[1], "1.1"), "output")
        hooked = [name for name, module in root.named_modules() if module._forward_hooks]
        assert hooked == ["", "1", "1.1"]

    _task(interleaver, body)
    _run(interleaver, root, torch.randn(1, 2))
    _no_hooks_left(root)
