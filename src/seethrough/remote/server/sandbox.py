"""Untrusted trace bodies: static validation and the restricted namespace they run in.

A seethrough server runs code written by strangers: the body of a
``with model.trace(...)`` block and the helpers it calls.  This module is the
first wall around that code: static rules, module proxies and the namespace;
:mod:`.reach` adds the run-time allowlist of what each kind of object gives a
body (the worker process with time and memory limits, the server's, is the
next wall).  The server calls ``validate(source, filename)``, then
``exec(compile_body(tree, filename), safe_globals(extra))``; :func:`run_body`
does exactly that.

Static rules (``validate``)
---------------------------
* **Syntax allowlist.** Statements, expressions, functions, lambdas, loops,
  comprehensions, ``with``, ``try``, ``match``, f-strings, walrus and
  generators pass.  Refused: ``class`` (the class machinery), ``async``
  (coroutine frames), ``global``, decorators, bare ``except:`` (it would
  swallow the server's cancellation), and any node kind not listed.
* **No underscores** in names, attributes, arguments, keywords, import
  aliases or match attributes (``_`` alone is allowed): this closes every
  dunder walk (``__class__``, ``__subclasses__``, ``__globals__``,
  ``__builtins__``...) and private state such as ``model._model``.
* **Forbidden names** (:data:`FORBIDDEN_NAMES`, refused even as local
  names so a body cannot rebind them): code from strings (``eval``,
  ``exec``, ``compile``), files and terminal (``open``, ``input``),
  interactive or exiting (``breakpoint``, ``help``, ``exit``, ``quit``),
  namespaces (``globals``, ``locals``, ``vars``, ``dir``), lookups by string
  that would bypass the attribute rules (``getattr``, ``setattr``,
  ``delattr``, ``hasattr``), the class machinery (``type``, ``object``,
  ``super``, ``classmethod``, ``staticmethod``, ``property``), raw memory
  (``memoryview``, ``bytearray``), and ``BaseException``, ``SystemExit``,
  ``KeyboardInterrupt``, ``GeneratorExit`` (catching them would swallow
  the server's cancellation).
* **Forbidden attributes** (:data:`FORBIDDEN_ATTRIBUTES`, and by prefix
  :data:`FORBIDDEN_ATTRIBUTE_PREFIXES`): names that reach dangerous places
  *without* any underscore.  Attribute walks by string (``format``,
  ``format_map``: ``"{0.__class__}".format(x)``; f-strings are fine, they
  are AST), ``mro``; frames and code (``gi_``, ``cr_``, ``ag_``, ``f_``,
  ``tb_``, ``co_``); files (``tofile``, ``save_*``, ``load*``, ``dump*``,
  ``from_*``, ``push_to_hub``, ``to_json_file``, tokenizer internals);
  raw or uninitialized memory that may hold another request's data
  (``numpy``, ``ctypes``, ``storage``, ``untyped_storage``, ``set_``,
  ``new``, ``new_empty``, ``resize_``, ``as_strided``, ``to_empty``,
  ``share_memory*``); hooks and changes that outlive the request
  (``register_*``, ``apply``, ``add_module``, ``train``, ``compile``,
  ``resize_token_embeddings``, ``add_tokens``, ``edit``, ``set_*`` except
  ``set_grad_enabled``...); devices (``cuda``, ``xpu``...: write
  ``x.to(other.device)``); and, in case an object exposes one, modules and
  process entry points (``os``, ``sys``, ``torch``, ``system``, ``popen``...).
* **Attribute assignment** only to ``output``, ``input``, ``inputs`` and
  ``grad`` (:data:`ASSIGNABLE_ATTRIBUTES`): the edits of the tracing API.
  ``module.forward = f`` or ``model.layer.weight = w`` would change the
  served model for everyone.  Subscript edits (``out[:, -1] = 0``) are free.
* **Imports** only of :data:`ALLOWED_MODULES` (torch, torch.nn,
  torch.nn.functional, torch.linalg, torch.fft, math, einops); ``from X
  import y`` only of members that the proxy of X exposes; no relative or
  star imports.

Run-time rules (``safe_globals``)
---------------------------------
* ``__builtins__`` holds only :data:`_SAFE_BUILTIN_NAMES` (pure functions,
  containers, common exception classes), the given ``print`` and a guarded
  ``__import__``.
* ``import torch`` (or math, einops) yields a read-only proxy exposing an
  explicit list of members (``_TORCH_MEMBERS``, ``_FUNCTIONAL_MEMBERS``...;
  ``torch.nn`` holds only ``functional``: no classes such as ``Parameter``);
  anything else, e.g. ``torch.save``, ``torch.ops``, ``torch.hub``,
  ``torch.utils``, ``torch.jit``, ``torch.cuda``, raises a
  :class:`SandboxViolation` naming the user's line.  einops is imported
  lazily; where it is missing, ``import einops`` raises a clear
  ``ModuleNotFoundError``.  ``einops.reduce`` accepts only its own reduction
  names (it turns a name into a method lookup).

Decisions
---------
* ``to`` is **allowed**: ``x.to(torch.float32)`` and, above all,
  ``steer.to(h.device)`` (a vector sent from the client must join the model's
  device) are everyday code.  Moves to another GPU are contained by the
  worker seeing only its own device.  ``cuda`` is refused (``to`` does it).
* ``torch.manual_seed`` is **allowed** (the same body must run locally and
  remotely), and so is ``torch.Generator``.  It changes the worker's global
  RNG, so each request starts from a fresh seed and the state is restored
  after it: :func:`isolated_rng_state` does that.
* NumPy is **not** available: ``import numpy`` is refused and so is
  ``.numpy()``; results travel as tensors or via ``.tolist()``.
* ``torch.empty``/``torch.empty_like`` exist but return zeros, and
  ``torch.Tensor`` is a stand-in that works with ``isinstance`` but refuses
  the legacy constructor ``torch.Tensor(n)``: uninitialized memory on a
  shared server may hold another user's activations.

What static rules cannot see is checked at run time by :mod:`.reach`
(in-place writes to weights, ``model.to(...)``, ``model.config.update(...)``,
library internals behind ordinary names); what neither sees, the worker
process contains: torch functions writing into an argument (``out=``),
CPU and memory exhaustion, and infinite loops.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import keyword
import math
import secrets
import types
from typing import Any, Callable, Iterator

import torch

from ...tracing.capture import PARSE_LOCK
from ..protocol import CLIENT_OPTIONS, MODULES
from .reach import Guard, ReadOnlyView, guard_tree
from ..refusal import DEFAULT_FILENAME, SandboxViolation, user_line, where

__all__ = [
    "ALLOWED_MODULES", "ASSIGNABLE_ATTRIBUTES", "FORBIDDEN_ATTRIBUTES", "FORBIDDEN_ATTRIBUTE_PREFIXES",
    "FORBIDDEN_NAMES", "SandboxViolation", "compile_body", "isolated_rng_state", "module_proxy", "run_body",
    "safe_builtins", "safe_globals", "validate",
]

MAX_SOURCE_CHARS = 1_000_000
ALLOWED_MODULES = frozenset(MODULES)  # the protocol's list: what a request may bind is what a body may import
ASSIGNABLE_ATTRIBUTES = frozenset({"output", "input", "inputs", "grad"})
_LOADING_KEYWORDS = frozenset({"custom_generate", "trust_remote_code"})


# -- the rules ----------------------------------------------------------------------

_STRING_LOOKUP = "it looks attributes up by name at run time, which bypasses these checks"
_CLASSES = "it reaches the class machinery, the classic path out of a sandbox"
_FRAMES = "it reaches interpreter frames or code objects, and through them the server's globals"
_FILES = "it reads or writes files on the server"
_MEMORY = "it exposes raw or uninitialized memory, which may hold another request's data"
_OUTLIVES = "it changes the served model or registers something that outlives this request"
_MODULE = "it names a module or a process/interpreter entry point outside the allowed ones"
_NAMESPACE = "it exposes the server's namespaces"
_CANCEL = "catching it would swallow the server's cancellation of the request"

_USE_ATTRIBUTE = "write the attribute directly (x.name)"
_SAVE_INSTEAD = "save values with .save(); they come back to your machine, where you can write files"
_EDIT_INSTEAD = "edit activations inside the trace (.output, .input, .skip()); the served model must stay as it is"
_NO_ALTERNATIVE = "remote bodies cannot do this"

FORBIDDEN_NAMES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("eval", "exec", "compile"), ("it runs code from strings", "write the code itself in the body")),
    **dict.fromkeys(("open", "input"), ("it reaches files or the server's terminal", _SAVE_INSTEAD)),
    **dict.fromkeys(("breakpoint", "help", "exit", "quit", "copyright", "credits", "license"),
                    ("it is interactive or stops the server process", "use print() to see values")),
    **dict.fromkeys(("globals", "locals", "vars", "dir"), (_NAMESPACE, "refer to your variables by name")),
    **dict.fromkeys(("getattr", "setattr", "delattr", "hasattr"), (_STRING_LOOKUP, _USE_ATTRIBUTE)),
    **dict.fromkeys(("type", "object", "super", "classmethod", "staticmethod", "property"),
                    (_CLASSES, "use isinstance(x, torch.Tensor) to test types")),
    **dict.fromkeys(("memoryview", "bytearray"), (_MEMORY, "work with tensors")),
    **dict.fromkeys(("BaseException", "SystemExit", "KeyboardInterrupt", "GeneratorExit"), (_CANCEL, "catch Exception")),
}

FORBIDDEN_ATTRIBUTES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("format", "format_map"),
                    ("a format string can walk attributes ('{0.__class__}')", 'use an f-string: f"{x}"')),
    "mro": (_CLASSES, _NO_ALTERNATIVE),
    "attrgetter": (_STRING_LOOKUP, _USE_ATTRIBUTE),
    **dict.fromkeys(("tofile", "to_json_file", "push_to_hub", "backend_tokenizer", "sp_model", "apply_chat_template"),
                    (_FILES, _SAVE_INSTEAD)),
    "numpy": ("NumPy arrays expose raw memory (ctypes, tofile)", "keep tensors, or use .tolist() for plain numbers"),
    **dict.fromkeys(("ctypes", "storage", "untyped_storage", "typed_storage", "set_", "as_strided", "as_strided_"),
                    (_MEMORY, "use tensor operations (view, reshape, unfold, indexing)")),
    **dict.fromkeys(("new", "new_empty", "new_empty_strided", "resize_", "resize_as_", "to_empty"),
                    (_MEMORY, "use x.new_zeros(...), torch.zeros(...) or x.reshape(...)")),
    **dict.fromkeys(("apply", "apply_", "add_module", "train", "compile", "resize_token_embeddings", "tie_weights",
                     "init_weights", "post_init", "prune_heads", "add_tokens", "add_special_tokens",
                     "update_from_string", "edit", "clear_edits"), (_OUTLIVES, _EDIT_INSTEAD)),
    **dict.fromkeys(("cuda", "xpu", "ipu", "mtia"),
                    ("device placement on the server is the server's business", "use x.to(other.device)")),
    **dict.fromkeys("""os sys torch math builtins subprocess importlib io shutil socket pickle marshal pathlib
        inspect gc threading signal multiprocessing posix nt tempfile glob code codecs runpy types weakref eval exec
        system popen spawn fork execve unlink rmdir rmtree settrace setprofile globals locals""".split(),
                    (_MODULE, "import torch, math or einops at the top of the body")),
}

# (prefix, why, instead); attributes named in PREFIX_EXCEPTIONS pass.
FORBIDDEN_ATTRIBUTE_PREFIXES: tuple[tuple[str, str, str], ...] = (
    *((prefix, _FRAMES, _NO_ALTERNATIVE) for prefix in ("gi_", "cr_", "ag_", "f_", "tb_", "co_")),
    *((prefix, _FILES, _SAVE_INSTEAD) for prefix in ("save_", "load", "dump", "from_", "push_")),
    ("register_", _OUTLIVES, "use .output / .input / .skip() of the module inside the trace instead of hooks"),
    ("set_", _OUTLIVES, _EDIT_INSTEAD),
    ("share_memory", _MEMORY, _NO_ALTERNATIVE),
)
PREFIX_EXCEPTIONS = frozenset({"set_grad_enabled"})

_ALLOWED_NODES = frozenset(
    getattr(ast, name)
    for name in """Module Expr Assign AugAssign AnnAssign For While If With Raise Try TryStar Assert Delete Pass
        Break Continue Return FunctionDef Import ImportFrom Nonlocal Match BoolOp NamedExpr BinOp UnaryOp Lambda
        IfExp Dict Set ListComp SetComp DictComp GeneratorExp Yield YieldFrom Compare Call FormattedValue JoinedStr
        Constant Attribute Subscript Starred Name List Tuple Slice Load Store Del And Or Add Sub Mult MatMult Div
        Mod Pow LShift RShift BitOr BitXor BitAnd FloorDiv Invert Not UAdd USub Eq NotEq Lt LtE Gt GtE Is IsNot In
        NotIn comprehension ExceptHandler arguments arg keyword alias withitem match_case MatchValue
        MatchSingleton MatchSequence MatchMapping MatchClass MatchStar MatchAs MatchOr""".split()
    if hasattr(ast, name)
)
_BOUND_NAME_FIELDS = {"MatchAs": ("name",), "MatchStar": ("name",), "MatchMapping": ("rest",)}
_REFUSED_NODES: dict[str, tuple[str, str]] = {
    "ClassDef": ("class definitions reach the class machinery", "use functions, dicts and tuples"),
    **dict.fromkeys(("AsyncFunctionDef", "Await", "AsyncFor", "AsyncWith"),
                    ("async code exposes coroutine frames", "write plain synchronous code")),
    "Global": ("a body must not rebind the server's names", "return values from helper functions instead"),
    "TypeAlias": ("type aliases are not needed in a trace body", "remove it"),
}


# -- validation -----------------------------------------------------------------------


def validate(source: str, filename: str = DEFAULT_FILENAME) -> ast.Module:
    """Parse ``source`` and check it against the rules above; return its AST.

    Raises :class:`SandboxViolation` (naming the line, the construct, why and
    what to do instead) for syntax errors and for anything outside the
    allowlist.
    """
    return validate_with(source, filename, lambda: _Checker(source, filename))


def validate_with(source: str, filename: str, make_checker: Callable[[], "_Checker"]) -> ast.Module:
    """:func:`validate` with another checker (registered modules: :mod:`.modules`)."""
    if not isinstance(source, str):
        raise SandboxViolation(f"a remote trace body must be source text (str), not {type(source).__name__}",
                               filename=filename)
    if len(source) > MAX_SOURCE_CHARS:
        raise SandboxViolation(f"the remote trace body is {len(source):,} characters, over the limit of "
                               f"{MAX_SOURCE_CHARS:,}; move data into variables instead of source text",
                               filename=filename)
    try:
        with PARSE_LOCK:  # parses from two threads can corrupt CPython's AST state
            tree = ast.parse(source, filename=filename, mode="exec")
    except SyntaxError as error:
        raise SandboxViolation(f"{where(error.lineno, filename)}: syntax error in the remote trace body: {error.msg}",
                               lineno=error.lineno, filename=filename) from None
    except (ValueError, RecursionError, MemoryError) as error:
        raise SandboxViolation(f"the remote trace body cannot be parsed: {error or type(error).__name__}",
                               filename=filename) from None
    make_checker().check(tree)
    return tree


class _Checker:
    """Walks an AST (iteratively: deep nesting must not overflow the stack)."""

    def __init__(self, source: str, filename: str) -> None:
        self.source = source
        self.filename = filename

    def check(self, tree: ast.AST) -> None:
        stack: list[tuple[ast.AST, int]] = [(tree, 1)]
        while stack:
            node, line = stack.pop()
            line = getattr(node, "lineno", None) or line
            self._check_node(node, line)
            stack.extend((child, line) for child in reversed(list(ast.iter_child_nodes(node))))

    # -- reporting
    def _construct(self, node: ast.AST, fallback: str) -> str:
        try:
            text = ast.get_source_segment(self.source, node) or fallback
        except (ValueError, IndexError):
            text = fallback
        text = " ".join(text.split())
        return text if len(text) <= 80 else text[:77] + "..."

    def _refuse(self, node: ast.AST | None, line: int, fallback: str, why: str, instead: str) -> None:
        construct = fallback if node is None else self._construct(node, fallback)
        raise SandboxViolation(
            f"{where(line, self.filename)}: `{construct}` is not allowed in a remote trace body: {why}; {instead}",
            lineno=line, filename=self.filename, construct=construct,
        )

    # -- dispatch
    def _check_node(self, node: ast.AST, line: int) -> None:
        kind = type(node).__name__
        if type(node) not in _ALLOWED_NODES:
            why, instead = _REFUSED_NODES.get(kind, (f"`{kind}` is not supported in remote bodies", "rewrite it"))
            self._refuse(node, line, kind, why, instead)
        for field in _BOUND_NAME_FIELDS.get(kind, ()):  # names bound by match patterns
            if getattr(node, field, None) is not None:
                self._name(getattr(node, field), node, line)
        handler = getattr(self, f"_check_{kind}", None)
        if handler is not None:
            handler(node, line)

    def _check_Name(self, node: ast.Name, line: int) -> None:
        self._name(node.id, node, line)

    def _check_arg(self, node: ast.arg, line: int) -> None:
        self._name(node.arg, node, line)

    def _check_keyword(self, node: ast.keyword, line: int) -> None:
        if node.arg is not None and node.arg.startswith("_"):
            self._refuse(node, line, node.arg, "keyword arguments starting with an underscore reach internals",
                         "rename it without the leading underscore")
        if node.arg in CLIENT_OPTIONS:
            self._refuse(node, line, f"{node.arg}=", "code on the server cannot start remote requests (it is an "
                         "option of the seethrough client)", "run the inner trace on the server itself: drop "
                         f"`{node.arg}=`")
        if node.arg in _LOADING_KEYWORDS:
            self._refuse(node, line, f"{node.arg}=", "it makes the server load and run code or files",
                         "use the model as the server serves it")

    def _check_Nonlocal(self, node: ast.Nonlocal, line: int) -> None:
        for name in node.names:
            self._name(name, node, line)

    def _check_FunctionDef(self, node: ast.FunctionDef, line: int) -> None:
        self._name(node.name, node, line)
        if node.decorator_list:
            decorator = node.decorator_list[0]
            self._refuse(None, decorator.lineno, "@" + self._construct(decorator, "decorator"), "decorators are not allowed",
                         "call the function explicitly, e.g. f = wrap(f)")
        if getattr(node, "type_params", None):
            self._refuse(node, line, node.name, "generic type parameters are not supported", "remove them")

    def _check_ExceptHandler(self, node: ast.ExceptHandler, line: int) -> None:
        if node.type is None:
            self._refuse(None, line, "except:", "a bare except would swallow the server's cancellation of the "
                         "request", "catch Exception (except Exception:)")
        if node.name is not None:
            self._name(node.name, node, line)

    def _check_comprehension(self, node: ast.comprehension, line: int) -> None:
        if node.is_async:
            self._refuse(None, line, "async for", "async code exposes coroutine frames", "use a plain for")

    def _check_MatchClass(self, node: ast.MatchClass, line: int) -> None:
        # `case C(attr=...)` reads attributes past the run-time allowlist.
        self._refuse(node, line, "case " + self._construct(node, "C(...)"), "class patterns read attributes "
                     "past the server's checks", "match values (case 1:), sequences or mappings, or use isinstance")

    def _check_Attribute(self, node: ast.Attribute, line: int) -> None:
        self._attribute(node.attr, node, line)
        if not isinstance(node.ctx, ast.Load) and node.attr not in ASSIGNABLE_ATTRIBUTES:
            allowed = ", ".join(f".{name}" for name in sorted(ASSIGNABLE_ATTRIBUTES))
            self._refuse(node, line, node.attr,
                         f"assigning or deleting attributes would change objects that outlive the request "
                         f"(only {allowed} can be assigned)", "assign to a variable, or edit tensors in place (x[...] = v)")

    def _check_Import(self, node: ast.Import, line: int) -> None:
        for alias in node.names:
            if alias.name not in ALLOWED_MODULES:
                self._refuse(node, line, f"import {alias.name}", "remote bodies may import only "
                             + ", ".join(sorted(ALLOWED_MODULES)), "compute with torch, math and einops")
            if alias.asname is not None:
                self._name(alias.asname, node, line)

    def _check_ImportFrom(self, node: ast.ImportFrom, line: int) -> None:
        module = node.module or ""
        text = f"from {'.' * node.level}{module} import ..."
        if node.level or module not in ALLOWED_MODULES:
            self._refuse(node, line, text, "remote bodies may import only " + ", ".join(sorted(ALLOWED_MODULES)),
                         "compute with torch, math and einops")
        for alias in node.names:
            if alias.name == "*":
                self._refuse(node, line, text, "star imports hide which names the body uses",
                             f"import the names you need, or `import {module}`")
            if f"{module}.{alias.name}" not in ALLOWED_MODULES and alias.name not in _static_members(module):
                self._refuse(node, line, f"from {module} import {alias.name}",
                             f"`{module}.{alias.name}` is not available in remote trace bodies",
                             "use the tensor maths of torch, math and einops")
            if alias.asname is not None:
                self._name(alias.asname, node, line)

    # -- shared rules
    def _name(self, name: str, node: ast.AST, line: int) -> None:
        if name == "_":
            return
        if name.startswith("_"):
            self._refuse(node, line, name, "names starting with an underscore are reserved: they reach Python "
                         "internals (__class__, __globals__, __builtins__, __import__ ...)",
                         "rename it without the leading underscore")
        rule = FORBIDDEN_NAMES.get(name)
        if rule is not None:
            self._refuse(node, line, name, f"`{name}` is refused because {rule[0]}", rule[1])

    def _attribute(self, attr: str, node: ast.AST, line: int) -> None:
        if attr.startswith("_"):
            self._refuse(node, line, attr, "attributes starting with an underscore are private or Python internals "
                         "(model._model, x.__class__, f.__globals__ ...)", "use public attributes only")
        rule = attribute_rule(attr)
        if rule is not None:
            self._refuse(node, line, attr, f"`.{attr}` is refused because {rule[0]}", rule[1])


def attribute_rule(attr: str) -> tuple[str, str] | None:
    """``(why, instead)`` if the attribute name is forbidden, else None."""
    rule = FORBIDDEN_ATTRIBUTES.get(attr)
    if rule is not None or attr in PREFIX_EXCEPTIONS:
        return rule
    for prefix, why, instead in FORBIDDEN_ATTRIBUTE_PREFIXES:
        if attr.startswith(prefix):
            return why, instead
    return None


# -- module proxies ---------------------------------------------------------------------

_TORCH_MEMBERS = """tensor as_tensor zeros ones full arange linspace logspace eye randn rand randint randperm
    rand_like randn_like randint_like zeros_like ones_like full_like normal bernoulli multinomial poisson
    cat concat concatenate stack hstack vstack dstack column_stack split chunk tensor_split unbind narrow flatten
    unflatten reshape squeeze unsqueeze transpose permute movedim moveaxis swapaxes swapdims t flip fliplr flipud
    roll rot90 gather scatter scatter_add index_select masked_select masked_fill take take_along_dim
    repeat_interleave tile broadcast_to broadcast_tensors broadcast_shapes atleast_1d atleast_2d atleast_3d
    matmul mm bmm mv einsum outer inner dot vdot tensordot kron cross baddbmm addmm addmv addbmm
    softmax log_softmax sigmoid tanh relu topk kthvalue argmax argmin argsort sort msort where clamp clip nonzero
    count_nonzero unique unique_consecutive bincount histc bucketize searchsorted norm dist cdist mean median
    nanmean nanmedian mode sum nansum prod std var std_mean var_mean max min amax amin maximum minimum fmax fmin
    aminmax cumsum cumprod cummax cummin logcumsumexp logsumexp diff quantile nanquantile cov corrcoef
    exp exp2 expm1 log log2 log10 log1p sqrt rsqrt abs absolute neg negative sign sgn signbit square pow
    float_power sin cos tan asin acos atan atan2 arcsin arccos arctan arctan2 sinh cosh asinh acosh atanh floor
    ceil round trunc fix frac fmod remainder reciprocal erf erfc erfinv lerp lgamma digamma sinc logit xlogy
    hypot heaviside deg2rad rad2deg logaddexp logaddexp2 add sub subtract mul multiply div divide true_divide
    floor_divide addcmul addcdiv eq ne not_equal lt less le less_equal gt greater ge greater_equal equal allclose
    isclose isnan isinf isfinite isneginf isposinf isreal isin logical_and logical_or logical_not logical_xor
    bitwise_and bitwise_or bitwise_xor bitwise_not bitwise_left_shift bitwise_right_shift all any diag
    diag_embed diagonal diagflat trace tril triu tril_indices triu_indices block_diag cartesian_prod
    combinations meshgrid vander nan_to_num real imag angle conj conj_physical resolve_conj resolve_neg complex
    polar view_as_real view_as_complex clone detach dropout layer_norm group_norm embedding cosine_similarity
    pairwise_distance pdist is_tensor is_floating_point is_complex is_nonzero numel result_type promote_types
    can_cast no_grad enable_grad inference_mode set_grad_enabled is_grad_enabled is_inference_mode_enabled
    manual_seed Generator get_default_dtype Size dtype device finfo iinfo float32 float float16 half bfloat16
    float64 double int64 long int32 int int16 short int8 uint8 bool complex64 cfloat complex128 cdouble
    complex32 chalf uint16 uint32 uint64 float8_e4m3fn float8_e5m2 inf nan pi e preserve_format contiguous_format
    channels_last""".split()
_FUNCTIONAL_MEMBERS = """relu relu_ relu6 gelu silu mish elu selu celu leaky_relu prelu rrelu glu hardtanh
    hardswish hardsigmoid hardshrink softshrink tanhshrink softsign softplus softmin softmax log_softmax
    gumbel_softmax sigmoid logsigmoid tanh threshold linear bilinear layer_norm rms_norm group_norm batch_norm
    instance_norm local_response_norm normalize dropout dropout1d dropout2d alpha_dropout embedding
    embedding_bag one_hot pad interpolate grid_sample affine_grid pixel_shuffle pixel_unshuffle unfold fold
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d avg_pool1d avg_pool2d max_pool1d max_pool2d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d scaled_dot_product_attention
    cosine_similarity pairwise_distance pdist cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss
    kl_div binary_cross_entropy binary_cross_entropy_with_logits poisson_nll_loss gaussian_nll_loss
    cosine_embedding_loss margin_ranking_loss hinge_embedding_loss triplet_margin_loss soft_margin_loss
    multilabel_soft_margin_loss multi_margin_loss""".split()
_LINALG_MEMBERS = """norm vector_norm matrix_norm svd svdvals eig eigh eigvals eigvalsh qr inv inv_ex pinv solve
    solve_ex lstsq det slogdet matrix_rank cholesky cholesky_ex matrix_power matrix_exp cross vecdot multi_dot lu
    lu_factor lu_solve householder_product tensorinv tensorsolve cond diagonal vander solve_triangular""".split()
_FFT_MEMBERS = """fft ifft fft2 ifft2 fftn ifftn rfft irfft rfft2 irfft2 rfftn irfftn hfft ihfft hfft2 ihfft2 fftfreq
    rfftfreq fftshift ifftshift""".split()
_EINOPS_MEMBERS = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack", "parse_shape")
_EINOPS_REDUCTIONS = frozenset({"min", "max", "sum", "mean", "prod", "any", "all"})


def _static_members(module: str) -> frozenset[str]:
    """Names ``from module import name`` may take (checked before running)."""
    if module == "einops":
        return frozenset(_EINOPS_MEMBERS)  # without importing it: it may be missing here
    return frozenset(_proxy(module)._members) if module in ALLOWED_MODULES else frozenset()


class _ModuleProxy(ReadOnlyView):
    """A read-only stand-in for a module that exposes only allowed members."""

    __slots__ = ("_module_name", "_members")

    def __init__(self, module_name: str, members: dict[str, Any]) -> None:
        super().__init__(_module_name=module_name, _members=members)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        members = self._members
        if attr in members:
            return members[attr]
        raise SandboxViolation(
            f"{user_line()}`{self._module_name}.{attr}` is not available in remote trace bodies; "
            "use the tensor maths of torch, math and einops (see seethrough.remote.server.sandbox for the list)",
            construct=f"{self._module_name}.{attr}",
        )

    def _written(self, attr: str) -> str:
        return f"modules are read-only in remote trace bodies (tried to change `{self._module_name}.{attr}`)"

    def __repr__(self) -> str:
        return f"<module {self._module_name!r} (remote sandbox)>"


class _TensorClassMeta(type):
    """Makes the stand-in behave like torch.Tensor for isinstance and method lookup."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, torch.Tensor)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return isinstance(subclass, type) and issubclass(subclass, torch.Tensor)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(torch.Tensor, attr)


