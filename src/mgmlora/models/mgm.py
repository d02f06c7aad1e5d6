"""MGM-2B (Mini-Gemini): Gemma LLM + CLIP tower + ConvNeXt aux tower + patch-info mining + projector.

A re-implementation on transformers 5 classes, following docs/design/mgm.md:

    images_aux (B,3,768,768) -> ConvNeXt stages -> upsample 1-3 to stage 0, concat      -> (B, 2880, 192, 192)
    images     (B,3,336,336) -> CLIP hidden_states[-2], CLS dropped                     -> (B, 576, 1024)
    patch-info mining: each CLIP token attends over its own 8x8 window of the HR map    -> (B, 576, 1024), + residual
    mm_projector (mlp2x_gelu)                                                            -> (B, 576, 2048)

The image placeholder id (-200) in `input_ids` expands to the image's 576 embeddings, labelled -100. In transformers
5 Gemma scales token embeddings inside `embed_tokens` (by sqrt(hidden)), no longer the whole `inputs_embeds`, so the
projected image features are multiplied by the same `embed_scale` before splicing: that reproduces the original
(transformers 4.38), which scaled the whole spliced sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GemmaConfig, GemmaForCausalLM

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch
from mgmlora.models.attention import PACKED_SDPA, varlen_kwargs
from mgmlora.models.convnext import CONVNEXT_LARGE, ConvNeXtTrunk
from mgmlora.models.packing import pack_rows
from mgmlora.models.torch_private import uncompile
from mgmlora.models.transfer import queue_to

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower every MGM-2B config names.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
MM_KEYS = ("mm_vision_tower", "mm_vision_tower_aux", "mm_hidden_size", "mm_hidden_size_aux", "mm_projector_type",
           "mm_vision_select_layer", "mm_vision_select_feature", "image_size_aux", "tokenizer_model_max_length",
           "mm_vision_tower_config", "mm_vision_tower_aux_config")


def _tower_name(path: str | None) -> str:
    return PurePath(str(path or "")).name.lower()


@dataclass
class MGMConfig:
    """The parts of an MGM config.json mgmlora uses: the Gemma config plus the `mm_*` keys.

    Towers are built from architecture configs, never downloaded: `mm_vision_tower` / `mm_vision_tower_aux` are matched
    by their last path component (CLIP ViT-L/14-336, open_clip ConvNeXt-L), unless the config carries
    `mm_vision_tower_config` (CLIPVisionConfig fields) or `mm_vision_tower_aux_config` (`depths`, `dims`), which
    take precedence (tiny test checkpoints use them).
    """

    text: dict[str, Any]
    mm_vision_tower: str = "model_zoo/OpenAI/clip-vit-large-patch14-336"
    mm_vision_tower_aux: str = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"
    mm_hidden_size: int = 1024
    mm_hidden_size_aux: int = 2880
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_size_aux: int = 768
    tokenizer_model_max_length: int = 2048
    mm_vision_tower_config: dict[str, Any] | None = None
    mm_vision_tower_aux_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> MGMConfig:
        """Splits an MGM config.json into the Gemma part and the multimodal keys.

        Raises:
            ValueError: when the mandatory `mm_*` keys are missing (the directory is not an MGM checkpoint).
        """
        missing = [k for k in ("mm_vision_tower", "mm_vision_tower_aux", "mm_hidden_size") if k not in raw]
        if missing:
            raise ValueError(f"{where}: not an MGM config (missing {missing}); MGM is recognised by its mm_* keys.")
        mm = {k: raw[k] for k in MM_KEYS if k in raw}
        text = {k: v for k, v in raw.items() if k not in mm and not k.startswith(("mm_", "image_", "tune_", "freeze_"))}
        for key in ("model_type", "architectures", "auto_map", "torch_dtype", "transformers_version"):
            text.pop(key, None)
        if mm.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"{where}: mm_projector_type {mm['mm_projector_type']!r} is not supported (mlp2x_gelu).")
        if mm.get("mm_vision_select_feature", "patch") != "patch":
            raise ValueError(f"{where}: mm_vision_select_feature must be 'patch' (CLS dropped), as MGM-2B.")
        extra = {k: v for k, v in raw.items() if k.startswith(("mm_", "image_", "tune_", "freeze_")) and k not in mm}
        return cls(text=text, extra=extra, **mm)

    def to_dict(self) -> dict[str, Any]:
        """The config.json of the original layout (Gemma keys + mm_* keys)."""
        out = {**self.text, **self.extra, "architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma"}
        for key in MM_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def clip_config(self, attn_implementation: str | None = None) -> CLIPVisionConfig:
        """The low-resolution tower's architecture (and the attention it runs, when given)."""
        if self.mm_vision_tower_config:
            return CLIPVisionConfig(**self.mm_vision_tower_config, attn_implementation=attn_implementation)
        name = _tower_name(self.mm_vision_tower)
        if "clip-vit-large-patch14-336" in name:
            return CLIPVisionConfig(**CLIP_L_336, attn_implementation=attn_implementation)
        raise ValueError(f"unknown vision tower {self.mm_vision_tower!r}: add `mm_vision_tower_config` "
                         "(CLIPVisionConfig fields) to config.json; mgmlora never downloads towers.")

    def convnext_config(self) -> dict[str, Any]:
        """The aux tower's `depths` and `dims`."""
        if self.mm_vision_tower_aux_config:
            return {k: tuple(self.mm_vision_tower_aux_config[k]) for k in ("depths", "dims")}
        name = _tower_name(self.mm_vision_tower_aux)
        if "convnext" in name and "large" in name:
            return dict(CONVNEXT_LARGE)
        raise ValueError(f"unknown aux tower {self.mm_vision_tower_aux!r}: add `mm_vision_tower_aux_config` "
                         "({\"depths\": [...], \"dims\": [...]}) to config.json.")


