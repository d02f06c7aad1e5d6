"""Every private attribute of transformers that mgmlora reads, in one place, each with why.

A model's attention and experts implementations are set through public API (the configs' `attn_implementation`
constructor argument, `set_attn_implementation`, `set_experts_implementation`), but transformers 5 offers no public
getter: the benchmark reads them to restore a model after a variant. tests/models/test_transformers_private.py fails
when a release renames them.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


def attn_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a model built from `config` runs (None before a model resolved it)."""
    return config._attn_implementation


def experts_implementation(config: PreTrainedConfig) -> str | None:
    """The MoE experts implementation a model built from `config` runs (None where nothing set one)."""
    return config._experts_implementation


__all__ = ["attn_implementation", "experts_implementation"]
