"""What a remote body can reach at run time: an allowlist per type.

The static rules of :mod:`.sandbox` see names, not objects: ``x.model`` may be
a submodule called ``model`` or the tokenizer's library internals.  So every
attribute a body (or a helper it sends) touches goes through a :class:`Guard`:
:func:`guard_tree` rewrites ``obj.name`` into ``__st_get__(obj, "name")`` and
the object of an attribute assignment ``obj.name = v`` into
``__st_set__(obj, "name")``, after the static checks and before compiling,
for the body and for every ``with`` block nested in it (the tracing machinery
compiles those through :func:`seethrough.tracing.capture.code_transform`).

What a body reaches (anything else raises :class:`SandboxViolation` naming
the line, the type and the attribute):

* **envoys** (the model and its modules): the tracing API (``output``,
  ``input``, ``inputs``, ``skip``, ``next``, ``source``, ``path``), submodules
  and aliases, parameters and buffers, plain values of the module (numbers,
  strings, flags; never paths); on the model also ``trace``, ``generate``,
  ``session``, ``scan`` (their options checked: no ``remote``/``host``/
  ``api_key``, generation options from the allowlist), ``device``,
  ``tokenizer`` and ``config``/``generation_config``;
* **operations** of ``.source`` (``attn.source.attention_interface_1``):
  ``output``, ``input``, ``inputs``, ``next``, ``source``, ``name``;
* **the trace API**: ``invoke``, ``iter``, ``all``, ``next``, ``barrier``,
  ``stop``, ``cache``, ``result``, ``log``, ``generator``;
* **tensors**: their maths, shape and dtype methods (:data:`TENSOR_ATTRIBUTES`,
  with the in-place ``name_`` forms), never storage, pointers, files, NumPy or
  other processes; in-place changes, ``.data`` and ``requires_grad_`` are
  refused on parameters of the served model;
* **the tokenizer** as a :class:`TokenizerView` (encode, decode, call, convert,
  vocabulary and special-token reads, all returning copies);
* **configs** as a :class:`ConfigView`: a read-only copy of their plain
  values, private keys, paths and library internals left out;
* **plain Python values** (numbers, strings, containers), model outputs
  (their fields), ``torch.Size``/``dtype``/``device``/``finfo``, a body's own
  ``torch.Generator``, exceptions' ``args``.

Class objects have no attributes here (``torch.Tensor.grad``,
``int.from_bytes``), and ``.output``/``.input``/``.inputs`` can be assigned
only on envoys, ``.grad`` only on tensors that are not the served model's
parameters.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import sys
import types
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch

from ...envoy import Envoy, NextCall, alias_target, unknown_name_error
from ...errors import UsageAttributeError
from ...models.language import Generator
from ...models.streaming import Streamer
from ...source import FunctionSource, ModuleSource, Operation
from ...tracing.cache import Cache, CacheEntry
from ...tracing.runtime import SAVE_METHOD, save_method
from ...tracing.tracer import Invoker, Tracer
from ...tracing.values import SavableTuple
from ..protocol import (CLIENT_OPTIONS, GENERATE_INPUTS, ProtocolError, check_call_options,
                       check_generate_options)
from ..refusal import SandboxViolation, user_line

__all__ = ["ConfigView", "GET", "Guard", "SAVE", "SET", "TENSOR_ATTRIBUTES", "TokenizerView", "guard_tree"]

GET, SET, SAVE = "__st_get__", "__st_set__", "__st_save__"

# -- rewriting the code ----------------------------------------------------------------


class _Rewriter(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        # `X.save()` was compiled as SAVE_METHOD(X) (tracing.capture); a body cannot
        # spell that name, so every use is the rewrite's: route it through the guard.
        if node.id == SAVE_METHOD:
            return ast.copy_location(ast.Name(SAVE, node.ctx), node)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        value = self.visit(node.value)
        if isinstance(node.ctx, ast.Load):
            call = ast.Call(func=ast.Name(GET, ast.Load()), args=[value, ast.Constant(node.attr)], keywords=[])
            return ast.copy_location(call, node)
        # Store / Del: the object is checked, the assignment itself stays as written
        # (so `a.output, b.output = x, y`, `h.grad += g` keep Python's semantics).
        check = ast.copy_location(
            ast.Call(func=ast.Name(SET, ast.Load()), args=[value, ast.Constant(node.attr)], keywords=[]), node.value)
        return ast.copy_location(ast.Attribute(value=check, attr=node.attr, ctx=node.ctx), node)


    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.ctx, ast.Load):
            return node
        # `w[...] = v` / `del w[...]`: the container is checked (never a served weight).
        node.value = ast.copy_location(
            ast.Call(func=ast.Name(SET, ast.Load()), args=[node.value, ast.Constant("[]")], keywords=[]), node.value)
        return node


def guard_tree(tree: ast.Module) -> ast.Module:
    """A copy of ``tree`` whose attribute accesses go through the guard."""
    rewritten = _Rewriter().visit(copy.deepcopy(tree))
    return ast.fix_missing_locations(rewritten)


# -- the allowlists ----------------------------------------------------------------------

_ENVOY_API = frozenset({"output", "input", "inputs", "skip", "next", "source", "path", "modules", "parameters",
                        "named_parameters"})
_ROOT_API = frozenset({"trace", "generate", "session", "scan", "device", "tokenizer", "config",
                       "generation_config", "generator"})
_TRACER_API = frozenset({"invoke", "iter", "all", "next", "barrier", "stop", "cache", "result", "log", "generator"})
_NEXT_CALL_API = frozenset({"output", "input", "inputs", "next"})
_OPERATION_API = frozenset({"output", "input", "inputs", "next", "source", "name"})
_CACHE_API = frozenset({"keys", "model", "include_output", "include_inputs"})
_CACHE_ENTRY_API = frozenset({"output", "input", "inputs", "outputs", "all_inputs", "path"})
_CONFIG_NAMES = frozenset({"config", "generation_config"})

# Tensor attributes: maths, shapes, dtypes, autograd reads; each method's in-place
# form (name + "_") is allowed with it.  Left out on purpose: storage and pointers
# (data_ptr, storage*, untyped_storage, storage_offset, set_, as_strided, resize_),
# NumPy and files (numpy, tofile), uninitialized memory (new, new_empty*),
# other processes and devices (share_memory_, is_shared, pin_memory, cuda,
# record_stream), hooks (register_*), the autograd graph's nodes (grad_fn), and
# sparse/quantized internals.
TENSOR_ATTRIBUTES = frozenset("""
    shape dtype device ndim T mT H mH real imag data grad requires_grad is_leaf layout names itemsize nbytes
    is_cuda is_cpu is_meta is_sparse is_quantized is_complex is_floating_point is_signed is_contiguous is_conj
    is_neg is_nonzero is_inference is_same_size retains_grad output_nr
    size dim ndimension numel nelement element_size stride item tolist save backward retain_grad
    requires_grad_ detach detach_ clone contiguous to cpu type type_as float double half bfloat16 int long short
    char byte bool cfloat cdouble chalf get_device
    view view_as reshape reshape_as expand expand_as repeat repeat_interleave tile flatten unflatten ravel squeeze
    unsqueeze transpose permute movedim moveaxis swapaxes swapdims t adjoint flip fliplr flipud roll rot90 narrow
    narrow_copy select split split_with_sizes chunk tensor_split unbind hsplit vsplit dsplit unfold diag diag_embed
    diagflat diagonal tril triu trace broadcast_to gather scatter scatter_add scatter_reduce index_select
    index_add index_copy index_fill index_put masked_fill masked_scatter masked_select take take_along_dim
    put where nonzero argwhere count_nonzero sum_to_size select_scatter slice_scatter diagonal_scatter
    abs absolute neg negative positive sign sgn signbit add sub subtract mul multiply div divide true_divide
    floor_divide remainder fmod pow float_power square sqrt rsqrt exp exp2 expm1 log log2 log10 log1p logit
    reciprocal sin cos tan asin acos atan atan2 arcsin arccos arctan arctan2 sinh cosh tanh asinh acosh atanh
    arcsinh arccosh arctanh sigmoid relu softmax log_softmax hardshrink erf erfc erfinv lgamma digamma
    polygamma mvlgamma i0 sinc floor ceil round trunc fix frac clamp clamp_min clamp_max clip lerp hypot
    heaviside deg2rad rad2deg logaddexp logaddexp2 xlogy copysign nextafter ldexp frexp gcd lcm nan_to_num
    addcmul addcdiv addmm addmv addbmm baddbmm addr matmul mm bmm mv dot vdot inner outer ger kron cross
    eq ne lt le gt ge equal allclose isclose isnan isinf isfinite isneginf isposinf isreal not_equal less
    less_equal greater greater_equal maximum minimum fmax fmin logical_and logical_or logical_not logical_xor
    bitwise_and bitwise_or bitwise_xor bitwise_not bitwise_left_shift bitwise_right_shift
    sum nansum prod mean nanmean median nanmedian mode std var max min amax amin aminmax argmax argmin
    argsort sort msort topk kthvalue cumsum cumprod cummax cummin logcumsumexp logsumexp norm renorm dist
    diff quantile nanquantile cov corrcoef histc histogram bincount unique unique_consecutive all any
    det logdet slogdet inverse pinverse matrix_exp matrix_power cholesky qr svd lu lu_solve cholesky_solve
    cholesky_inverse triangular_solve conj conj_physical resolve_conj resolve_neg angle bernoulli multinomial
    new_zeros new_ones new_full new_tensor zero_ fill_ copy_ uniform_ normal_ random_ exponential_ geometric_
    cauchy_ log_normal_ fill_diagonal_ apply
