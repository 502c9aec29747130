"""What a client needs to wrap a model that lives only on a server.

``LanguageModel("name", host=...)`` for a model the client cannot load
itself asks the server for the model's configuration and tokenizer files
(``GET /v1/models``, ``GET /v1/models/{name}/tokenizer``), builds the module
tree on the meta device from the configuration, and loads the tokenizer from
the files (cached under the seethrough cache folder).  Such a wrapper traces
only with ``remote=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .client import RemoteClient, RemoteRequestError


def served_model_info(name: str, host: str | None = None, api_key: str | None = None) -> dict:
    """The server's description of the model it serves as ``name``."""
    client = RemoteClient(host, api_key)
    models = client.models()
    for info in models:
        if info.get("name") == name:
            return info
    names = ", ".join(sorted(str(m.get("name")) for m in models)) or "none"
    raise RemoteRequestError(f"the server at {client.host} does not serve a model named {name!r}; it serves: {names}.")


def served_tokenizer_dir(name: str, host: str | None = None, api_key: str | None = None) -> Path | None:
    """A local folder with the served model's tokenizer files (None if it has none)."""
    from ..models.offline import cache_dir

    client = RemoteClient(host, api_key)
    data = client._json("GET", f"/v1/models/{name}/tokenizer")
    files = (data or {}).get("files") or {}
    if not files:
        return None
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    folder = cache_dir() / "served-tokenizers" / f"{_safe(name)}-{digest}"
    if not folder.exists():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        for filename, text in files.items():
            if "/" in filename or "\\" in filename or filename.startswith("."):
                continue  # only plain file names from the server
            (partial / filename).write_text(text, encoding="utf-8")
        os.replace(partial, folder)
    return folder


def skeleton_from_info(info: dict, automodel: Any = None) -> Any:
    """The served model's module tree on the meta device."""
    import torch
    from transformers import AutoConfig

    from ..models.language import _automodel_for

    config_dict = dict(info.get("config") or {})
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise RemoteRequestError(f"the server sent no model_type for {info.get('name')!r}; cannot build its module tree.")
    config = AutoConfig.for_model(model_type, **config_dict)
    cls = _automodel_for(config, automodel)
    with torch.device("meta"):
        return cls.from_config(config)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
