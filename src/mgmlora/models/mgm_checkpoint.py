"""MGM checkpoints in the original layout: key mapping, safe loading with a full key audit, sharded saving.

Original names (docs/design/mgm.md, Checkpoint keys) versus this package's module tree:

    model.embed_tokens / model.layers.N / model.norm      <->  llm.model.*
    lm_head.weight (tied; absent from safetensors)         <->  llm.lm_head.weight
    model.vision_tower.vision_tower.vision_model.*         <->  vision_tower.*   (CLIPVisionModel; transformers 5.23
                                                                 has no `vision_model.` level, older 5.x may)
    model.vision_tower_aux.{vision_stem,vision_stages}.*   <->  vision_tower_aux.*
    model.mm_projector.* / model.vlm_uni_*_projector.*     <->  mm_projector.* / vlm_uni_*_projector.*
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mgmlora.models.mgm import MGMConfig, MGMForCausalLM

_CLIP_ORIGINAL = "model.vision_tower.vision_tower.vision_model."
_DIRECT = ("vision_tower_aux.", "mm_projector.", "vlm_uni_query_projector.", "vlm_uni_aux_projector.",
           "vlm_uni_val_projector.")


def _clip_prefix(model: MGMForCausalLM) -> str:
    """'' or 'vision_model.': where the installed transformers' CLIPVisionModel starts its own keys."""
    first = next(iter(model.vision_tower.state_dict()))
    return "vision_model." if first.startswith("vision_model.") else ""


def to_original(key: str, clip_prefix: str) -> str:
    """Our parameter name -> the original checkpoint's."""
    if key.startswith("llm.model."):
        return "model." + key[len("llm.model."):]
    if key == "llm.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("vision_tower."):
        return _CLIP_ORIGINAL + key[len("vision_tower.") + len(clip_prefix):]
    if key.startswith(_DIRECT):
        return "model." + key
    raise KeyError(f"no original name for parameter {key!r}")


def from_original(key: str, clip_prefix: str) -> str | None:
    """The original checkpoint's name -> ours (None for keys that have no counterpart)."""
    if key.startswith(_CLIP_ORIGINAL):
        return "vision_tower." + clip_prefix + key[len(_CLIP_ORIGINAL):]
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    if key.startswith("model."):
        rest = key[len("model."):]
        return rest if rest.startswith(_DIRECT) else "llm.model." + rest
    return None


def _weight_files(model_path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
            return [model_path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_path / single).is_file():
            return [model_path / single]
    raise FileNotFoundError(f"{model_path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json).")


def read_weights(model_path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors first, `.bin` with `weights_only=True` (no pickled code)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(model_path):
        part = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                 weights_only=True)
        state.update(part)
    return state


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_mgm(config: MGMConfig, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa",
              seed: int = 0) -> MGMForCausalLM:
    """A randomly initialised MGM in `dtype` (for tiny test models and random-init runs at real shapes)."""
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        return MGMForCausalLM(config, attn_implementation)


def load_mgm(model_path: str | Path, dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa"
             ) -> MGMForCausalLM:
    """Loads an original MGM checkpoint directory; every tensor by its original name.

    Raises:
        FileNotFoundError: for a missing directory, config.json or weight files.
        ValueError: listing every missing and unexpected key (a tied `lm_head.weight` may be present or absent).
    """
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path}/config.json is missing: model_path must be an MGM checkpoint directory.")
    config = MGMConfig.from_dict(json.loads((model_path / "config.json").read_text()), str(model_path / "config.json"))
    model = build_mgm(config, dtype, attn_implementation)
    prefix = _clip_prefix(model)
    ours = model.state_dict()
    tied = model.llm.config.tie_word_embeddings
    loaded, unexpected = {}, []
    for key, tensor in read_weights(model_path).items():
        mapped = from_original(key, prefix)
        if mapped == "llm.lm_head.weight" and tied:
            continue  # the same tensor as the embeddings
        if mapped is None or mapped not in ours:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(ours[mapped].shape):
            unexpected.append(f"{key} (shape {tuple(tensor.shape)}, model expects {tuple(ours[mapped].shape)})")
        else:
            loaded[mapped] = tensor
    missing = [to_original(k, prefix) for k in ours if k not in loaded and not (tied and k == "llm.lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{model_path}: checkpoint does not match the MGM architecture of its config.json. Missing "
                         f"({len(missing)}): {missing[:20]}. Unexpected ({len(unexpected)}): {unexpected[:20]}.")
    model.load_state_dict(loaded, strict=False)
    return model


def save_mgm(model: MGMForCausalLM, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and sharded safetensors with an index, in the original key layout.

    The index is written even for one shard: MGM's own eval loader reads `model.safetensors.index.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = _clip_prefix(model)
    tied = model.llm.config.tie_word_embeddings
    state = {to_original(k, prefix): v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (tied and k == "llm.lm_head.weight")}
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
