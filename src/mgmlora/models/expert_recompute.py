"""What gradient checkpointing recomputes in a MoE layer: `speed.keep_expert_outputs`.

Whole-layer checkpointing runs each decoder layer's forward again in the backward pass, the frozen expert GEMMs
included: in a fine-grained MoE such as Qwen3-30B-A3B those are the larger part of a layer's matrix work. PyTorch's
selective activation checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`, the mechanism
torchtitan's per-operator checkpointing uses) lets the forward keep the outputs of chosen operators, which the recompute
then reads instead of computing again; everything else is recomputed as before. The operators kept here are the
grouped GEMMs through frozen expert weights (`aten._grouped_mm`, and `aten._scaled_grouped_mm` for FP8 experts):
- `gate_up`: the fused gate/up projection's output, (S, 2 x expert width) for the S = tokens x top_k routed rows.
  The recompute still runs the down projection, whose saved weight the backward reads;
- `all`: the down projection's output too, (S, hidden): no expert GEMM runs twice.
Each kept output stays alive from its layer's forward to its layer's backward: memory for FLOPs, which
mgmlora.tools.memory counts and bench/train_step.py (`+keepgateup`, `+keepexperts`) measures. LoRA's own grouped
GEMMs (their factors train) and everything outside the experts (attention, norms, routing, the element-wise
expert activation, a quantised weight's dequantisation) are recomputed. Kept or recomputed, an operator returns the
same values: loss and gradients do not change (tests/models/test_expert_recompute.py).

The policy tells the two projections apart by their input width: the gate/up projection reads hidden-size rows, the
down projection expert-width rows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mgmlora.models.causal_lm import enable_gradient_checkpointing
from mgmlora.models.torch_private import grouped_gemm_ops

KeptOutputs = Literal["none", "gate_up", "all"]


def expert_output_policy(hidden_size: int, keep: KeptOutputs) -> Callable[..., CheckpointPolicy]:
    """The selective-checkpointing policy keeping the outputs of frozen expert products that `keep` names.

    A frozen product is a grouped GEMM whose weight operand (the second) does not require grad: the experts' own
    weights, not LoRA's factors.
    """
    products = grouped_gemm_ops()

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in products and not args[1].requires_grad and keep != "none":
            if keep == "all" or args[0].shape[-1] == hidden_size:  # (S, hidden) rows: the gate/up projection
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def keep_expert_outputs(language_model: nn.Module, keep: KeptOutputs) -> None:
    """Re-enables the language model's checkpointing with the policy for `keep` (`none`: whole-layer recompute).

    The caller checks that checkpointing is on and that the layers' expert products are frozen grouped GEMMs
    (mgmlora.training.fastpath).
    """
    if keep == "none":
        enable_gradient_checkpointing(language_model)
        return
    policy = expert_output_policy(language_model.config.hidden_size, keep)
    enable_gradient_checkpointing(language_model, context_fn=partial(create_selective_checkpoint_contexts, policy))
