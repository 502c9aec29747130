"""``with model.harvest(prompts, to=folder) as run:`` — one trace body over many prompts.

Entering the block captures its body exactly as ``model.trace`` does (see
:mod:`seethrough.tracing.capture`); leaving it reads the prompts window by
window, cuts each window into micro-batches (:mod:`.batching`) and runs the
captured body once per micro-batch through an ordinary
:class:`~seethrough.tracing.run.TraceRun` — so saves, edits and everything
else a trace body does work unchanged.  What the body keeps
(``run.keep(...)``, :mod:`.keep`) is put back in input order and written as
one shard per window (:mod:`.store`).  A second run of the same call on the
same folder skips the shards already complete and checks that their inputs
are the same.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import weakref
from collections import deque
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .._frames import hide_library_frames
from ..errors import InvokeError, SeethroughError, TraceSourceError, UsageValueError
from ..tracing.takeover import Takeover, frame_namespace, write_back
from . import batching, inputs as prompts_in
from .keep import BatchHandle, KeepState, WindowRows, dtype_name, keys_of, resolve_dtype
from .progress import Progress
from .store import HarvestStore, HarvestStoreError, StoreWriter, load


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


_signatures: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_SAMPLE = 4096  # elements of each weight read for its checksum


def model_signature(module: torch.nn.Module) -> str:
    """Class, config, every weight's name and shape, and a checksum of up to
    4,096 evenly spread elements of each weight: a store belongs to one model.
    Cached while no weight is replaced or changed in place (their versions)."""
    params = list(module.named_parameters())
    state = tuple((id(p), p._version) for _, p in params)
    cached = _signatures.get(module)
    if cached is not None and cached[0] == state:
        return cached[1]
    config = getattr(module, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    digest = hashlib.sha256()
    digest.update(type(module).__name__.encode())
    digest.update(text.encode())
    with torch.no_grad():
        for name, param in params:
            flat = param.detach().reshape(-1)
            if flat.numel() > _SAMPLE:
                flat = flat[torch.arange(_SAMPLE, device=flat.device) * (flat.numel() - 1) // (_SAMPLE - 1)]
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            digest.update(flat.float().cpu().numpy().tobytes())
    signature = digest.hexdigest()[:32]
    _signatures[module] = (state, signature)
    return signature


def _value_digest(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [str(value.dtype), list(value.shape), hashlib.sha256(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]]
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return None


@dataclass(frozen=True)
class Padding:
    """How the wrapper pads prompts of unequal length: ``side()`` (``"left"`` or
    ``"right"``, used when ``padding_side=`` is not given) and ``token()`` (the
    pad token id).  The wrapper gives both (:meth:`LanguageModel.harvest`): this
    package sits below the wrappers and asks them nothing else."""

    side: Callable[[], str]
    token: Callable[[], int]


class Harvest:
    """``model.harvest(...)``; see :meth:`seethrough.LanguageModel.harvest`."""

    def __init__(
        self,
        model: Any,  # a seethrough.LanguageModel (this package sits below the wrappers)
        prompts: Iterable,
        *,
        to: str | Path,
        batch_size: int | str = "auto",
        max_length: int | None = None,
        dtype: Any = None,
        bucket: bool = True,
        window: int = 256,
        max_memory: int | str | None = None,
        padding_side: str | None = None,
        grad: bool = False,
        progress: bool = True,
        overwrite: bool = False,
        backend: Any = None,
        padding: Padding,
    ) -> None:
        if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0)):
            raise UsageValueError(f"batch_size={batch_size!r}: pass a positive int, or 'auto' to fit a memory budget.")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise UsageValueError(f"max_length={max_length!r}: pass a positive int (tokens per prompt), or None for no truncation.")
        if not isinstance(window, int) or window < 1:
            raise UsageValueError(f"window={window!r}: pass a positive int (prompts per shard).")
        if padding_side not in (None, "left", "right"):
            raise UsageValueError(f"padding_side={padding_side!r}: 'left', 'right', or None for the model's.")
        if to is None:
            raise UsageValueError("model.harvest(...) needs `to=`: the folder the store is written to.")
        self.model = model
        self.padding = padding
        self.prompts = prompts_in.check_inputs(prompts)
        self.total = prompts_in.count_of(prompts)
        self.to = Path(to)
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = resolve_dtype(dtype)
        self.bucket = bucket
        self.window = window
        self.max_memory = batching.parse_memory(max_memory)
        self.padding_side = padding_side
        self.grad = grad
        self.show_progress = progress
        self.overwrite = overwrite
        self.backend = backend  # how a micro-batch's trace calls the model (the wrapper's forward)
        self.summary: dict[str, Any] = {}
        self._takeover: Takeover | None = None

    # -- the with block -----------------------------------------------------------
    def __enter__(self) -> "Harvest":
        if self._takeover is not None:
            raise SeethroughError("this harvest is already running; each `with model.harvest(...)` needs its own.")
        self._takeover = Takeover.of_block(sys._getframe(1), "model.harvest(...)")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        takeover, self._takeover = self._takeover, None
        if not takeover.end(exc_type):
            if exc_type is None:
                raise TraceSourceError("the body of `with model.harvest(...)` ran without seethrough (a debugger stepping over it?).")
            return False
        captured = takeover.captured
        frame = takeover.frame
        seed, globals_, _ = frame_namespace(frame)
        if captured.as_name:
            write_back(frame, {captured.as_name: self})  # `as run`: this harvest, after the block
        del frame
        if captured.uses_invoke:
            raise InvokeError(
                f"the harvest body at {captured.filename}:{captured.with_lineno} opens `invoke` blocks; a harvest "
                "body runs once per micro-batch of the harvest's prompts, so put every input in the prompts."
            )
        if "backward" in captured.attributes and not self.grad:
            raise UsageValueError("the harvest body calls `.backward()`: pass `grad=True` to model.harvest(...) so gradients are computed.")
        try:
            self._run(captured, seed, globals_)
        except BaseException as error:
            hide_library_frames(error)
            del error
            raise
        return True

    # -- running --------------------------------------------------------------------
    def _fingerprint(self, captured: Any, seed: dict, globals_: dict, model_sig: str) -> dict:
        used = {}
        for name in sorted(captured.loaded):
            if name in seed or name in globals_:
                digest = _value_digest(seed[name] if name in seed else globals_[name])
                if digest is not None:
                    used[name] = digest
        return {
            "model": model_sig,
            "body": captured.body_source,
            "body_values": _digest(used),
            "max_length": self.max_length,
            "dtype": dtype_name(self.dtype) if self.dtype is not None else None,
            "window": self.window,
            "bucket": self.bucket,
            "batch_size": self.batch_size,
            "padding_side": self._side(),
            "grad": self.grad,
        }

    def _prepare(self, captured: Any, seed: dict, globals_: dict) -> None:
        """Before the first micro-batch: the weights are loaded here."""
        self.model.dispatch()

    def _model_signature(self) -> str:
        return model_signature(self.model._module)

    def _side(self) -> str:
        return self.padding_side or self.padding.side()

    def _run(self, captured: Any, seed: dict, globals_: dict) -> None:
        model = self.model
        self._prepare(captured, seed, globals_)
        writer = StoreWriter(self.to, self._fingerprint(captured, seed, globals_, self._model_signature()), self.overwrite)
        self.writer = writer
        done = list(writer.done_shards)  # complete before this run
        state = KeepState(self.dtype)
        if writer.manifest.get("keys") is not None:
            state.keys = writer.manifest["keys"]
            state.per = {name: info["per"] for name, info in state.keys.items()}
        progress = Progress(self.total, self.show_progress)
        self.progress = progress
        tokenizer = model.tokenizer
        right = self._side() == "right"
        written = resumed = 0
        start = time.perf_counter()
        try:
            for number, items in enumerate(prompts_in.windows(self.prompts, self.window)):
                first = number * self.window
                rows = prompts_in.tokenize(items, tokenizer, self.max_length, first)
                sha = prompts_in.ids_sha(rows)
                if number < len(done):
                    if done[number]["inputs_sha"] != sha or done[number]["prompts"] != [first, first + len(rows)]:
                        raise HarvestStoreError(
                            f"`to={str(self.to)!r}` holds a store made from other prompts (prompts {first}..{first + len(rows) - 1} "
                            "differ); shards of two runs are never mixed. Use another folder, or `overwrite=True`."
                        )
                    progress.skip(len(rows))
                    resumed += 1
                    continue
                if number == len(done) and done:
                    progress.note(f"resuming after {len(done)} complete shards ({first:,} prompts)")
                pad_id = self.padding.token() if any(len(r) != len(rows[0]) for r in rows) else 0
                tensors, tokens = self._window(captured, seed, globals_, state, rows, first, pad_id, right, progress)
                size = writer.write_shard(tensors, (first, first + len(rows)), tokens, sha)
                written += 1
                progress.update(written=size)
        except KeyboardInterrupt:
            progress.note(
                f"interrupted: {len(writer.done_shards)} complete shards kept in {str(self.to)!r}; "
                "run the same call again to resume"
            )
            raise
        seen = resumed + written
        if seen < len(done):
            raise HarvestStoreError(
                f"`to={str(self.to)!r}` holds {len(done)} shards, more than these prompts make ({seen}): it was made from "
                "a longer input. Use another folder, or `overwrite=True`."
            )
        if state.keys is None:  # no prompts at all
            state.keys = {}
        writer.check_keys(state.keys)
        writer.finish()
        if resumed and not written:
            progress.note(f"all {resumed} shards in {str(self.to)!r} were complete already; nothing computed")
        progress.close()
        self.summary = {
            **self.summary,
            "prompts": progress.prompts, "tokens": writer.manifest["tokens"], "tokens_computed": progress.tokens,
            "seconds": time.perf_counter() - start,
            "shards_written": written, "shards_resumed": resumed, **writer.settings,
        }

    def _token_budget(self, rows: list[list[int]], writer: StoreWriter, progress: Progress) -> int | None:
        if self.batch_size != "auto":
            return None
        settings = writer.settings
        if "token_budget" in settings:
            return int(settings["token_budget"])
        length = self.max_length or max(len(r) for r in rows)
        device = self.model._module.device if hasattr(self.model._module, "device") else torch.device("cpu")
        tokens, budget = batching.token_budget(self.model._module, torch.device(device), self.max_memory, length, self.grad)
        writer.set_settings(token_budget=tokens)
        self.summary["memory_budget"] = budget
        progress.note(
            f"batch_size='auto': micro-batches of up to {tokens:,} tokens (e.g. {max(1, tokens // length)} prompts of "
            f"{length} tokens), memory budget {budget / 1e9:.2f} GB"
        )
        return tokens

    def _window(self, captured: Any, seed: dict, globals_: dict, state: KeepState, rows: list[list[int]],
                first: int, pad_id: int, right: bool, progress: Progress) -> tuple[dict[str, torch.Tensor], int]:
        budget = self._token_budget(rows, self.writer, progress)
        lengths = [len(r) for r in rows]
        fixed = self.batch_size if isinstance(self.batch_size, int) else None
        queue = deque(batching.plan(lengths, fixed, budget, self.bucket))
        pending: deque = deque()  # (pick, batch, handle) started, not finished
        window_rows = WindowRows(len(rows))
        context = (captured, seed, globals_, state, first)
        while queue or pending:
            while queue and len(pending) < self.in_flight:
                pick = queue.popleft()
                batch = batching.pad(rows, pick, pad_id, right)
                pending.append((pick, batch, self._start(context, batch)))
            pick, batch, started = pending.popleft()
            try:
                kept = self._finish(context, batch, started)
            except BaseException as error:
                if batching.is_out_of_memory(error) and len(pick) > 1:
                    half = len(pick) // 2
                    queue.appendleft(pick[half:])
                    queue.appendleft(pick[:half])
                    self.summary["splits"] = self.summary.get("splits", 0) + 1
                    progress.note(f"out of memory on {len(pick)} prompts x {batch.input_ids.shape[1]} tokens; split in two")
                    del error
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                self._abandon(pending)
                raise
            self._check_kept(state, kept)
            window_rows.add(batch, kept)
            progress.update(prompts=len(pick), tokens=batch.tokens)
        tensors = window_rows.tensors(state.keys)
        ids = torch.arange(first, first + len(rows))
        counts = torch.tensor(lengths)
        tensors["_prompt"] = ids.repeat_interleave(counts)
        tensors["_position"] = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
        tensors["_token"] = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
        return tensors, int(counts.sum())

    def _check_kept(self, state: KeepState, kept: dict) -> None:
        if not kept:
            raise UsageValueError(
                "the harvest body kept nothing: call `run.keep(name, value)` (e.g. "
                "`run.keep('resid5', model.model.layers[5].output)`) for what the store should hold."
            )
        if state.keys is None:
            state.keys = keys_of(kept)
            self.writer.check_keys(state.keys)
            return
        if set(kept) != set(state.keys):
            raise UsageValueError(
                f"this micro-batch kept {sorted(kept)}, but earlier micro-batches (or the store's earlier shards) kept "
                f"{sorted(state.keys)}: every micro-batch must keep the same names (the body runs once per micro-batch)."
            )
        for name, (per, value) in kept.items():
            info = state.keys[name]
            if list(value.shape[1:]) != info["shape"] or dtype_name(value.dtype) != info["dtype"]:
                raise UsageValueError(
                    f"run.keep({name!r}, ...) gave {dtype_name(value.dtype)} rows of shape {tuple(value.shape[1:])} "
                    f"in this micro-batch but {info['dtype']} rows of shape {tuple(info['shape'])} before; kept rows must match."
                )

    # How one micro-batch runs: here, at once (a remote harvest submits in
    # `_start` and waits in `_finish`, several in flight).
    in_flight = 1

    def _start(self, context: tuple, batch: Any) -> Any:
        return None

    def _finish(self, context: tuple, batch: Any, started: Any) -> dict:
        return self._micro_batch(*context[:4], batch, context[4])

    def _abandon(self, pending: Any) -> None:
        """Micro-batches started but not finished when the run fails."""

    def _micro_batch(self, captured: Any, seed: dict, globals_: dict, state: KeepState, batch: Any, first: int) -> dict:
        from ..tracing.run import TraceRun

        ids = torch.tensor(batch.rows) + first
        handle = BatchHandle(state, batch, ids)
        inputs = (({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},), {})
        run = TraceRun(self.model, captured, handle, seed, globals_, inputs, self.backend, keep_graph=False)
        grad = torch.enable_grad() if self.grad else torch.no_grad()
        with grad:
            run.run_to_end(_ignore)
        kept = handle.kept
        return kept

    @property
    def store(self) -> HarvestStore:
        """The store this harvest wrote, opened memory-mapped."""
        return load(self.to)


def _ignore(values: dict) -> None:
    """Names a micro-batch's body assigned are not bound in the caller (only kept values leave)."""


__all__ = ["Harvest", "load", "HarvestStore", "HarvestStoreError"]
