"""What the `model.model` config section says: which model, where its files are, how to load it.

Shared by every family (text causal LMs and MGM) and by the tools that rebuild a run's model (export, generate,
estimate), so it lives apart from any one loader.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from mgmlora.errors import SettingsError
from mgmlora.models.dtypes import DtypeName
from mgmlora.models.quantization import QuantizationArgs

PresetName = Literal["tiny-qwen3", "tiny-qwen3-moe", "qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "tiny-mgm", "mgm-2b"]


@dataclass
class ModelArgs:
    """Which model to train and how to load it.

    Attributes:
        preset: registry preset (architecture, MoE flag, LoRA anchoring). Required unless `model_path` is set.
        model_path: local Hugging Face directory (config.json, *.safetensors or *.bin, tokenizer). Its weights are
            loaded; when it is null the model is randomly initialised from the preset's architecture.
        tokenizer_path: tokenizer directory; null means `model_path`.
        dtype: dtype of the frozen base weights. bfloat16 on GPU; float32 is faster on CPU.
        attn_implementation: `sdpa` (PyTorch's fused kernels, default), `flash_attention_2` (needs the `flash`
            extra), `flex_attention` (trains on a GPU only: PyTorch has no CPU backward for it) or `eager`.
        experts_implementation: how fused MoE experts run (MoE models only): `mgmlora_grouped_mm` (the default:
            transformers' grouped GEMMs without its expert-parallel masks, routing weights applied before the down
            projection, mgmlora.models.experts; configs/README.md has its speed), `grouped_mm`
            (transformers' own) or `eager` (transformers' loop over experts).
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant, LoRA-compatible).
        trust_remote_code: allow Python code shipped inside `model_path` to run. Off unless you trust the directory.
        init_seed: seed for random initialisation (only used without `model_path`).
        quantization: null (off), or the frozen language-model base in 4-bit NF4 (QLoRA) or FP8 (the fused MoE
            experts included, LoRA weights full precision): mgmlora.models.quantization.
    """

    preset: PresetName | None = None
    model_path: str | None = None
    tokenizer_path: str | None = None
    dtype: DtypeName = "bfloat16"
    attn_implementation: Literal["sdpa", "flash_attention_2", "flex_attention", "eager"] = "sdpa"
    experts_implementation: Literal["grouped_mm", "mgmlora_grouped_mm", "eager"] = "mgmlora_grouped_mm"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    init_seed: int = 0
    quantization: QuantizationArgs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quantization, dict):  # from a run's saved settings or a parsed config tree
            self.quantization = QuantizationArgs(**self.quantization)
        if self.preset is None and self.model_path is None:
            raise SettingsError("model.model: set `preset` (e.g. tiny-qwen3) or `model_path` (a local Hugging "
                                "Face directory).")
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise SettingsError(
                "model.model.attn_implementation=flash_attention_2 needs the flash-attn package "
                "(pip install 'mgmlora[flash]' --no-build-isolation); use `sdpa` otherwise, which runs PyTorch's "
                "own flash kernels."
            )


__all__ = ["ModelArgs", "PresetName"]