@dataclass
class MGMOutput:
    """Logits over the expanded sequence and the labels aligned with them."""

    logits: torch.Tensor | None  # (B, T', V); None with hidden_only
    labels: torch.Tensor | None  # (B, T') with IGNORE_INDEX on image, prompt and padding positions
    attention_mask: torch.Tensor | None  # (B, T'); None when packed
    hidden_states: torch.Tensor | None = None  # (B, T', H) with hidden_only
    host_labels: torch.Tensor | None = None  # `labels` on the CPU (built there by `prepare_inputs`)


class Spliced(NamedTuple):
    """The language model's inputs after `MGM.prepare_inputs` spliced the images into the text."""

    embeds: torch.Tensor  # (B, T', H), or (1, N, H) packed
    attention_mask: torch.Tensor | None  # (B, T'); None when packed
    labels: torch.Tensor | None  # (B, T') / (1, N) with IGNORE_INDEX on image, prompt and padding positions
    positions: torch.Tensor  # (B, T') / (1, N) position ids
    lengths: list[int] | None  # positions per sample in the packed row; None when padded
    host_labels: torch.Tensor | None  # `labels` on the CPU


def _take(row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """row[positions] for positions (n,) on the CPU, without a device sync: a slice where they are consecutive."""
    n = positions.numel()
    if n == 0 or int(positions[-1]) - int(positions[0]) + 1 == n:
        first = int(positions[0]) if n else 0
        return row[first:first + n]
    return row.index_select(0, queue_to(positions, row.device))


def _ln_linear(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))


