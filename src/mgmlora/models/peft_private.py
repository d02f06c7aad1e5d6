"""Every private part of PEFT that mgmlora reads, in one place, each with why.

PEFT adapts a fused MoE expert tensor (`target_parameters`) by registering a `torch.nn.utils.parametrize`
parametrization on it while the wrapped module runs: reading `experts.gate_up_proj` then returns `W + scaling * lhs @
rhs`, a new tensor the size of the whole expert stack, in the forward, again in the recompute, and with a full
weight-gradient GEMM for it in the backward. mgmlora's experts forward (mgmlora.models.experts) runs the frozen weight
and the two low-rank factors as separate grouped GEMMs instead, so it reads the factors PEFT's proxy holds
(`_LoraFactorsProxy.lhs / rhs / scaling`: no public accessor) and the unparametrised weight (`parametrizations[name]
.original`, torch's public API once the parametrization is known). tests/models/test_peft_private.py fails when a PEFT
release renames or changes them.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import _LoraFactorsProxy
from torch import nn
from torch.nn.utils import parametrize


def lora_factors(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """`(weight, lhs, rhs, scaling)` when PEFT's single-adapter LoRA is active on `module.<name>`, else None.

    The effective parameter is `weight + scaling * lhs @ rhs` (batched over experts, in the stored layout):
    `weight` (E, d1, d2) is the frozen tensor without the LoRA delta, `lhs` (E, d1, r) and `rhs` (E, r, d2) are the
    factors in the weight's dtype (still attached to the fp32 LoRA parameters' graph). Anything else (no
    parametrization, several adapters, another parametrization stacked on it) returns None: the caller then reads
    the parametrised tensor as before.
    """
    if not parametrize.is_parametrized(module, name):
        return None
    chain = module.parametrizations[name]
    if len(chain) != 1 or not isinstance(chain[0], _LoraFactorsProxy):
        return None
    proxy = chain[0]
    return chain.original, proxy.lhs, proxy.rhs, proxy.scaling


__all__ = ["lora_factors"]