class _SandboxTensor(metaclass=_TensorClassMeta):
    """``torch.Tensor`` in remote bodies: isinstance works, the legacy constructor does not."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise SandboxViolation(f"{user_line()}`torch.Tensor(...)` is not available in remote trace bodies: it "
                               "may return uninitialized memory; use torch.tensor(data) or torch.zeros(shape)")


_SandboxTensor.__name__ = _SandboxTensor.__qualname__ = "torch.Tensor"


def _zeros_for_empty(*size: Any, **kwargs: Any) -> torch.Tensor:
    """torch.empty, but zeroed: fresh memory may hold another request's data."""
    kwargs.pop("memory_format", None)
    return torch.zeros(*size, **kwargs)


def _pick(module: Any, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(module, name) for name in names if hasattr(module, name)}


def _einops_proxy() -> _ModuleProxy:
    try:
        einops = importlib.import_module("einops")
    except ImportError:
        raise ModuleNotFoundError(f"{user_line()}einops is not installed on this seethrough server; "
                                  "use torch.einsum / reshape / permute instead", name="einops") from None
    members = _pick(einops, _EINOPS_MEMBERS)
    real_reduce = members.get("reduce")
    if real_reduce is not None:
        def reduce(tensor: Any, pattern: str, reduction: Any, **axes_lengths: Any) -> Any:
            # einops turns a reduction *name* into a method lookup: only its own names may pass.
            if not callable(reduction) and reduction not in _EINOPS_REDUCTIONS:
                raise SandboxViolation(f"{user_line()}einops.reduce: unknown reduction {reduction!r}; "
                                       f"use one of {sorted(_EINOPS_REDUCTIONS)}")
            return real_reduce(tensor, pattern, reduction, **axes_lengths)

        members["reduce"] = reduce
    return _ModuleProxy("einops", members)


