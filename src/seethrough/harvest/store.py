"""The on-disk store of a harvest: safetensors shards plus a JSON manifest.

A store is a folder::

    harvest.json            what run made it (fingerprint), the kept names,
                            and the complete shards, in order
    shard-00000.safetensors one window of consecutive prompts: every kept
                            name's rows plus the index of its tokens

A shard is written to a temporary name and renamed into place, then listed
in the manifest (also replaced atomically): a crash or Ctrl+C leaves only
complete shards, and a shard not listed in the manifest is ignored (and
overwritten) by the run that resumes.

Per-token names hold one row per real token (padding dropped) in prompt
order; the index tensors ``_prompt`` (global prompt id), ``_position``
(position in the prompt) and ``_token`` (token id) give each row's origin.
Per-prompt names hold one row per prompt.  :func:`load` reads a store back
memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save

from ..errors import SeethroughError, UsageIndexError

FORMAT = "seethrough-harvest/1"
MANIFEST = "harvest.json"
INDEX_NAMES = ("_prompt", "_position", "_token")


class HarvestStoreError(SeethroughError):
    """A harvest store folder cannot be used as asked (another run's store,
    not a store at all, damaged)."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HarvestStoreError(f"{path} is not a readable harvest manifest ({error}); move the folder away or pick another `to=`.") from None
    if data.get("format") != FORMAT:
        raise HarvestStoreError(f"{path} is not a seethrough harvest manifest (format {data.get('format')!r}, expected {FORMAT!r}).")
    return data


