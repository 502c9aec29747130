"""``model.generator.streamer``: the tokens HuggingFace ``generate`` streams.

``generate`` hands a streamer the prompt ids first (``put``), then the tokens
each step chose, then calls ``end()``.  A ``model.generate(...)`` run records
those ``put`` calls with a :class:`StepRecorder` given to ``generate`` as its
streamer (forwarding each call to the caller's own ``streamer=`` if there is
one, which then sees exactly what it would see alone).  In the body,
``model.generator.streamer.output`` is call number ``i`` at step ``i``, as in
nnsight: the prompt ids at step 0, then the token chosen by the step before.
Under beam search HuggingFace takes no streamer, and none is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._frames import where_user_is
from ..errors import LanguageModelError, NotInTraceError
from ..tracing.runtime import current_task
from ..tracing.values import narrow

if TYPE_CHECKING:
    from ..tracing.run import TraceRun


def task_of_trace(model: Any, what: str, hint: str) -> tuple[Any, "TraceRun"]:
    """The running task and its trace run, when that trace runs ``model``;
    else :class:`NotInTraceError` saying ``what`` was used outside it (``hint``: where to use it)."""
    task = current_task()
    run = task.run if task is not None else None
    if run is None or run.model._module is not model._module:
        raise NotInTraceError(f"`{what}` was used outside a trace ({where_user_is()}); {hint}")
    return task, run


class StepRecorder:
    """A HuggingFace streamer (``put``/``end``) that keeps what it was given,
    in order, and passes every call on to ``inner`` (the caller's streamer)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.puts: list[Any] = []

    def put(self, value: Any) -> None:
        self.puts.append(value)
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def add_recorder(run: "TraceRun", model: Any, generate_kwargs: dict) -> dict:
    """``generate_kwargs`` with a :class:`StepRecorder` as the streamer (kept
    on ``run``), unless the run uses beam search."""
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = generate_kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    if beams != 1:
        return generate_kwargs
    recorder = StepRecorder(generate_kwargs.get("streamer"))
    run.streamed = recorder
    return {**generate_kwargs, "streamer": recorder}


class Streamer:
    """``model.generator.streamer``: ``.output`` is what ``generate`` streamed
    at the current step (the prompt ids at step 0, then the token each step
    chose), this invoke's rows."""

    __slots__ = ("_model",)

    def __init__(self, model: Any) -> None:
        self._model = model

    @property
    def output(self) -> Any:
        task, run = task_of_trace(self._model, "model.generator.streamer.output",
                                  "read it inside `with model.generate(...):`, e.g. in `for step in tracer.iter[:]:`.")
        interleaver = run.interleaver
        if interleaver.step < 0 and not interleaver.forward_done:
            interleaver.wait_for_step(task, 0)  # the prompt is streamed before the first step
        recorder = getattr(run, "streamed", None)
        if recorder is None:
            raise LanguageModelError(
                f"`model.generator.streamer.output` ({where_user_is()}): this run streamed nothing "
                "(`model.trace(...)` has no generation, and HuggingFace takes no streamer under beam "
                "search, `num_beams` > 1). Read the generated ids with `tracer.result` instead."
            )
        index = max(interleaver.step, 0)
        if index >= len(recorder.puts):
            raise LanguageModelError(
                f"`model.generator.streamer.output` ({where_user_is()}): nothing was streamed for step "
                f"{index} (generate streamed {len(recorder.puts)} time(s)). Read it inside the step loop."
            )
        return run.present(narrow(recorder.puts[index], task.rows, interleaver.batch_size))

    def __repr__(self) -> str:
        return "<generator.streamer: `.output` is what generate streamed at this step>"