_PROXIES: dict[str, _ModuleProxy] = {}


def _proxy(name: str) -> _ModuleProxy:
    """The proxy of an allowed module (built once; they are immutable)."""
    if name in _PROXIES:
        return _PROXIES[name]
    proxy: _ModuleProxy
    if name == "einops":
        proxy = _einops_proxy()
    elif name == "math":
        proxy = _ModuleProxy("math", {n: getattr(math, n) for n in dir(math) if not n.startswith("_")})
    elif name == "torch.nn.functional":
        proxy = _ModuleProxy(name, _pick(torch.nn.functional, _FUNCTIONAL_MEMBERS))
    elif name == "torch.nn":
        # No classes (Module, Parameter, layers): their attributes are shared by every request.
        proxy = _ModuleProxy(name, {"functional": _proxy("torch.nn.functional")})
    elif name == "torch.linalg":
        proxy = _ModuleProxy(name, _pick(torch.linalg, _LINALG_MEMBERS))
    elif name == "torch.fft":
        proxy = _ModuleProxy(name, _pick(torch.fft, _FFT_MEMBERS))
    elif name == "torch":
        members = _pick(torch, _TORCH_MEMBERS)
        members.update(empty=_zeros_for_empty, empty_like=torch.zeros_like, Tensor=_SandboxTensor,
                       nn=_proxy("torch.nn"), linalg=_proxy("torch.linalg"), fft=_proxy("torch.fft"))
        proxy = _ModuleProxy(name, members)
    else:
        raise SandboxViolation(f"{user_line()}`import {name}` is not allowed in a remote trace body")
    _PROXIES[name] = proxy
    return proxy