""".split()) - {"apply"}
_TENSOR_INPLACE = frozenset(name + "_" for name in TENSOR_ATTRIBUTES if hasattr(torch.Tensor, name + "_"))
_TENSOR_ALLOWED = TENSOR_ATTRIBUTES | _TENSOR_INPLACE

# The wrappers' helper objects a remote body may read, and what of them.
_WRAPPER_HELPER_API: dict[type, frozenset[str]] = {
    Generator: frozenset({"output", "streamer"}),
    Streamer: frozenset({"output"}),
}

_BUILTIN_VALUE_TYPES = (str, bytes, int, float, complex, bool, list, tuple, dict, set, frozenset, range, slice,
                        OrderedDict)
_STRING_LOOKUPS = frozenset({"format", "format_map"})  # "{0.__class__}".format(x) walks attributes
_BUILTIN_ATTRIBUTES: dict[type, frozenset[str]] = {
    kind: frozenset(n for n in dir(kind) if not n.startswith("_")) - _STRING_LOOKUPS for kind in _BUILTIN_VALUE_TYPES
}
_DTYPE_API = frozenset({"is_floating_point", "is_complex", "is_signed", "itemsize", "to_real", "to_complex"})
_DEVICE_API = frozenset({"type", "index"})
_FINFO_API = frozenset({"bits", "eps", "max", "min", "tiny", "smallest_normal", "resolution", "dtype"})
_GENERATOR_API = frozenset({"manual_seed", "seed", "initial_seed", "get_state", "set_state", "device"})
_SIZE_API = _BUILTIN_ATTRIBUTES[tuple] | {"numel"}
_MODEL_OUTPUT_API = frozenset({"keys", "values", "items", "get", "to_tuple", "save"})
_BATCH_ENCODING_API = frozenset({"keys", "values", "items", "get", "to", "tokens", "word_ids", "sequence_ids",
                                 "char_to_token", "token_to_chars", "word_to_tokens", "token_to_word",
                                 "n_sequences", "is_fast"})
_GENERATOR_OBJECT_API = frozenset({"send", "close"})

# Plain values of configs and modules that are shown; these never are.
_HIDDEN_KEYS = frozenset({"name_or_path", "auto_map", "transformers_version", "commit_hash", "config_class",
                          "base_model_prefix", "tokenizer_class", "custom_pipelines"})
_HIDDEN_PARTS = ("path", "file", "dir", "url", "repo", "hub", "token_", "remote_code")


def _hidden(key: Any) -> bool:
    if not isinstance(key, str) or key.startswith("_") or key in _HIDDEN_KEYS:
        return True
    lowered = key.lower()
    # "token_" catches hub tokens ("token_id"s are shown: see the exceptions below)
    return any(part in lowered for part in _HIDDEN_PARTS) and not lowered.endswith(("token_id", "token_ids"))


def plain_copy(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with only plain data (numbers, strings, containers); None otherwise."""
    if depth > 16:
        return None
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain_copy(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return type(value)(plain_copy(v, depth + 1) for v in value if isinstance(v, (int, float, str, bool)))
    if isinstance(value, dict):
        return {k: plain_copy(v, depth + 1) for k, v in value.items()
                if isinstance(k, (str, int)) and not (isinstance(k, str) and _hidden(k))}
    return None


def _is_plain(value: Any) -> bool:
    return plain_copy(value) is not None or value is None


# -- views ---------------------------------------------------------------------------------


def _is_batch_encoding(obj: Any) -> bool:
    """A tokenizer's output (transformers' ``BatchEncoding``; transformers is loaded wherever one exists)."""
    home = sys.modules.get("transformers.tokenization_utils_base")
    cls = getattr(home, "BatchEncoding", None)
    return cls is not None and isinstance(obj, cls)


class ReadOnlyView:
    """The base of what a remote body reads but never changes (a config, the
    tokenizer, a module proxy, a rebuilt registered module): setting or
    deleting an attribute is a :class:`SandboxViolation` with the message of
    :meth:`_written`; the run-time guard leaves its attributes to the view."""

    __slots__ = ()
    _remote_checks_own_attributes = True

    def __init__(self, **slots: Any) -> None:
        for name, value in slots.items():
            object.__setattr__(self, name, value)

    def _written(self, name: str) -> str:
        """Why setting ``name`` is refused, and what to do instead (each view says what it is)."""
        return f"this object is read-only in remote trace bodies (tried to set `{name}`)"

    def __setattr__(self, name: str, value: Any) -> None:
        raise SandboxViolation(f"{user_line()}{self._written(name)}")

    def __delattr__(self, name: str) -> None:
        raise SandboxViolation(f"{user_line()}{self._written(name)}")


class ConfigView(ReadOnlyView):
    """A read-only copy of a config's plain values (``model.config`` in a body).

    Attribute names are the config's keys (and its aliases, such as
    ``hidden_size`` for GPT-2's ``n_embd``); ``to_dict()``, ``get``, ``keys``,
    ``items`` and ``values`` read them.  Private keys, paths and library
    internals are not in it.  Changing it is not possible; nothing a body does
    reaches the served model's config.
    """

    __slots__ = ("_values", "_kind")

    def __init__(self, config: Any) -> None:
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        values = plain_copy({k: v for k, v in raw.items() if isinstance(k, str)}) or {}
        for alias, target in (getattr(config, "attribute_map", None) or {}).items():
            if isinstance(alias, str) and target in values and not _hidden(alias):
                values.setdefault(alias, values[target])
        super().__init__(_values=values, _kind=type(config).__name__)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = self._values
        if name in values:
            return copy.deepcopy(values[name])
        raise UsageAttributeError(f"{user_line()}the config ({self._kind}) has no value `{name}` that a remote body "
                                  f"can read; it has: {', '.join(sorted(values))}")

    def _written(self, name: str) -> str:
        return f"configs are read-only in remote trace bodies (tried to set `{name}`); keep your own variables instead"

    def to_dict(self) -> dict:
        return copy.deepcopy(self._values)

    def get(self, name: str, default: Any = None) -> Any:
        return copy.deepcopy(self._values.get(name, default))

    def keys(self) -> list[str]:
        return list(self._values)

    def items(self) -> list[tuple[str, Any]]:
        return list(self.to_dict().items())

    def values(self) -> list[Any]:
        return list(self.to_dict().values())

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return f"{self._kind}(remote view) {self._values!r}"

    def _allowed(self, name: str) -> bool:
        return name in self._values or name in ("to_dict", "get", "keys", "items", "values")

    def _why(self, name: str) -> str:
        return (f"a config is a read-only copy of its plain values in remote bodies ({self._kind} has no value "
                f"`{name}`; it has {', '.join(sorted(self._values)[:40])}{', ...' if len(self._values) > 40 else ''})")


_TOKENIZER_CALL_OPTIONS = frozenset("""text text_pair text_target text_pair_target add_special_tokens padding
    truncation max_length stride is_split_into_words pad_to_multiple_of padding_side return_tensors
    return_token_type_ids return_attention_mask return_overflowing_tokens return_special_tokens_mask
    return_offsets_mapping return_length verbose split_special_tokens""".split())
_TOKENIZER_DECODE_OPTIONS = frozenset({"token_ids", "sequences", "skip_special_tokens",
                                       "clean_up_tokenization_spaces"})
_TOKENIZER_METHODS: dict[str, frozenset[str]] = {
    "encode": _TOKENIZER_CALL_OPTIONS, "tokenize": _TOKENIZER_CALL_OPTIONS | {"pair"},
    "decode": _TOKENIZER_DECODE_OPTIONS, "batch_decode": _TOKENIZER_DECODE_OPTIONS,
    "convert_ids_to_tokens": frozenset({"ids", "skip_special_tokens"}), "convert_tokens_to_ids": frozenset({"tokens"}),
    "get_vocab": frozenset(),
}
_TOKENIZER_VALUES = frozenset("""vocab vocab_size eos_token bos_token pad_token unk_token sep_token cls_token
    mask_token eos_token_id bos_token_id pad_token_id unk_token_id sep_token_id cls_token_id mask_token_id
    all_special_tokens all_special_ids special_tokens_map padding_side truncation_side model_max_length is_fast
    model_input_names""".split())


class TokenizerView(ReadOnlyView):
    """The served tokenizer as a remote body sees it: reads only, copies out.

    ``tok(text, ...)``, ``encode``, ``decode``, ``batch_decode``, ``tokenize``,
    ``convert_ids_to_tokens``, ``convert_tokens_to_ids``, ``get_vocab`` /
    ``vocab``, ``len(tok)`` and the special tokens and their ids.  Lists and
    dicts come back as copies, so appending to ``tok.model_input_names`` or
    ``tok.vocab`` changes nothing on the server; ``return_tensors`` is ``"pt"``
    or nothing (no NumPy).
    """

    __slots__ = ("_tokenizer",)

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(_tokenizer=tokenizer)

    def _allowed(self, name: str) -> bool:
        return name in _TOKENIZER_METHODS or name in _TOKENIZER_VALUES

    def _why(self, name: str) -> str:
        return ("the tokenizer's reads are: tok(text, ...), " + ", ".join(sorted(_TOKENIZER_METHODS))
                + " and the values " + ", ".join(sorted(_TOKENIZER_VALUES)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _check_tokenizer_options("tokenizer(...)", kwargs, _TOKENIZER_CALL_OPTIONS)
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str) -> Any:
        if name in _TOKENIZER_METHODS:
            method = getattr(self._tokenizer, name)
            options = _TOKENIZER_METHODS[name]

            def call(*args: Any, **kwargs: Any) -> Any:
                _check_tokenizer_options(f"tokenizer.{name}(...)", kwargs, options)
                result = method(*args, **kwargs)
                return copy.deepcopy(result) if isinstance(result, (list, dict)) else result

            return call
        if name in _TOKENIZER_VALUES:
            value = self._tokenizer.get_vocab() if name == "vocab" else getattr(self._tokenizer, name)
            return plain_copy(value)
        raise _refusal(self, name, self._why(name))

    def _written(self, name: str) -> str:
        return (f"the tokenizer is read-only in remote trace bodies (tried to set `{name}`); pass options to the "
                "call instead, e.g. tok(text, padding_side='left')")

    def __repr__(self) -> str:
        return f"<tokenizer {type(self._tokenizer).__name__} (remote view, vocabulary of {len(self._tokenizer)})>"


def _check_tokenizer_options(what: str, kwargs: dict, allowed: frozenset[str]) -> None:
    for name, value in kwargs.items():
        if name not in allowed:
            raise SandboxViolation(f"{user_line()}`{what}` does not take the option `{name}` in remote trace bodies; "
                                   f"it takes: {', '.join(sorted(allowed))}", construct=name)
        if name == "return_tensors" and value not in (None, "pt"):
            raise SandboxViolation(f"{user_line()}`return_tensors={value!r}` is not available in remote trace "
                                   "bodies; use return_tensors='pt' (torch tensors)", construct=name)


# -- the guard -------------------------------------------------------------------------------


def _refusal(obj: Any, name: str, why: str = "") -> SandboxViolation:
    kind = "class" if isinstance(obj, type) else type(obj).__name__
    shown = f"`.{name}` of a {kind}" if not isinstance(obj, type) else f"`{obj.__name__}.{name}`"
    why = why or ("a remote body reaches only envoys, the trace API, tensor maths, the tokenizer's reads, configs "
                  "as plain values and plain Python data")
    return SandboxViolation(f"{user_line()}{shown} is not available in remote trace bodies: {why}",
                            construct=f".{name}")


class Guard:
    """The run-time allowlist of one request (see the module docs).

    ``get`` and ``set_target`` are bound into the body's globals as
    :data:`GET` and :data:`SET`; ``parameters`` holds the ids of the served
    model's parameters (in-place changes of those are refused).
    """

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        parameters = list(parameters)
        self._parameters = {id(p) for p in parameters}
        # Their memory: views (w.T, w[0]) and aliases (w.detach()) share it.
        self._storages = {ptr for ptr in map(_storage_of, parameters) if ptr}
        self._views: dict[int, Any] = {}
        self._keep: list[Any] = []  # originals of the views (their ids stay unique)
        self._classes: set[type] = set()  # built by this request's registered modules

    # -- classes of registered modules (remote.modules)
    def build_class(self, func: Callable[..., Any], name: str, *bases: Any, **keywords: Any) -> type:
        """``__build_class__`` of registered modules: no keywords (``metaclass=``), bases
        that are classes of this request or plain exception classes."""
        if keywords:
            raise SandboxViolation(f"{user_line()}class {name}: keywords such as metaclass= are not available")
        for base in bases:
            if not (base in self._classes or _plain_exception(base)):
                shown = getattr(base, "__name__", type(base).__name__)
                raise SandboxViolation(
                    f"{user_line()}class {name}({shown}): a class of a registered module may derive only from "
                    "classes built by the same request or from exception classes (Exception, ValueError, ...)",
                    construct=f"class {name}")
        made = builtins.__build_class__(func, name, *bases)
        self._classes.add(made)
        return made

    def _built(self, obj: Any) -> bool:
        """Is ``obj`` a class of this request's registered modules, or an instance of one?"""
        classes = self._classes
        return bool(classes) and (obj in classes if isinstance(obj, type) else type(obj) in classes)

    def namespace(self) -> dict[str, Callable[..., Any]]:
        return {GET: self.get, SET: self.set_target, SAVE: self.save}

    def save(self, value: Any) -> Any:
        """``value.save()``: seethrough's save, or the value's own ``save`` where the allowlist has it."""
        own = getattr(type(value), "save", None)
        if own is not None and not getattr(own, "seethrough_save", False):
            self.get(value, "save")  # refuses where a library object's own save() would run
        return save_method(value)

    # -- reading
    def get(self, obj: Any, name: str) -> Any:
        if isinstance(obj, torch.Tensor):  # the hot path
            if name in _TENSOR_ALLOWED and not (_changes_parameter(name) and self._is_weight(obj)):
                return getattr(obj, name)
            raise self._tensor_refusal(obj, name)
        if self._classes and self._built(obj):
            return getattr(obj, name)  # code the sandbox checked; its names have no underscore
        if isinstance(obj, type):
            raise _refusal(obj, name, "classes have no attributes in remote bodies (they are shared by every "
                                      "request); use instances and the module functions (torch.*)")
        if isinstance(obj, Envoy):
            return self._envoy(obj, name)
        kind = type(obj)
        allowed = _BUILTIN_ATTRIBUTES.get(kind)
        if allowed is not None:
            if name in allowed:
                return getattr(obj, name)
            raise _refusal(obj, name, "it is not a public attribute of this value" if name not in _STRING_LOOKUPS
                           else "a format string can walk attributes ('{0.__class__}'); use an f-string")
        if getattr(kind, "_remote_checks_own_attributes", False):
            allowed_here = getattr(obj, "_allowed", None)
            if allowed_here is None or allowed_here(name):
                return getattr(obj, name)
            raise _refusal(obj, name, obj._why(name))
        if self._allowed_other(obj, kind, name):
            return getattr(obj, name)
        raise _refusal(obj, name)

    def _is_weight(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._parameters or (bool(self._storages) and _storage_of(tensor) in self._storages)

    def _tensor_refusal(self, obj: torch.Tensor, name: str) -> SandboxViolation:
        if name in _TENSOR_ALLOWED and self._is_weight(obj):
            return _refusal(obj, name, "it would change a weight of the served model, shared by every request; "
                                       "compute on a copy (w.clone()) or edit activations (.output)")
        return _refusal(obj, name, "tensors expose their maths, shapes and autograd reads, not their storage, "
                                   "pointers, NumPy arrays, files, hooks or other processes")

    def _allowed_other(self, obj: Any, kind: type, name: str) -> bool:
        if isinstance(obj, Tracer):
            return name in _TRACER_API
        if isinstance(obj, NextCall):
            return name in _NEXT_CALL_API
        if isinstance(obj, (ModuleSource, FunctionSource)):  # .source: its attributes are operation names
            return True
        if isinstance(obj, Operation):
            return name in _OPERATION_API
        if isinstance(obj, Cache):
            return name in _CACHE_API
        if isinstance(obj, CacheEntry):
            return name in _CACHE_ENTRY_API
        if isinstance(obj, Invoker):
            return False
        if isinstance(obj, torch.dtype):
            return name in _DTYPE_API
        if isinstance(obj, torch.device):
            return name in _DEVICE_API
        if isinstance(obj, (torch.finfo, torch.iinfo)):
            return name in _FINFO_API
        if isinstance(obj, torch.Generator):
            return name in _GENERATOR_API
        if isinstance(obj, torch.Size):
            return name in _SIZE_API
        if isinstance(obj, SavableTuple):
            return name in _BUILTIN_ATTRIBUTES[tuple] or name == "save"
        if isinstance(obj, tuple):  # named tuples and torch.return_types (values, indices)
            fields = getattr(kind, "_fields", None) or getattr(kind, "__match_args__", ())
            return name in fields or name in _BUILTIN_ATTRIBUTES[tuple]
        if isinstance(obj, dict):
            return self._mapping(obj, kind, name)
        if _is_batch_encoding(obj):  # tokenizer(...)
            return name in _BATCH_ENCODING_API or name in obj.keys()
        if isinstance(obj, BaseException):
            return name == "args"
        if isinstance(obj, types.GeneratorType):
            return name in _GENERATOR_OBJECT_API
        allowed = _WRAPPER_HELPER_API.get(kind)  # model.generator, model.generator.streamer
        return allowed is not None and name in allowed

    def _mapping(self, obj: dict, kind: type, name: str) -> bool:
        if dataclasses.is_dataclass(obj):  # HuggingFace ModelOutput: its fields
            return name in _MODEL_OUTPUT_API or any(f.name == name for f in dataclasses.fields(obj))
        return name in _BUILTIN_ATTRIBUTES[dict]

    # -- envoys
    def _envoy(self, envoy: Envoy, name: str) -> Any:
        module = envoy._module
        if name in _ENVOY_API or name in module._modules:
            return getattr(envoy, name)
        if name.endswith("_") and name[:-1] in module._modules:
            return getattr(envoy, name)
        if envoy._root is envoy and name in _ROOT_API:
            return self._root_api(envoy, name)
        if name in _CONFIG_NAMES:
            return self._view(getattr(module, name, None), ConfigView, envoy, name)
        if name in module._parameters or name in module._buffers:
            return getattr(envoy, name)
        if alias_target(envoy, name) is not None:
            return getattr(envoy, name)
        if name in module.__dict__ and not _hidden(name) and _is_plain(module.__dict__[name]):
            return plain_copy(module.__dict__[name])
        if not hasattr(type(envoy), name) and not hasattr(module, name):
            raise unknown_name_error(envoy, name)  # no such thing: the envoy's own error (did you mean ...)
        raise SandboxViolation(
            f"{user_line()}`{envoy._display_path()}.{name}` is not available in remote trace bodies: an envoy gives "
            "its submodules, parameters, buffers, plain settings and the tracing API (.output, .input, .inputs, "
            f".skip, .next) only. Submodules here: {', '.join(list(module._modules)[:20]) or 'none'}",
            construct=f".{name}")

    def _root_api(self, model: Envoy, name: str) -> Any:
        if name == "tokenizer":
            return self._view(getattr(model, "tokenizer", None), TokenizerView, model, name)
        if name in _CONFIG_NAMES:
            source = getattr(model._module, name, None)
            return self._view(source, ConfigView, model, name)
        value = getattr(model, name)
        if name in ("trace", "scan", "generate", "session"):
            return _checked_entry(name, value)
        return value

    def _view(self, value: Any, view: type, envoy: Envoy, name: str) -> Any:
        if value is None:
            raise SandboxViolation(f"{user_line()}`{envoy._display_path()}.{name}` does not exist on the served model")
        made = self._views.get(id(value))
        if made is None:
            made = self._views[id(value)] = view(value)
            self._keep.append(value)
        return made

    # -- assigning
    def set_target(self, obj: Any, name: str) -> Any:
        """``obj`` if the body may assign or delete ``obj.name`` (``obj[...]`` for ``"[]"``); a refusal otherwise."""
        if name == "[]":
            if isinstance(obj, torch.Tensor) and self._is_weight(obj):
                raise SandboxViolation(f"{user_line()}writing into a weight of the served model (or a view of one) "
                                       "is not available in remote trace bodies: it is shared by every request; "
                                       "edit a copy (w.clone()) or the activations (.output)", construct="[...] =")
            return obj
        if name in ("output", "input", "inputs") and isinstance(obj, (Envoy, NextCall, Operation)):
            return obj
        if name == "grad" and isinstance(obj, torch.Tensor) and not isinstance(obj, type):
            if self._is_weight(obj):
                raise _refusal(obj, name, "the gradient of a served weight is kept on the server between requests; "
                                          "edit gradients of activations (h.grad inside `with loss.backward():`)")
            return obj
        if self._classes and not isinstance(obj, type) and self._built(obj):
            return obj  # `self.name = value` in a method of a registered module's class
        if isinstance(obj, type):
            raise _refusal(obj, name, "classes cannot be changed in remote bodies (they are shared by every request)")
        raise _refusal(obj, name, "only .output, .input and .inputs of envoys and .grad of tensors can be assigned "
                                  "in remote bodies")


def _plain_exception(base: Any) -> bool:
    """A builtin exception class (``Exception``, ``ValueError``, ...; not ``BaseException``'s others)."""
    return isinstance(base, type) and issubclass(base, Exception) and base.__module__ == "builtins"


def _storage_of(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # fake, meta or sparse tensors hold no memory
        return 0


def _changes_parameter(name: str) -> bool:
    # On the served model's parameters: no in-place method, no `.data` alias to change them through.
    return name.endswith("_") or name == "data"


def _checked_entry(kind: str, entry: Callable[..., Any]) -> Callable[..., Any]:
    """``model.trace`` & co. for a body: no client options, generation options from the allowlist."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            if kind == "session":
                check_call_options(kwargs, "model.session(...)")
                if kwargs:
                    raise ProtocolError(f"`model.session(...)` takes no options in a remote body (got "
                                        f"{', '.join(sorted(kwargs))})")
            elif kind == "generate":
                check_generate_options({k: v for k, v in kwargs.items()
                                        if k not in GENERATE_INPUTS and k != "keep_graph"}, "model.generate(...)")
            else:
                check_call_options(kwargs, f"model.{kind}(...)")
        except ProtocolError as error:
            raise SandboxViolation(f"{user_line()}{error}", construct=kind) from None
        return entry(*args, **kwargs)

    return checked


assert not CLIENT_OPTIONS & _TOKENIZER_CALL_OPTIONS
