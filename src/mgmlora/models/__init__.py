"""Model loading for every family, behind one function: `load_model(ModelArgs) -> LoadedModel`.

Family differences live here (and in the registry), not in the LightningModule: a text causal LM (Qwen3 dense or MoE,
any transformers causal LM) or MGM (Gemma + vision towers). MGM is recognised by the `mm_*` keys of its config.json,
never by `model_type` (original checkpoints carry several names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mgmlora.data.chat import IGNORE_INDEX
from mgmlora.loss import pack_padded
from mgmlora.models.attention import bucket_padding, packed_attention, varlen_kwargs
from mgmlora.models.causal_lm import (
    DTYPES,
    ModelArgs,
    build_config,
    enable_gradient_checkpointing,
    is_moe,
    load_causal_lm,
    resolve_preset,
)
from mgmlora.models.registry import MGM_PRESETS

Family = Literal["causal_lm", "mgm"]


@dataclass
class ModelInfo:
    """What the data side and the LightningModule need to know before any weight is loaded."""

    family: Family
    vocab_size: int
    image_tokens: int = 0  # image embeddings per image (576 for MGM-2B)
    image_size: int = 0  # CLIP input size (336)
    image_size_aux: int = 0  # ConvNeXt input size (768)
    max_length: int = 0  # MGM: truncation length after image expansion (tokenizer_model_max_length)


@dataclass
class LoadedModel:
    """A loaded base model and where its LoRA targets live."""

    model: nn.Module
    info: ModelInfo
    decoder_layers: str
    moe: bool


def _mgm_config_dict(args: ModelArgs) -> dict | None:
    if args.model_path:
        path = Path(args.model_path) / "config.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            return raw if "mm_vision_tower" in raw else None
        return None
    return MGM_PRESETS.get(args.preset)


def model_info(args: ModelArgs) -> ModelInfo:
    """Family, vocabulary and image geometry, from config files only."""
    raw = _mgm_config_dict(args)
    if raw is None:
        return ModelInfo("causal_lm", build_config(args).vocab_size)
    from mgmlora.models.mgm import MGMConfig

    config = MGMConfig.from_dict(raw)
    clip = config.clip_config()
    return ModelInfo("mgm", config.text["vocab_size"], (clip.image_size // clip.patch_size) ** 2, clip.image_size,
                     config.image_size_aux, config.tokenizer_model_max_length)


def load_model(args: ModelArgs, packing: bool = False) -> LoadedModel:
    """Loads (or randomly initialises) the model `args` describes, with gradient checkpointing as configured.

    `packing` (the run's `speed.packing`) picks an attention implementation whose cost on packed rows is linear in
    the number of samples (mgmlora.models.attention): `sdpa` becomes mgmlora's packed SDPA.
    """
    info = model_info(args)
    attn = packed_attention(args.attn_implementation, packing)
    if info.family == "causal_lm":
        model = load_causal_lm(args, attn)
        preset = resolve_preset(args)
        return LoadedModel(model, info, preset.decoder_layers if preset else "model.layers", is_moe(model))
    from mgmlora.models.mgm import MGMConfig
    from mgmlora.models.mgm_checkpoint import build_mgm, load_mgm

    dtype = DTYPES[args.dtype]
    if args.model_path:
        model = load_mgm(args.model_path, dtype, attn)
    else:
        model = build_mgm(MGMConfig.from_dict(MGM_PRESETS[args.preset]), dtype, attn, seed=args.init_seed)
    model.llm.config.use_cache = False
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model.llm)
    return LoadedModel(model, info, "llm.model.layers", moe=False)


class PostProcessedHead(nn.Module):
    """The LM head followed by the logit transforms some families apply after it in their `forward`.

    Gemma-2/3 soft-cap the logits (`final_logit_softcapping`), Cohere multiplies them (`logit_scale`), Granite divides
    them (`logits_scaling`). The fast losses call the head themselves, so they must apply the same transforms.
    """

    def __init__(self, head: nn.Module, scale: float, softcap: float | None):
        super().__init__()
        self.head, self.scale, self.softcap = head, scale, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps final hidden states to the logits `model.forward` returns."""
    head, config = model.get_output_embeddings(), model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return head if scale == 1.0 and softcap is None else PostProcessedHead(head, scale, softcap)


def forward_hidden(model: nn.Module, family: Family, batch: dict[str, torch.Tensor], packed: bool, pad_to: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Runs the model up to (not through) the LM head: final hidden states, the labels aligned with them, the head.

    `model` is the base model with LoRA layers injected (PEFT's wrapper adds nothing to a plain LoRA forward). MGM
    aligns labels with its image-expanded sequence; `packed` drops padding (see mgmlora.loss) and `pad_to` then pads
    the packed row to a multiple of that many positions with a segment of its own (mgmlora.models.attention).
    Returns hidden (B, T, H) or (1, N, H) when packed, labels of the same leading shape, and the LM head module.
    """
    if family == "mgm":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    images=batch.get("images"), images_aux=batch.get("images_aux"), packed=packed, pad_to=pad_to,
                    hidden_only=True)
        return out.hidden_states, out.labels, output_head(model.llm)
    ids, mask, labels, positions = batch["input_ids"], batch["attention_mask"], batch["labels"], None
    segments = {}
    if packed:
        lengths = [n for n in mask.sum(-1).tolist() if n]  # one host sync per micro-batch, not one per layer
        ids, positions, labels = pack_padded(ids, mask, labels)
        mask = None  # per-sample attention comes from the sample boundaries (mgmlora.models.attention)
        if pad := bucket_padding(ids.shape[1], pad_to):  # (1, N) -> (1, N + pad): a trailing segment, no loss
            ids = torch.cat([ids, ids.new_zeros(1, pad)], 1)
            positions = torch.cat([positions, torch.arange(pad, device=ids.device)[None]], 1)
            labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], 1) if labels is not None else None
            lengths.append(pad)
        segments = varlen_kwargs(lengths, ids.device)
    decoder = getattr(model, model.base_model_prefix)  # e.g. Qwen3ForCausalLM.model
    # no KV cache: with one, transformers would also ignore the packed layout's restarting positions
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **segments)
    return out.last_hidden_state, labels, output_head(model)


__all__ = ["LoadedModel", "ModelArgs", "ModelInfo", "forward_hidden", "load_model", "model_info"]
