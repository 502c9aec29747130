"""Extra names for modules: ``rename=`` and the standard names.

Two kinds of alias:

* a *path alias* gives the root a new attribute for a module deeper down
  (``model.layers`` for ``model.transformer.h``);
* a *name alias* gives every module that has a child called X another name
  for it (``.attn`` for a block's ``.self_attn``).

Common architectures get the standard names ``layers``, ``attn``, ``mlp``,
``embed``, ``unembed`` and ``final_norm`` automatically, where the model has
such modules.  ``rename={...}`` adds the user's own: a key with a dot is a
path (``{"transformer.h": "blocks"}``), a key without one a child name
(``{"self_attn": "attention"}``).
"""

from __future__ import annotations

import torch

# For each standard root-level name, the paths it may stand for, in order.
STANDARD_PATHS: dict[str, tuple[str, ...]] = {
    "layers": (
        "transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers",
        "transformer.layers", "bert.encoder.layer", "encoder.layer", "vit.encoder.layer",
        "model.language_model.layers", "h", "layers",
    ),
    "embed": (
        "transformer.wte", "model.embed_tokens", "model.decoder.embed_tokens", "gpt_neox.embed_in",
        "bert.embeddings", "embeddings", "vit.embeddings", "embed_tokens", "wte",
    ),
    "unembed": ("lm_head", "embed_out", "cls", "classifier"),
    "final_norm": (
        "transformer.ln_f", "model.norm", "model.decoder.final_layer_norm",
        "gpt_neox.final_layer_norm", "vit.layernorm", "layernorm", "norm", "ln_f",
    ),
}

# For each standard child name, the child names it may stand for.
STANDARD_NAMES: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "attention", "self_attention", "attn"),
    "mlp": ("mlp", "feed_forward", "ffn"),
}


def _has_path(module: torch.nn.Module, path: str) -> bool:
    current = module
    for part in path.split("."):
        modules = current._modules
        if part not in modules or modules[part] is None:
            return False
        current = modules[part]
    return True


def standard_aliases(module: torch.nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """The standard path aliases that exist in ``module``, and the name aliases."""
    paths: dict[str, str] = {}
    for name, candidates in STANDARD_PATHS.items():
        if name in module._modules:
            continue  # the model already has a module by that name
        for path in candidates:
            if path != name and _has_path(module, path):
                paths[name] = path
                break
    return paths, dict(STANDARD_NAMES)


def split_rename(rename: dict[str, str]) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """``rename={real: alias}`` as (path aliases, name aliases)."""
    paths: dict[str, str] = {}
    names: dict[str, tuple[str, ...]] = {}
    for real, alias in rename.items():
        if not isinstance(real, str) or not isinstance(alias, str) or not alias.isidentifier():
            raise ValueError(
                f"rename={{{real!r}: {alias!r}}}: keys are module paths or names, values are new "
                "names (Python identifiers)."
            )
        if "." in real:
            paths[alias] = real
        else:
            names[alias] = (real,)
    return paths, names
