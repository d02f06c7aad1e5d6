"""Sharded safetensors checkpoint directories: written with their index, and read back by key.

Every checkpoint directory mgmlora writes or reads by its layout goes through here: MGM's merged checkpoint in the
original layout (`write_sharded`), the index of a merged text model that transformers saved as one file (`write_index`),
and the key -> file map the MGM and layer-by-layer loaders read (`safetensors_files`). Adapter and trainable files are
single files (mgmlora.training.checkpoint.write_tensors). The index is written even for one shard, because MGM's own
loader (and others) read `model.safetensors.index.json` only. Shard sizes and names are huggingface_hub's
(`model.safetensors`, or `model-0000k-of-0000n.safetensors`), so the directory reads like any Hugging Face checkpoint.

The index is written last, under a temporary name renamed into place: an index never names a shard that is not
complete. The merge writes into a fresh staged directory (mgmlora.tools.output_dir), so
no shard of an earlier save survives beside the new ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, from its header alone (8-byte length, then JSON with offsets)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def safetensors_files(directory: Path) -> dict[str, Path] | None:
    """Checkpoint key -> file of the safetensors checkpoint in `directory`, from its index or its one file's header.

    None when `directory` holds neither `model.safetensors.index.json` nor `model.safetensors`.

    Raises:
        FileNotFoundError: when the index names shards that are not in `directory`.
    """
    index = directory / INDEX
    if index.is_file():
        files = {key: directory / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return files
    if (directory / SINGLE).is_file():
        return dict.fromkeys(_tensor_bytes(directory / SINGLE), directory / SINGLE)
    return None


def write_index(directory: Path, files: list[str] | None = None) -> None:
    """Writes `directory`'s index of the safetensors `files` in it (default: the one `model.safetensors`)."""
    weight_map, total = {}, 0
    for name in files or [SINGLE]:
        sizes = _tensor_bytes(directory / name)
        weight_map.update(dict.fromkeys(sizes, name))
        total += sum(sizes.values())
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(tmp, directory / INDEX)


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Writes `tensors` as shards of at most `max_shard_bytes` each, then the index.

    A tensor larger than `max_shard_bytes` gets a shard of its own (huggingface_hub's split).
    """
    directory.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for name, keys in split.filename_to_tensors.items():
        shard = {k: tensors[k].detach().contiguous().cpu() for k in keys}
        save_file(shard, directory / name, metadata={"format": "pt"})  # streamed to disk: shards are large
    write_index(directory, list(split.filename_to_tensors))


__all__ = ["INDEX", "safetensors_files", "write_index", "write_sharded"]