def module_proxy(name: str) -> Any:
    """The read-only proxy that ``import name`` gives a remote body.

    For a server that binds names to modules the user's code referred to
    before the body (``import torch.nn.functional as F`` at the top of the
    user's file): pass ``module_proxy("torch.nn.functional")`` in ``extra``.
    Raises :class:`SandboxViolation` for modules outside :data:`ALLOWED_MODULES`.
    """
    if name not in ALLOWED_MODULES:
        raise SandboxViolation(f"`{name}` is not available in remote trace bodies; remote bodies may use only "
                               + ", ".join(sorted(ALLOWED_MODULES)), construct=name)
    return _proxy(name)


def _guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    """``__import__`` of remote bodies: allowed modules only, as proxies."""
    if level != 0 or name not in ALLOWED_MODULES:
        shown = "." * level + name
        raise SandboxViolation(
            f"{user_line()}`import {shown}` is not allowed in a remote trace body; remote bodies may import only "
            + ", ".join(sorted(ALLOWED_MODULES)), construct=f"import {shown}")
    return _proxy(name if fromlist else name.split(".")[0])


# -- the namespace ------------------------------------------------------------------------

_SAFE_BUILTIN_NAMES = """abs all any bool bytes callable chr complex dict divmod enumerate filter float frozenset
    hash hex bin oct int isinstance issubclass iter len list map max min next ord pow range repr reversed round set
    slice sorted str sum tuple zip Ellipsis NotImplemented Exception ArithmeticError AssertionError
    AttributeError FloatingPointError IndexError KeyError LookupError NameError NotImplementedError OverflowError
    RecursionError RuntimeError StopIteration TypeError UnboundLocalError ValueError ZeroDivisionError""".split()


