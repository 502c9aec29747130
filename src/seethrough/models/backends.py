"""Backends: what a trace calls on the batched inputs, all in one place.

A :class:`~seethrough.tracing.run.TraceRun` runs its bodies around one call
of a backend, ``backend(run, args, kwargs)``:

* :func:`forward_backend` — the model's forward (``model.trace``, and a
  remote trace on the server);
* :func:`scan_backend` — the forward on fake tensors (``model.scan``);
  :func:`lm_scan_backend` and :func:`meta_backend` are a language model's,
  with real weights and before they are loaded;
* :class:`GenerateBackend` — HuggingFace ``generate`` (``model.generate``).

A backend that calls the root module exactly once says so with
``single_call = True``: the trace then observes the root's output from the
backend's return value instead of a hook.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from ..errors import LanguageModelError, SeethroughError
from ..tracing.run import TraceRun
from .streaming import add_recorder

BackendFunction = Callable[[TraceRun, tuple, dict], Any]


def single_call(backend: BackendFunction) -> BackendFunction:
    """Mark ``backend`` as calling the root module once (its output is the return value)."""
    backend.single_call = True  # type: ignore[attr-defined]
    return backend


@single_call
def forward_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    """The model's own forward (``Model._run_forward``)."""
    return run.model._run_forward(args, kwargs)


def fake_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Call ``module`` on fake copies of the inputs: real shapes and dtypes, no
    compute, weights untouched (they take part as fake tensors too)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(value: Any) -> Any:
        return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    with mode:
        return module(*tree_map(fake, args), **tree_map(fake, kwargs))


@single_call
def scan_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    """``model.scan``: the forward on fake tensors."""
    return fake_forward(run.model._module, args, kwargs)


@single_call
def lm_scan_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    """``model.scan`` of a language model whose weights are loaded."""
    # Position ids are computed here, from the real mask: asking a fake mask
    # "is anything padded?" has no answer (`aten._local_scalar_dense`).  The
    # 2-D mask itself goes in as a fake tensor, which HuggingFace takes as it
    # is, so every module sees the shapes of a real forward.
    kwargs = run.model._positions(kwargs)
    try:
        return fake_forward(run.model._module, args, kwargs)
    except RuntimeError as error:
        if "data-dependent" in str(error).lower() or "DataDependent" in type(error).__name__:
            raise _explain_scan_failure(error) from None
        raise


@single_call
def meta_backend(run: TraceRun, args: tuple, kwargs: dict) -> Any:
    """Scan a language model whose weights are not loaded: everything on the meta device."""
    to_meta = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    kwargs = {k: to_meta(v) for k, v in _scan_inputs(run, kwargs).items()}
    try:
        return run.model._module(*(to_meta(a) for a in args), **kwargs)
    except RuntimeError as error:
        if "meta tensors" in str(error):
            raise _explain_scan_failure(error) from None
        raise


def _scan_inputs(run: TraceRun, kwargs: dict) -> dict:
    # Shapes without values cannot answer data-dependent questions such as
    # "is anything padded?", which HuggingFace asks of a 2-D attention mask.
    # A scan only needs shapes: position ids are computed from the real mask
    # first, then the mask is handed over in its 4-D form, which models take
    # as given.
    # Some models (Bloom's ALiBi, OPT's learned positions) take only the 2-D
    # form: for those a mask without padding is left out, and they build
    # their own from shapes alone (:func:`probe_meta_mask`).
    kwargs = run.model._positions(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        rows, length = mask.shape
        if not _MASK_FORMS.get(type(run.model._module), True) and not mask.is_meta and bool(mask.all()):
            return {k: v for k, v in kwargs.items() if k != "attention_mask"}
        kwargs = {**kwargs, "attention_mask": torch.zeros(rows, 1, length, length)}
    return kwargs


_MASK_FORMS: dict[type, bool] = {}


def probe_meta_mask(module: torch.nn.Module) -> bool:
    """Does this model class run on the meta device with a 4-D attention mask?
    Asked once per class, with a three-token meta forward; call it before a
    scan starts (outside any trace: the probe must meet no hooks)."""
    kind = type(module)
    if kind not in _MASK_FORMS:
        ids = torch.zeros(1, 3, dtype=torch.long, device="meta")
        try:
            module(input_ids=ids, attention_mask=torch.zeros(1, 1, 3, 3, device="meta"), use_cache=False)
            _MASK_FORMS[kind] = True
        except Exception:  # noqa: BLE001 - any failure means: not this form
            _MASK_FORMS[kind] = False
    return _MASK_FORMS[kind]


def _explain_scan_failure(error: Exception) -> LanguageModelError:
    return LanguageModelError(
        f"this model's forward needs real values where a scan has only shapes ({error}); "
        "run a real trace instead."
    )


class GenerateBackend:
    """Calls HuggingFace ``generate`` on the batched inputs (``model.generate``)."""

    def __init__(self, generate_kwargs: dict) -> None:
        self.generate_kwargs = generate_kwargs

    def __call__(self, run: TraceRun, args: tuple, kwargs: dict) -> Any:
        run.interleaver.hook(run.root_module, "input")  # steps are counted at the root's calls
        generate_kwargs = add_recorder(run, run.model._module, self.generate_kwargs)  # model.generator.streamer
        try:
            return run.model._module.generate(*args, **kwargs, **generate_kwargs)
        except (TypeError, ValueError) as error:
            if isinstance(error, SeethroughError):
                raise  # one of ours (from a body or a hook), not HuggingFace refusing a setting
            message = str(error)
            if "model_kwargs" in message or "generation" in message.lower() or "unexpected keyword" in message:
                raise LanguageModelError(
                    f"HuggingFace `generate` refused the settings {sorted(self.generate_kwargs)}: {message} "
                    "Check the spelling of the keyword arguments (see transformers.GenerationConfig)."
                ) from None
            raise
