"""``with loss.backward():`` — read and edit gradients as the backward pass runs.

Inside this block (inside a trace body), ``h.grad`` of any tensor from the
forward pass waits until the backward pass has computed the gradient flowing
into ``h``, and returns it; assigning ``h.grad = g`` (or editing it in place)
changes the gradient that flows further back.  Gradients arrive in reverse
order of the forward pass, so read them in that order.  The gradient returned
is the live tensor that flows on: ``g = h.grad.save()`` followed by an edit of
``h.grad`` shows the edit in ``g`` (save ``h.grad.clone()`` to keep what
arrived).  An invoke's tensors are on the gradient path themselves (see
:func:`.values.rejoin`), so their gradients are exactly their own rows'.

The backward pass runs in a helper thread (on GPUs autograd calls hooks from
its own threads anyway), paused at each requested tensor's hook until the
body moves on.  Outside such a block, ``.grad`` and ``.backward()`` are the
ordinary PyTorch ones.
"""

from __future__ import annotations

import dis
import queue
import sys
import threading
from types import CodeType
from typing import TYPE_CHECKING, Any

import torch

from .._frames import where_user_is
from ..errors import OutOfOrderError, ShapeMismatchError
from .patches import ClassPatch
from .runtime import current_task

if TYPE_CHECKING:
    from .tasks import Task

_TENSOR_GRAD = torch._C.TensorBase.grad  # the C-level descriptor
_original_backward = torch.Tensor.backward
_WITH_OPS = {op for op in ("BEFORE_WITH", "LOAD_SPECIAL") if op in dis.opmap}
_next_ops: dict[tuple[CodeType, int], str] = {}


def used_in_with() -> bool:
    """True when the caller's caller's current call is the context expression
    of a ``with`` statement (``with loss.backward():``)."""
    frame = sys._getframe(2)
    key = (frame.f_code, frame.f_lasti)
    name = _next_ops.get(key)
    if name is None:
        # f_lasti is the CALL (3.13+) or its last inline cache entry (3.11/3.12):
        # the next real instruction comes after it either way.
        name = next(
            (ins.opname for ins in dis.get_instructions(frame.f_code) if ins.offset > frame.f_lasti and ins.opname != "CACHE"),
            "",
        )
        _next_ops[key] = name
    if name in _WITH_OPS:
        return True
    # 3.14 loads __enter__ with COPY + LOAD_SPECIAL after the call.
    return name == "COPY" and "LOAD_SPECIAL" in dis.opmap


class _GradProperty:
    """Replaces ``Tensor.grad`` while a backward block is open."""

    def __get__(self, tensor: Any, owner: Any = None) -> Any:
        if tensor is None:
            return self
        context = _active_context()
        if context is not None:
            return context.grad_of(tensor)
        return _TENSOR_GRAD.__get__(tensor, owner)

    def __set__(self, tensor: Any, value: Any) -> None:
        context = _active_context()
        if context is not None and (context.is_current(tensor) or tensor.grad_fn is not None):
            # `h.grad = g` inside the block: wait for h's gradient, then replace it.
            context.grad_of(tensor)
            context.replace_current(tensor, value)
            return
        _TENSOR_GRAD.__set__(tensor, value)

    def __delete__(self, tensor: Any) -> None:
        _TENSOR_GRAD.__delete__(tensor)


_contexts = threading.local()
_GRAD_PATCH = ClassPatch(torch.Tensor, "grad", _GradProperty())


def _active_context() -> "BackwardContext | None":
    stack = getattr(_contexts, "stack", None)
    return stack[-1] if stack else None


def _enter_grad_patch(context: "BackwardContext") -> None:
    _GRAD_PATCH.enter()
    stack = getattr(_contexts, "stack", None)
    if stack is None:
        stack = _contexts.stack = []
    stack.append(context)


def _exit_grad_patch(context: "BackwardContext") -> None:
    _contexts.stack.remove(context)
    _GRAD_PATCH.exit()


