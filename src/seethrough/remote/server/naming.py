"""The names a served model answers to.

A model served as ``--model smollm2=HuggingFaceTB/SmolLM2-135M-Instruct``
answers to its served name (``smollm2``), to what it was loaded from (the repo
id, or the folder path as given) and to the real path of the folder it loaded
(so ``LanguageModel("/models/gpt2")`` on the same machine, or any other
spelling of that folder, reaches it).  A name two models would share belongs
to neither (the served names always win), so a request never reaches a model
its sender did not mean.

Only names that say nothing about the server's disk are listed publicly
(``/v1/models``): the served name and a repo id.  Folder paths are accepted,
never shown.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .settings import ModelSpec

__all__ = ["ModelNames", "model_names"]

logger = logging.getLogger("seethrough.server")


@dataclass(frozen=True)
class ModelNames:
    """Every accepted name -> its served name; and each model's public names."""

    aliases: dict[str, str] = field(default_factory=dict)
    public: dict[str, list[str]] = field(default_factory=dict)

    def resolve(self, name: str) -> str | None:
        """The served name ``name`` stands for, or None."""
        return self.aliases.get(name)


def _looks_like_a_path(text: str) -> bool:
    return text.startswith((os.sep, ".", "~")) or text.count("/") > 1 or os.path.isdir(text)


def _folder_names(source: str, resolved: str | None) -> set[str]:
    names = set()
    for path in (source, resolved):
        if path and os.path.isdir(path):
            names.add(os.path.realpath(path))
            names.add(os.path.abspath(path))
    return names


def model_names(specs: tuple[ModelSpec, ...], resolved: dict[str, str | None] | None = None) -> ModelNames:
    """The names of ``specs``; ``resolved`` maps a served name to the local folder it loaded from, if any."""
    resolved = resolved or {}
    served = {spec.name for spec in specs}
    candidates: dict[str, set[str]] = {}
    for spec in specs:
        for alias in {spec.source, *_folder_names(spec.source, resolved.get(spec.name))}:
            if alias and alias not in served:
                candidates.setdefault(alias, set()).add(spec.name)
    aliases = {name: name for name in served}
    for alias, owners in candidates.items():
        if len(owners) == 1:
            aliases[alias] = next(iter(owners))
        else:
            logger.warning("%r would name several models (%s); none of them answers to it", alias,
                           ", ".join(sorted(owners)))
    public = {spec.name: sorted({spec.name} | {alias for alias, owner in aliases.items()
                                                if owner == spec.name and not _looks_like_a_path(alias)})
              for spec in specs}
    return ModelNames(aliases, public)