def safe_builtins(print_function: Callable[..., Any] = print) -> dict[str, Any]:
    """The ``__builtins__`` of remote bodies: harmless builtins, ``print_function``
    as ``print``, and an ``__import__`` that hands out module proxies."""
    table = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
    table["print"] = print_function
    table["__import__"] = _guarded_import
    return table


def safe_globals(extra: dict[str, Any], print_function: Callable[..., Any] = print,
                 guard: Guard | None = None) -> dict[str, Any]:
    """The global namespace a validated body runs in: ``extra`` plus safe builtins.

    ``extra`` holds the user's variables (decoded from the wire), ``model``,
    ``tracer`` and the like; its names must be identifiers without a leading
    underscore, and it must not hold modules (the body gets modules only
    through ``import``, as proxies).  ``guard`` (a fresh :class:`~.reach.Guard`
    by default) checks every attribute the code compiled by
    :func:`compile_body` touches.
    """
    namespace: dict[str, Any] = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise SandboxViolation(f"cannot pass a variable named {name!r} into a remote trace body: names must be "
                                   "identifiers that do not start with an underscore")
        if isinstance(value, types.ModuleType):
            raise SandboxViolation(f"cannot pass the module {value.__name__!r} as variable {name!r} into a remote "
                                   "trace body; the body imports modules itself (as sandboxed proxies)")
        namespace[name] = value
    namespace["__builtins__"] = safe_builtins(print_function)
    namespace["__name__"] = "__remote_body__"
    namespace.update((guard if guard is not None else Guard()).namespace())
    return namespace


def compile_body(tree: ast.Module, filename: str) -> types.CodeType:
    """Compile a validated tree with its attribute accesses routed through the guard."""
    with PARSE_LOCK:
        return compile(guard_tree(tree), filename, "exec", dont_inherit=True)


def run_body(source: str, extra: dict[str, Any], filename: str = DEFAULT_FILENAME,
             print_function: Callable[..., Any] = print) -> dict[str, Any]:
    """Validate ``source``, then run it in ``safe_globals(extra)``; return that namespace.

    No time or memory limit: the server's worker process adds those.
    """
    code = compile_body(validate(source, filename), filename)
    namespace = safe_globals(extra, print_function)
    exec(code, namespace)
    return namespace


@contextlib.contextmanager
def isolated_rng_state(fresh: bool = True) -> Iterator[None]:
    """Seed torch's global RNG afresh (``fresh``) and restore its state on exit.

    Each request starts from its own random seed, so one user's draws say
    nothing about another's; a body that wants reproducible draws calls
    ``torch.manual_seed`` (which lasts until the request ends).
    """
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        if fresh:
            torch.manual_seed(secrets.randbits(63))
        yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