def _backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.backward`` while traces run: inside a trace body and used as
    ``with loss.backward():``, a context that pauses at each gradient; anywhere
    else, the ordinary backward pass."""
    task = current_task()
    if task is not None and used_in_with():
        return BackwardContext(task, self, args, kwargs)
    return _original_backward(self, *args, **kwargs)


# Installed by the traces whose bodies mention `backward` (each patch of the
# Tensor class costs every tensor attribute lookup a cache refill).
BACKWARD_PATCH = ClassPatch(torch.Tensor, "backward", _backward)


class _Abort(Exception):
    pass


class BackwardContext:
    """One ``with loss.backward():`` block."""

    def __init__(self, task: "Task", loss: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self.task = task
        self.loss = loss
        self.args = args
        self.kwargs = kwargs
        self._to_body: queue.Queue = queue.Queue()
        self._to_worker: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._handles: dict[int, Any] = {}
        self._current: tuple[int, Any] | None = None  # (tensor id, grad) paused now
        self._finished = False
        self._error: BaseException | None = None

    # -- the with block --------------------------------------------------------
    def __enter__(self) -> "BackwardContext":
        _enter_grad_patch(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc_type is None:
                self._run_to_end()
            else:
                self._abort()
        finally:
            _exit_grad_patch(self)
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()
            self._current = None
        if exc_type is None and self._error is not None:
            error, self._error = self._error, None
            raise error
        return False

    # -- requests from the body ----------------------------------------------------
    # An invoke's tensors are views of the batched values, put on the gradient
    # path of the forward pass (see `values.rejoin`): their own hooks give
    # exactly their rows' gradients.
    def is_current(self, tensor: torch.Tensor) -> bool:
        return self._current is not None and self._current[0] == id(tensor)

    def replace_current(self, tensor: torch.Tensor, grad: Any) -> None:
        tensor_id, old = self._current
        if isinstance(old, torch.Tensor) and isinstance(grad, torch.Tensor) and grad.shape != old.shape:
            raise ShapeMismatchError(
                f"cannot assign a gradient of shape {tuple(grad.shape)} {where_user_is()}: the "
                f"gradient it replaces has shape {tuple(old.shape)}."
            )
        self._current = (tensor_id, grad)

    def grad_of(self, tensor: torch.Tensor) -> Any:
        if self.is_current(tensor):
            return self._current[1]
        if not tensor.requires_grad:
            return _TENSOR_GRAD.__get__(tensor, type(tensor))
        if self._finished:
            raise OutOfOrderError(
                f"`.grad` was asked for {where_user_is()} after the backward pass had ended. "
                "Read gradients inside the `with loss.backward():` block, in reverse order of "
                "the forward pass (later layers first)."
            )
        key = id(tensor)
        if key not in self._handles:
            self._handles[key] = tensor.register_hook(self._make_hook(key))
        self._release_current()
        self._start()
        while True:
            message = self._to_body.get()
            if message[0] == "done":
                self._finished = True
                self._error = message[1]
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise OutOfOrderError(
                    f"the gradient of the tensor asked for {where_user_is()} never arrived: the "
                    "backward pass had already gone past it (read gradients in reverse order of "
                    "the forward pass: later layers first, and for one module's values in several "
                    "invokes the later invoke's first; or use one backward block per invoke with "
                    "`retain_graph=True`), or the loss does not depend on it."
                )
            _, tensor_id, grad = message
            if tensor_id == key:
                self._current = (tensor_id, grad)
                return grad
            self._to_worker.put(grad)  # a tensor asked for earlier, already read

    # -- the worker thread -----------------------------------------------------
    def _make_hook(self, key: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if torch._debug_has_internal_overlap(grad):
                # e.g. the gradient of `h.sum()`, a broadcast: give the body one
                # it can edit in place (`h.grad[:] = 0`), same values.
                grad = grad.clone()
            self._to_body.put(("grad", key, grad))
            answer = self._to_worker.get()
            if isinstance(answer, _Abort):
                raise answer
            return answer

        return hook

    def _start(self) -> None:
        if self._thread is not None:
            return
        def work() -> None:
            try:
                _original_backward(self.loss, *self.args, **self.kwargs)
            except _Abort:
                self._to_body.put(("done", None))
                return
            except BaseException as error:  # noqa: BLE001 - handed to the body thread
                self._to_body.put(("done", error))
                return
            self._to_body.put(("done", None))

        self._thread = threading.Thread(target=work, name="seethrough-backward", daemon=True)
        self._thread.start()

    def _release_current(self) -> None:
        if self._current is not None:
            _, grad = self._current
            self._current = None
            self._to_worker.put(grad)

    def _run_to_end(self) -> None:
        self._release_current()
        self._start()
        while not self._finished:
            message = self._to_body.get()
            if message[0] == "done":
                self._finished = True
                self._error = message[1]
            else:
                self._to_worker.put(message[2])
        self._thread.join()

    def _abort(self) -> None:
        if self._thread is None or self._finished:
            return
        if self._current is not None:
            self._current = None
            self._to_worker.put(_Abort())
        while not self._finished:
            message = self._to_body.get()
            if message[0] == "done":
                self._finished = True
            else:
                self._to_worker.put(_Abort())
        self._thread.join()
