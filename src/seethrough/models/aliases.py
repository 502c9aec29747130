"""Extra names for modules: ``rename=`` and the standard names.

Two kinds of alias:

* a *path alias* gives the root a new attribute for a module deeper down
  (``model.layers`` for ``model.transformer.h``);
* a *name alias* gives every module that has a child called X another name
  for it (``.attn`` for a block's ``.self_attn``).

Common architectures get the standard names ``layers``, ``attn``, ``mlp``,
``embed``, ``unembed`` and ``final_norm`` automatically, where the model has
such modules.  ``rename={key: alias}`` adds the user's own, read as nnsight
reads them: the key is a path *relative to any module* that gives the alias
to every module from which that path leads somewhere.  So a full path
(``{"transformer.h": "layers"}``) adds ``model.layers``; a single name, with
or without a leading dot (``{".h": "layers"}``, ``{"self_attn": "attention"}``),
renames that child wherever it occurs (``model.transformer.layers``); a path
part (``{"h.0": "first_layer"}``, ``{"1": "second_layer"}``) adds the alias to
the modules it starts from (``model.transformer.first_layer``,
``model.transformer.h.second_layer``).  An alias may be a list of names.
"""

from __future__ import annotations

import torch

from ..errors import UsageTypeError, UsageValueError

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


def has_path(module: torch.nn.Module, path: str) -> bool:
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
            if path != name and has_path(module, path):
                paths[name] = path
                break
    return paths, dict(STANDARD_NAMES)


RenameRule = tuple[tuple[str, ...], str]


def parse_rename(rename: dict, taken: frozenset[str] = frozenset()) -> list[RenameRule]:
    """``rename={key: alias or [aliases]}`` as ``(key path parts, alias)`` rules
    (see the module docs); ``taken`` names attributes an alias may not hide."""
    if not isinstance(rename, dict):
        raise UsageTypeError(f"rename= takes a dict of {{module path: new name}}, not a {type(rename).__name__}.")
    rules: list[RenameRule] = []
    for key, aliases in rename.items():
        names = [aliases] if isinstance(aliases, str) else aliases
        parts = tuple(key.lstrip(".").split(".")) if isinstance(key, str) else ()
        well_typed = isinstance(key, str) and isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
        if not well_typed or not parts or not all(parts) or not names or not all(n.isidentifier() for n in names):
            # A key or name of the wrong type is a TypeError (as nnsight raises), a bad string a ValueError.
            error = UsageValueError if well_typed else UsageTypeError
            raise error(
                f"rename={{{key!r}: {aliases!r}}}: keys are module paths or names ('transformer.h', "
                "'.h', 'self_attn', 'h.0'), values are new names (Python identifiers) or lists of them."
            )
        for name in names:
            if name in taken:
                raise UsageValueError(
                    f"rename={{{key!r}: {name!r}}}: `{name}` is already an attribute of every wrapped "
                    "model (an accessor or method), so the alias would never be reached. Pick another name."
                )
            rules.append((parts, name))
    return rules