class MGMForCausalLM(nn.Module):
    """The MGM-2B module tree (see the module docstring); parameter names map 1:1 to the original checkpoint."""

    def __init__(self, config: MGMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        # transformers 5.23 rewrites Gemma's legacy hidden_act="gelu" to the tanh approximation (with a notice at
        # every run); MGM-2B was trained on 4.38, which applied the exact GELU the config names
        # (docs/design/mgm.md). So the config is built without the key, which is then set as named.
        # The attention is the configs' public constructor argument (`attn_implementation`), as from_pretrained sets it.
        text = GemmaConfig(**{k: v for k, v in config.text.items() if k != "hidden_act"},
                           attn_implementation=attn_implementation)
        if "hidden_act" in config.text:
            text.hidden_act = config.text["hidden_act"]
        self.llm = GemmaForCausalLM(text)
        # the towers see no packed rows: mgmlora's packed attention (mgmlora.models.attention) is for the LLM only
        clip = config.clip_config("sdpa" if attn_implementation == PACKED_SDPA else attn_implementation)
        self.vision_tower = CLIPVisionModel(clip)
        aux = config.convnext_config()
        self.vision_tower_aux = ConvNeXtTrunk(**aux)
        if sum(aux["dims"]) != config.mm_hidden_size_aux or clip.hidden_size != config.mm_hidden_size:
            raise ValueError(f"mm_hidden_size_aux={config.mm_hidden_size_aux} must equal sum(dims)={sum(aux['dims'])} "
                             f"and mm_hidden_size={config.mm_hidden_size} the CLIP width {clip.hidden_size}.")
        h, h_aux, d = config.mm_hidden_size, config.mm_hidden_size_aux, text.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(h, d), nn.GELU(), nn.Linear(d, d))
        self.vlm_uni_query_projector = _ln_linear(h, h)
        self.vlm_uni_aux_projector = _ln_linear(h_aux, h)
        self.vlm_uni_val_projector = _ln_linear(h_aux, h)
        self._compiled_image_tokens = None  # set by compile_image_path

    # -- towers ---------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MGMForCausalLM:
        """The towers stay in eval mode (MGM ran its aux tower with drop-path in train mode; we do not).

        They are always frozen (`Trainability.towers` has no other choice), so no tower ever trains.
        """
        super().train(mode)
        self.vision_tower.eval()
        self.vision_tower_aux.eval()
        return self

    def encode_images(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S), (B,3,S_aux,S_aux) -> projected image tokens (B, N, hidden); N = 576 for MGM-2B."""
        dtype = self.mm_projector[0].weight.dtype
        with torch.no_grad():  # frozen towers: no graph through them
            hidden = self.vision_tower(images.to(dtype), output_hidden_states=True).hidden_states
            feats = hidden[self.config.mm_vision_select_layer][:, 1:]  # (B, N, 1024), CLS dropped, no post-LN
            stages = self.vision_tower_aux(images_aux.to(dtype))
        return (self._compiled_image_tokens or self.image_tokens)(feats, stages)

    def image_tokens(self, feats: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        """CLIP features (B, N, C) and the aux tower's four stages -> projected image tokens (B, N, hidden).

        The aux stages are frozen outputs (no gradient flows into them); mining and projector train.
        """
        dtype = self.mm_projector[0].weight.dtype
        size = stages[0].shape[-2:]
        aux = torch.cat([stages[0]] + [F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False)
                                       .to(s.dtype) for s in stages[1:]], dim=1)  # (B, 2880, 192, 192)
        mined = self.mine(feats.to(dtype), aux.to(dtype))
        return self.mm_projector(mined)  # (B, N, hidden)

    def compile_image_path(self, backend: str = "inductor", **options) -> None:
        """Compiles the image path in place: both frozen towers, and the upsampling, mining and projector.

        Regions, like the decoder layers (`speed.compile`): the towers are launch-bound in eager mode
        (bench/results/*image_path-mgm2b*), and the mining is a chain of copies, norms and small matmuls for Inductor
        to fuse; the fit loop measured both together (bench/results/*recipe_loop_ab_imagecompile*).
        """
        self.vision_tower.compile(backend=backend, **options)
        self.vision_tower_aux.compile(backend=backend, **options)
        self._compiled_image_tokens = torch.compile(self.image_tokens, backend=backend, **options)

    def __getstate__(self) -> dict:
        """Pickling and `copy.deepcopy` leave the compiled image step out, as `nn.Module` leaves out its compiled call.

        The compiled function is bound to this instance: a copy that kept it would run the original's weights.
        """
        state = super().__getstate__()
        state["_compiled_image_tokens"] = None
        return state

    def uncompile_image_path(self) -> None:
        """Undoes `compile_image_path` (the benchmark compares variants on one model)."""
        uncompile(self.vision_tower)
        uncompile(self.vision_tower_aux)
        self._compiled_image_tokens = None

    def mine(self, feats: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Patch-info mining: every low-res token attends over its own window of the high-res map.

        feats (B, N, C) on a g x g grid (row-major), aux (B, C_aux, H, H) with H = g * w -> (B, N, C).
        """
        b, n, c = feats.shape
        g = math.isqrt(n)
        w = aux.shape[-1] // g
        if g * g != n or g * w != aux.shape[-1]:
            raise ValueError(f"cannot tile a {aux.shape[-1]}px aux map into {n} windows")
        windows = aux.reshape(b, aux.shape[1], g, w, g, w).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, w, w, C_aux)
        windows = windows.reshape(b, n, w * w, aux.shape[1])  # (B, N, w*w, C_aux)
        q = self.vlm_uni_query_projector(feats).unsqueeze(2)  # (B, N, 1, C)
        k = self.vlm_uni_aux_projector(windows)  # (B, N, w*w, C)
        v = self.vlm_uni_val_projector(windows)  # (B, N, w*w, C)
        attn = torch.nan_to_num(q @ k.transpose(-1, -2) / math.sqrt(c)).softmax(dim=-1)  # (B, N, 1, w*w)
        return feats + (attn @ v).squeeze(2)  # residual onto the raw CLIP features

    # -- sequence assembly ----------------------------------------------------------------------------------------
    def _image_scale(self) -> float | torch.Tensor:
        embed = self.llm.get_input_embeddings()
        return getattr(embed, "embed_scale", 1.0)  # transformers 5 scales inside embed_tokens; 4.x scaled inputs_embeds

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                       image_tokens: torch.Tensor | None, packed: bool = False, pad_to: int = 0,
                       host: Batch | None = None) -> Spliced:
        """Splices image embeddings at IMAGE_TOKEN_INDEX, truncates to tokenizer_model_max_length, right-pads.

        Returns `Spliced`: inputs_embeds (B, T', H), attention_mask (B, T'), labels (B, T') or None, position_ids
        (B, T'), no lengths, and the labels on the CPU. With `packed`, the rows are concatenated without padding
        instead: (1, N, H), None, (1, N), (1, N), and the positions of each sample in the row (for per-sample
        attention, mgmlora.models.attention); `pad_to` pads that row to a multiple of so many positions with a
        trailing segment of zero embeddings and ignored labels.

        The layout (each sample's real positions, its placeholder, the labels) is read on the CPU: from `host`, the
        batch's CPU copy (`Batch.on_host`), without a device sync, else from one copy of the ids, mask and labels.
        The labels are built there and copied once; the result keeps them as `host_labels`.
        """
        embed = self.llm.get_input_embeddings()
        scale = self._image_scale()
        device = input_ids.device
        if host is None:
            host_ids, host_mask = input_ids.cpu(), attention_mask.cpu()
            host_labels = labels.cpu() if labels is not None else None
        else:
            host_ids, host_mask = host.input_ids, host.attention_mask
            host_labels = host.labels if labels is not None else None
        limit = self.config.tokenizer_model_max_length
        rows, row_labels = [], []
        for b in range(input_ids.shape[0]):
            kept = host_mask[b].nonzero().flatten()  # (n,) the real positions of row b
            ids = host_ids[b, kept]  # (n,)
            lab = host_labels[b, kept] if host_labels is not None else None  # (n,)
            spots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(spots) > 1:
                raise ValueError(f"sample {b} has {len(spots)} <image> tokens; MGM-2B takes one image per sample.")
            pieces, piece_labels, start = [], [], 0
            for spot in spots + [len(ids)]:
                pieces.append(embed(_take(input_ids[b], kept[start:spot])))
                if lab is not None:
                    piece_labels.append(lab[start:spot])
                if spot < len(ids):
                    img = image_tokens[b] * scale
                    pieces.append(img.to(pieces[-1].dtype))
                    if lab is not None:
                        piece_labels.append(torch.full((img.shape[0],), IGNORE_INDEX, dtype=lab.dtype))
                start = spot + 1
            row = torch.cat(pieces)
            if not spots and image_tokens is not None:
                row = row + image_tokens[b][:0].sum() * 0  # keeps the projector in the graph (text-only sample)
            rows.append(row[:limit])
            row_labels.append(torch.cat(piece_labels)[:limit] if lab is not None else None)
        if packed:  # one row of every sample's real positions, a segment per sample (mgmlora.models.packing)
            row = pack_rows(rows, row_labels if labels is not None else None, pad_to)
            return Spliced(row.values, None, row.labels, row.positions, row.lengths, row.host_labels)
        longest = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])  # (B, T', H)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, T'), built on the host, copied once
        positions = torch.zeros(len(rows), longest, dtype=torch.long)  # (B, T')
        out_labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
        for b, row in enumerate(rows):
            n = row.shape[0]
            embeds[b, :n], mask[b, :n], positions[b, :n] = row, 1, torch.arange(n)
            if out_labels is not None:
                out_labels[b, :n] = row_labels[b]
        labels_on_device = queue_to(out_labels, device) if out_labels is not None else None
        return Spliced(embeds, queue_to(mask, device), labels_on_device, queue_to(positions, device), None, out_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                images: torch.Tensor | None = None, images_aux: torch.Tensor | None = None, packed: bool = False,
                pad_to: int = 0, hidden_only: bool = False, host: Batch | None = None) -> MGMOutput:
        """input_ids (B, T) with one IMAGE_TOKEN_INDEX per image sample; images (B,3,S,S); images_aux (B,3,Sa,Sa).

        `packed` drops the padding (one row, per-sample positions); `hidden_only` skips the LM head and returns the
        final hidden states, for losses that apply the head themselves (mgmlora.training.loss); `host` is the batch's
        CPU copy, from which the splice reads its layout without a device sync (`prepare_inputs`).
        """
        image_tokens = self.encode_images(images, images_aux) if images is not None else None
        if image_tokens is None and ((host.input_ids if host is not None else input_ids) == IMAGE_TOKEN_INDEX).any():
            raise ValueError("input_ids contain <image> placeholders but no images were given.")
        spliced = self.prepare_inputs(input_ids, attention_mask, labels, image_tokens, packed, pad_to, host)
        embeds, mask, positions = spliced.embeds, spliced.attention_mask, spliced.positions
        segments = varlen_kwargs(spliced.lengths, embeds.device) if spliced.lengths else {}
        # No KV cache in training: with a cache transformers also ignores the packed layout's restarting positions.
        if hidden_only:
            out = self.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                                 **segments)
            return MGMOutput(None, spliced.labels, mask, out.last_hidden_state, spliced.host_labels)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **segments)
        return MGMOutput(out.logits, spliced.labels, mask, host_labels=spliced.host_labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None = None,
                 images_aux: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Replies to prompts (B, T) with one image each (or none): the new token ids only (B * n_return, T_new).

        The prompts are spliced exactly as in training, then left-padded so every row ends where generation starts,
        and Gemma generates from those embeddings with a KV cache.
        """
        image_tokens = self.encode_images(images, images_aux) if images is not None else None
        spliced = self.prepare_inputs(input_ids, attention_mask, None, image_tokens)
        embeds, mask = spliced.embeds, spliced.attention_mask
        lengths = mask.sum(-1)  # (B,)
        left = torch.zeros_like(embeds)
        left_mask = torch.zeros_like(mask)
        for b, n in enumerate(lengths.tolist()):
            left[b, embeds.shape[1] - n:] = embeds[b, :n]
            left_mask[b, embeds.shape[1] - n:] = 1
        return self.llm.generate(inputs_embeds=left, attention_mask=left_mask, use_cache=True, **generate_kwargs)