class StoreWriter:
    """Writes shards into a folder and keeps its manifest: fresh, resumed, or refused."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = read_manifest(self.folder)
        if existing is not None and overwrite:
            self._clear()
            existing = None
        if existing is None:
            leftovers = [p.name for p in self.folder.iterdir() if not p.name.startswith(".")]
            if leftovers and not overwrite:
                raise HarvestStoreError(
                    f"`to={str(folder)!r}` is not empty and holds no harvest store ({', '.join(sorted(leftovers)[:5])}"
                    f"{', ...' if len(leftovers) > 5 else ''}): pick an empty or new folder."
                )
            self.manifest = {"format": FORMAT, "fingerprint": fingerprint, "keys": None, "shards": [], "complete": False,
                             "settings": {}}
            self._save()
        else:
            different = sorted(
                key for key in set(fingerprint) | set(existing.get("fingerprint", {}))
                if fingerprint.get(key) != existing.get("fingerprint", {}).get(key)
            )
            if different:
                raise HarvestStoreError(
                    f"`to={str(folder)!r}` holds the store of a different harvest (it differs in: {', '.join(different)}); "
                    "shards of two runs are never mixed. Use another folder, or pass `overwrite=True` to delete that store."
                )
            self.manifest = existing
        # Remove shards the manifest does not list (a crash between rename and manifest).
        listed = {entry["file"] for entry in self.manifest["shards"]}
        for path in self.folder.glob("shard-*.safetensors*"):
            if path.name not in listed:
                path.unlink()

    def _clear(self) -> None:
        for path in list(self.folder.glob("shard-*.safetensors*")) + [self.folder / MANIFEST]:
            if path.exists():
                path.unlink()

    def _save(self) -> None:
        _write_json(self.folder / MANIFEST, self.manifest)

    @property
    def done_shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def settings(self) -> dict:
        return self.manifest.setdefault("settings", {})

    def set_settings(self, **values: Any) -> None:
        self.settings.update(values)
        self._save()

    def check_keys(self, keys: dict) -> None:
        """The kept names and their kinds must be those of the shards already written."""
        known = self.manifest.get("keys")
        if known is None:
            self.manifest["keys"] = keys
            self._save()
        elif known != keys:
            raise HarvestStoreError(
                f"the body kept {_describe(keys)}, but the store in {str(self.folder)!r} holds {_describe(known)}: "
                "one store holds one run's values. Use another folder, or `overwrite=True`."
            )

    def write_shard(self, tensors: dict[str, torch.Tensor], prompts: tuple[int, int], tokens: int, inputs_sha: str) -> int:
        """Write one complete shard; returns its size in bytes."""
        number = len(self.manifest["shards"])
        name = shard_name(number)
        path = self.folder / name
        tmp = path.with_name(name + ".tmp")
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
        digest = hashlib.sha256(data).hexdigest()
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        size = len(data)
        del data
        os.replace(tmp, path)
        self.manifest["shards"].append(
            {"file": name, "prompts": list(prompts), "tokens": tokens, "inputs_sha": inputs_sha, "sha256": digest}
        )
        self._save()
        return size

    def finish(self) -> None:
        self.manifest["complete"] = True
        self.manifest["prompts"] = self.manifest["shards"][-1]["prompts"][1] if self.manifest["shards"] else 0
        self.manifest["tokens"] = sum(entry["tokens"] for entry in self.manifest["shards"])
        self._save()


def _describe(keys: dict) -> str:
    return ", ".join(f"{name!r} ({info['per']}, {info['dtype']}, {tuple(info['shape'])})" for name, info in sorted(keys.items())) or "nothing"


# -- reading ----------------------------------------------------------------------

_DTYPES = {
    "F64": (torch.float64, np.float64), "F32": (torch.float32, np.float32), "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.uint16), "I64": (torch.int64, np.int64), "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16), "I8": (torch.int8, np.int8), "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a read-only memory-mapped torch tensor."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    out = {}
    for name, info in header.items():
        torch_dtype, np_dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end == start:
            out[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        array = np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=(count,))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mmap: torch warns it is not writable
            tensor = torch.from_numpy(array)
        if torch_dtype is torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.reshape(shape)
    return out


class Rows:
    """One kept name across all shards: indexable like a tensor along its first
    dimension (int, slice, index tensor/list), memory-mapped; ``.shards`` are
    the per-shard tensors and ``torch.cat``-free reads touch only the rows asked."""

    def __init__(self, name: str, shards: list[torch.Tensor]) -> None:
        self.name = name
        self.shards = shards
        self._starts = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> torch.Size:
        tail = self.shards[0].shape[1:] if self.shards else ()
        return torch.Size((len(self), *tail))

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0].dtype if self.shards else torch.float32

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, int):
            if index < 0:
                index += len(self)
            if not 0 <= index < len(self):
                raise UsageIndexError(f"row {index} out of range for {self.name!r} with {len(self)} rows")
            shard = int(np.searchsorted(self._starts, index, side="right") - 1)
            return self.shards[shard][index - int(self._starts[shard])].clone()
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() == 0:
            return self[int(index)]
        if len(index) and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise UsageIndexError(f"row index out of range for {self.name!r} with {len(self)} rows")
        index = torch.where(index < 0, index + len(self), index)
        which = torch.as_tensor(np.searchsorted(self._starts, index.numpy(), side="right") - 1)
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        for shard in torch.unique(which).tolist():
            picked = (which == shard).nonzero().flatten()
            out[picked] = self.shards[shard][index[picked] - int(self._starts[shard])]
        return out

    def tensor(self) -> torch.Tensor:
        """All rows as one in-memory tensor (a copy: mind the size)."""
        return torch.cat(self.shards) if self.shards else torch.empty(self.shape, dtype=self.dtype)

    def __repr__(self) -> str:
        return f"Rows({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self.shards)})"


class HarvestStore:
    """A harvest store read back: ``store["resid5"]`` (a :class:`Rows`),
    ``store.index`` (per-token prompt ids and positions), a shuffling token
    iterator (:meth:`batches`) and a ``torch.utils.data.Dataset`` (:meth:`dataset`)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise HarvestStoreError(f"{str(folder)!r} holds no harvest store (no {MANIFEST}); pass the folder given as `to=`.")
        self.manifest = manifest
        self.keys_info: dict = manifest.get("keys") or {}
        self.complete: bool = bool(manifest.get("complete"))
        self._shards = [mmap_safetensors(self.folder / entry["file"]) for entry in manifest["shards"]]
        self.n_prompts = manifest["shards"][-1]["prompts"][1] if manifest["shards"] else 0
        self.n_tokens = sum(entry["tokens"] for entry in manifest["shards"])

    def keys(self) -> list[str]:
        return sorted(self.keys_info)

    def per(self, name: str) -> str:
        """``"token"`` or ``"prompt"``: what one row of ``name`` stands for."""
        return self._info(name)["per"]

    def _info(self, name: str) -> dict:
        if name not in self.keys_info:
            raise HarvestStoreError(f"the store in {str(self.folder)!r} kept no {name!r}; it holds {', '.join(self.keys()) or 'nothing'}.")
        return self.keys_info[name]

    def __getitem__(self, name: str) -> Rows:
        if name in INDEX_NAMES:
            return Rows(name, [shard[name] for shard in self._shards])
        self._info(name)
        return Rows(name, [shard[name] for shard in self._shards])

    @property
    def index(self) -> dict[str, Rows]:
        """Per-token rows' origin: ``prompt`` (global prompt id), ``position``, ``token`` (id)."""
        return {name[1:]: self[name] for name in INDEX_NAMES}

    def batches(self, names: str | list[str], batch_size: int = 4096, shuffle: bool = True, seed: int = 0,
                index: bool = False) -> Iterator[Any]:
        """Batches of rows of the per-token (or per-prompt) ``names``, shuffled
        shard by shard (shard order, then rows within each shard), so memory
        holds one shard's worth at most.  One name gives tensors; a list gives
        dicts (``index=True`` adds ``_prompt``, ``_position``, ``_token``)."""
        single = isinstance(names, str)
        wanted = [names] if single else list(names)
        kinds = {self.per(name) for name in wanted}
        if len(kinds) > 1:
            raise HarvestStoreError(f"{wanted} mix per-token and per-prompt values; their rows do not line up.")
        if index:
            if kinds != {"token"}:
                raise HarvestStoreError("`index=True` describes per-token rows; these names are per-prompt.")
            wanted = wanted + list(INDEX_NAMES)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self._shards), generator=generator).tolist() if shuffle else range(len(self._shards))
        for number in order:
            shard = self._shards[number]
            rows = len(shard[wanted[0]])
            perm = torch.randperm(rows, generator=generator) if shuffle else torch.arange(rows)
            for start in range(0, rows, batch_size):
                pick = perm[start : start + batch_size]
                batch = {name: shard[name][pick] for name in wanted}
                yield batch[names] if single and not index else batch

    def dataset(self, name: str) -> "RowsDataset":
        """A ``torch.utils.data.Dataset`` over the rows of ``name``."""
        self._info(name)
        return RowsDataset(self[name])

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"HarvestStore({str(self.folder)!r}, {state}, prompts={self.n_prompts}, tokens={self.n_tokens}, "
                f"keys={self.keys()})")


class RowsDataset(torch.utils.data.Dataset):
    """``store.dataset(name)``: item ``i`` is row ``i`` of ``name``."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[int(index)]


def load(folder: str | os.PathLike) -> HarvestStore:
    """Open a harvest store (the ``to=`` folder of ``model.harvest``) memory-mapped."""
    return HarvestStore(folder)
