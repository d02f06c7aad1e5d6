"""Every private attribute of transformers that mgmlora reads, in one place, each with why.

A model's attention and experts implementations are set through public API (the configs' `attn_implementation`
constructor argument, `set_attn_implementation`, `set_experts_implementation`), but transformers 5 offers no public
getter: the benchmark reads them to restore a model after a variant. Random init layer by layer on the device
(mgmlora.models.layerwise) calls the model's per-module initialiser, `_init_weights`: transformers' public
`initialize_weights` walks the whole model at once, which is what a model larger than the device must avoid. Where a
decoder layer's gradient checkpoint sits (around the layer's call or inside its `forward`) decides what a compiled
layer recomputes (mgmlora.models.recompute). tests/models/test_transformers_private.py fails when a release
renames or moves them.
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


def checkpoint_inside_forward() -> bool:
    """Whether transformers checkpoints each decoder layer's `forward` (newer 5.x) rather than its call (5.17).

    Inside `forward`, the checkpoint runs inside a layer compiled with `nn.Module.compile`, and the compiler
    recomputes only what the backward reads; around the call, the recompute reruns the whole compiled forward.
    `GradientCheckpointingLayer` then defines `__init_subclass__`, which wraps each subclass's `forward`, instead of
    `__call__`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" not in GradientCheckpointingLayer.__dict__


__all__ = ["attn_implementation", "checkpoint_inside_forward", "experts_implementation", "init_module"]
