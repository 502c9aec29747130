"""``model.harvest(..., remote=True)``: every micro-batch is an ordinary remote trace.

The harvest body is rewritten once, keeping its line numbers: each
``run.keep("name", EXPR)`` statement becomes ``harvest_keep_<i> = (EXPR).save()``,
so the server runs a plain trace body under every rule it applies to any
request (sandbox, quotas, size limits).  Each micro-batch's padded token ids
and mask travel as the request's input; up to ``in_flight`` requests run at
once; the saved values come back and go through the same ``run.keep`` as a
local harvest (padding dropped, dtype cast), into the same store format.
Resuming, refusing another run's store and bucketing work as locally.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
from typing import Any

import torch

from ..errors import UsageValueError
from ..tracing.capture import CapturedBlock
from .keep import BatchHandle, PER
from .run import Harvest, _digest

KEEP_PREFIX = "harvest_keep_"
REMOTE_TOKEN_BUDGET = 2048  # batch_size="auto" remotely: the server's memory is not ours to measure


def rewrite_keeps(captured: CapturedBlock) -> tuple[str, list[tuple[str, str, str | None]]]:
    """(new body source, [(variable, kept name, per)]) for a remote harvest body."""
    source = captured.body_source
    as_name = captured.as_name
    where = f"the harvest body at {captured.filename}:{captured.with_lineno}"
    if as_name is None:
        raise UsageValueError(f"{where} has no `as` name: write `with model.harvest(...) as run:` and keep values with `run.keep(...)`.")
    tree = ast.parse(source)
    keeps: list[tuple[ast.Call, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            call = node.value
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "keep" and isinstance(func.value, ast.Name) and func.value.id == as_name:
                if len(call.args) != 2 or not (isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                    raise UsageValueError(
                        f"{where}, line {captured.body_first_line + call.lineno - 1}: in a remote harvest, "
                        f"`{as_name}.keep(...)` takes a literal name and a value: `{as_name}.keep(\"resid5\", model.model.layers[5].output)`."
                    )
                per = None
                for keyword in call.keywords:
                    if keyword.arg != "per" or not (isinstance(keyword.value, ast.Constant) and keyword.value.value in PER):
                        raise UsageValueError(f"{where}: in a remote harvest, `{as_name}.keep` takes only `per='token'` or `per='prompt'` as a keyword.")
                    per = keyword.value.value
                keeps.append((call, call.args[0].value, per))
    allowed = {id(call.func.value) for call, _, _ in keeps}
    for node in ast.walk(tree):  # `run.stop()` is the server tracer's own stop: it stays
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stop" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == as_name and not node.args:
            allowed.add(id(node.func.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == as_name:
            parent_ok = id(node) in allowed
            if not parent_ok:
                raise UsageValueError(
                    f"{where}, line {captured.body_first_line + node.lineno - 1}: a remote harvest body uses "
                    f"`{as_name}` only in `{as_name}.keep(...)` statements and `{as_name}.stop()` (the micro-batch itself stays on your machine)."
                )
    if not keeps:
        raise UsageValueError(f"{where} keeps nothing: call `{as_name}.keep(name, value)` for what the store should hold.")
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line.encode()))
    data = source.encode()

    def offset(lineno: int, col: int) -> int:
        return starts[lineno - 1] + col

    out = data
    plan = []
    for number, (call, name, per) in enumerate(keeps):
        value = call.args[1]
        expr = data[offset(value.lineno, value.col_offset) : offset(value.end_lineno, value.end_col_offset)]
        span = (offset(call.lineno, call.col_offset), offset(call.end_lineno, call.end_col_offset))
        plan.append((span, f"{KEEP_PREFIX}{number} = (".encode() + expr + b").save()"))
    for (start, end), text in sorted(plan, reverse=True):
        out = out[:start] + text + out[end:]
    return out.decode(), [(f"{KEEP_PREFIX}{number}", name, per) for number, (_, name, per) in enumerate(keeps)]


class RemoteHarvest(Harvest):
    """``model.harvest(..., remote=True)``."""

    def __init__(self, model: Any, prompts: Any, *, remote: Any, in_flight: int = 4, host: str | None = None,
                 api_key: str | None = None, **options: Any) -> None:
        super().__init__(model, prompts, **options)
        if not isinstance(in_flight, int) or in_flight < 1:
            raise UsageValueError(f"in_flight={in_flight!r}: pass a positive int (requests at once).")
        if remote == "local":
            raise UsageValueError("model.harvest(..., remote='local') is not supported; use remote=True with a server, or a local harvest.")
        if self.grad:
            raise UsageValueError("a remote harvest computes no gradients (grad=True); run it locally.")
        if self.max_memory is not None:
            raise UsageValueError(
                "max_memory= sizes micro-batches to this machine's memory; a remote harvest runs on the server: "
                "pass an int batch_size, or leave batch_size='auto' (up to 2,048 tokens per request)."
            )
        self.in_flight = in_flight
        self.host = host
        self.api_key = api_key

    def _prepare(self, captured: CapturedBlock, seed: dict, globals_: dict) -> None:
        from ..remote.client.connection import RemoteClient
        from ..remote.client.collect import build_request

        source, self._keeps = rewrite_keeps(captured)
        self._client = RemoteClient(self.host, self.api_key)  # as the model resolved them (LanguageModel.harvest)
        probe = torch.zeros((1, 1), dtype=torch.long)
        template = build_request(kind="trace", model=self.model, captured=captured, seed=seed, globals_=globals_,
                                 args=({"input_ids": probe, "attention_mask": probe},))
        self._template = dataclasses.replace(template, source=source)

    def _model_signature(self) -> str:
        from ..remote.client.collect import remote_name

        return "remote:" + _digest([remote_name(self.model)])

    def _token_budget(self, rows: Any, writer: Any, progress: Any) -> int | None:
        if self.batch_size != "auto":
            return None
        if "token_budget" not in writer.settings:
            tokens = REMOTE_TOKEN_BUDGET
            writer.set_settings(token_budget=tokens)
            progress.note(f"batch_size='auto' (remote): micro-batches of up to {tokens:,} tokens, {self.in_flight} in flight")
        return int(writer.settings["token_budget"])

    def _start(self, context: tuple, batch: Any) -> Any:
        from ..remote import wire
        from ..remote.client.connection import MAX_REQUEST_BYTES, RemoteJob

        request = dataclasses.replace(self._template, args=[{"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}])
        payload = wire.pack(request.to_wire(), max_bytes=MAX_REQUEST_BYTES)
        return RemoteJob(self._client, self._client.submit(payload)["id"])

    def _finish(self, context: tuple, batch: Any, job: Any) -> dict:
        from ..remote.client.connection import RemoteError

        state, first = context[3], context[4]
        try:
            answer = job.wait(show=False)
        finally:
            with contextlib.suppress(RemoteError):
                job.delete()
        values = answer.get("values", {})
        handle = BatchHandle(state, batch, torch.tensor(batch.rows) + first)
        for variable, name, per in self._keeps:
            if variable not in values:
                raise UsageValueError(f"the server sent no value for `run.keep({name!r}, ...)`; was that line skipped (an `if`)?")
            handle.keep(name, values[variable], per)
        return handle.kept

    def _abandon(self, pending: Any) -> None:
        from ..remote.client.connection import RemoteError

        for _, _, job in pending:
            with contextlib.suppress(RemoteError, OSError):
                job.delete()
