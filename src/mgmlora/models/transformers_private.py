"""Every private attribute of transformers that mgmlora reads, in one place, each with why.

A model's attention and experts implementations are set through public API (the configs' `attn_implementation`
constructor argument, `set_attn_implementation`, `set_experts_implementation`), but transformers 5 offers no public
getter: the benchmark reads them to restore a model after a variant. Random init layer by layer on the device
(mgmlora.models.layerwise) calls the model's per-module initialiser, `_init_weights`: transformers' public
`initialize_weights` walks the whole model at once, which is what a model larger than the device must avoid.
tests/models/test_transformers_private.py fails when a release renames them.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


def attn_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a model built from `config` runs (None before a model resolved it)."""
    return config._attn_implementation


def experts_implementation(config: PreTrainedConfig) -> str | None:
    """The MoE experts implementation a model built from `config` runs (None where nothing set one)."""
    return config._experts_implementation


def init_module(model: PreTrainedModel, module: nn.Module) -> None:
    """Initialises `module`'s own parameters and buffers (not its children's) as `model` initialises them.

    The model class's `_init_weights` is transformers' documented override point (linears and embeddings normal with
    `initializer_range`, norms to one, rotary frequencies recomputed, Qwen3-MoE's fused experts and router normal);
    `initialize_weights`, the public caller, applies it to every module of the model in one pass.
    """
    model._init_weights(module)


__all__ = ["attn_implementation", "experts_implementation", "init_module"]
