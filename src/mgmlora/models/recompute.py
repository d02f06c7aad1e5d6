"""What gradient checkpointing recomputes: `speed.keep_expert_outputs` and `speed.keep_attention_outputs`.

Whole-layer checkpointing runs each decoder layer's forward again in the backward pass, the frozen expert GEMMs and
the attention kernel included: in a fine-grained MoE such as Qwen3-30B-A3B the expert GEMMs are the larger part of a
layer's matrix work. PyTorch's selective activation checkpointing (`torch.utils.checkpoint.
create_selective_checkpoint_contexts`, the mechanism torchtitan's per-operator checkpointing uses) lets the forward
keep the outputs of chosen operators, which the recompute then reads instead of computing again; everything else is
recomputed as before. What can be kept:
- the grouped GEMMs through frozen expert weights (`aten._grouped_mm`, and `aten._scaled_grouped_mm` for FP8
  experts), told apart by their weight operand, (E, hidden, 2 x expert width) for the fused gate/up projection and
  (E, expert width, hidden) for the down projection (`speed.keep_expert_outputs`):
  - `gate_up`: the gate/up projection's output, (S, 2 x expert width) for the S = tokens x top_k routed rows;
  - `all`: the down projection's output too, (S, hidden): no expert GEMM runs twice;
- the attention kernel's outputs (`speed.keep_attention_outputs`): the attended values, (tokens, query heads, head
  dimension) in the compute dtype, and the log-sum-exp the kernel's backward reads, (query heads, tokens) in float32
  (`mgmlora.models.torch_private.attention_ops`: SDPA's fused kernels and PyTorch's varlen op, which mgmlora's packed
  attention calls). The recompute still computes the queries, keys and values (the kernel's backward reads them),
  but not the attention itself.
Each kept output stays alive from its layer's forward to its layer's backward: memory for FLOPs, which
mgmlora.tools.memory counts and bench/train_step.py (`+keepgateup`, `+keepexperts`, `+keepattn`) measures. LoRA's own
grouped GEMMs (their factors train) and everything else (norms, routing, projections, the element-wise expert
activation, a quantised weight's dequantisation) are recomputed. Kept or recomputed, an operator returns the same
values: loss and gradients do not change (tests/models/test_recompute.py).

Where the checkpoint sits matters under `speed.compile`. transformers 5.17 checkpoints around each decoder layer's
call: the recompute reruns the whole compiled forward, so `all` skips both projections. Newer 5.x releases checkpoint
inside `forward`, within the compiled layer, and the compiler recomputes only what the backward reads, which never
included the down projection's output: there `all` keeps no more than `gate_up` (`effective_keep`).

mgmlora's experts forward is required for kept expert outputs (`experts_implementation: mgmlora_grouped_mm` on
layouts it runs itself): transformers' own adds an expert bias to the kept output in place, which the kept copy
forbids. Kept attention needs an attention implementation whose kernel is one operator: `sdpa` (mgmlora's packed
attention under packing); flash-attn's and FlexAttention's kernels are not among `attention_ops`, and `eager` is
many operators.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mgmlora.models.attention import PACKED_SDPA
from mgmlora.models.causal_lm import enable_gradient_checkpointing, expert_width
from mgmlora.models.experts import FAST_EXPERTS
from mgmlora.models.torch_private import attention_ops, grouped_gemm_ops
from mgmlora.models.transformers_private import checkpoint_inside_forward

KeptOutputs = Literal["none", "gate_up", "all"]


def keep_refusal(keep: KeptOutputs, moe: bool, checkpointing: bool, experts_implementation: str | None,
                 peft_expert_lora: bool) -> str | None:
    """Why training refuses `speed.keep_expert_outputs: keep` (the error message), or None where it applies.

    Part of `recompute_refusal` (training also checks each experts module's layout, mgmlora.training.fastpath): there
    must be frozen expert GEMMs whose recompute the setting skips.
    """
    if keep == "none":
        return None
    key = f"model.speed.keep_expert_outputs: {keep}"
    if not moe:
        return f"{key} keeps outputs of MoE expert GEMMs, and this model has none: set it to none."
    if not checkpointing:
        return (f"{key} chooses what gradient checkpointing recomputes, and checkpointing is off: set "
                "model.model.gradient_checkpointing: true, or keep_expert_outputs: none.")
    if experts_implementation != FAST_EXPERTS:  # mgmlora's loaders always set one
        return (f"{key} keeps the products of mgmlora's experts forward: set model.model.experts_implementation: "
                f"{FAST_EXPERTS} (it is {experts_implementation}).")
    if peft_expert_lora:
        return (f"{key} keeps products through frozen expert weights, and PEFT's expert LoRA multiplies by W + B A: "
                "set model.speed.expert_lora: split.")
    return None


def effective_keep(keep: KeptOutputs, compiled: bool) -> KeptOutputs:
    """What `keep` keeps in effect: `all` is `gate_up` where a compiled layer holds its own checkpoint."""
    return "gate_up" if keep == "all" and compiled and checkpoint_inside_forward() else keep


def attention_refusal(keep: bool, checkpointing: bool, attn_implementation: str | None) -> str | None:
    """Why training refuses `speed.keep_attention_outputs: true` (the error message), or None where it applies.

    Part of `recompute_refusal`: checkpointing must recompute the attention, and its kernel must be one operator the
    policy can keep (`attention_ops`).
    """
    if not keep:
        return None
    key = "model.speed.keep_attention_outputs: true"
    if not checkpointing:
        return (f"{key} chooses what gradient checkpointing recomputes, and checkpointing is off: set "
                "model.model.gradient_checkpointing: true, or keep_attention_outputs: false.")
    if attn_implementation not in ("sdpa", PACKED_SDPA):
        return (f"{key} keeps the output of SDPA's attention kernel, and the model runs {attn_implementation}: set "
                "model.model.attn_implementation: sdpa, or keep_attention_outputs: false.")
    return None


def recompute_refusal(keep: KeptOutputs, attention: bool, moe: bool, checkpointing: bool,
                      experts_implementation: str | None, attn_implementation: str | None,
                      peft_expert_lora: bool) -> str | None:
    """Why training refuses what `speed.keep_expert_outputs` / `speed.keep_attention_outputs` keep, or None.

    The one rule training (mgmlora.training.fastpath) and the estimate (mgmlora.tools.memory) apply: `keep_refusal`'s,
    then `attention_refusal`'s.
    """
    return keep_refusal(keep, moe, checkpointing, experts_implementation, peft_expert_lora) or \
        attention_refusal(attention, checkpointing, attn_implementation)


def recompute_policy(hidden_size: int, expert_width: int, keep: KeptOutputs,
                     attention: bool = False) -> Callable[..., CheckpointPolicy]:
    """The selective-checkpointing policy: keeps the frozen expert products `keep` names, attention if `attention`.

    A frozen product is a grouped GEMM whose weight operand (the second, (E, in, out)) does not require grad: the
    experts' own weights, not LoRA's factors.
    """
    products, kernels = grouped_gemm_ops(), (attention_ops() if attention else ())
    kept = {"none": (), "gate_up": ((hidden_size, 2 * expert_width),),
            "all": ((hidden_size, 2 * expert_width), (expert_width, hidden_size))}[keep]

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in kernels or (op in products and not args[1].requires_grad and tuple(args[1].shape[-2:]) in kept):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def set_recompute(language_model: nn.Module, keep: KeptOutputs, attention: bool = False) -> None:
    """Turns the language model's checkpointing on again with the policy for `keep` and `attention`.

    `none` and False: whole-layer recompute. The caller checks `keep_refusal` and `attention_refusal` first
    (mgmlora.training.fastpath). Enabling again replaces each layer's checkpoint function; transformers also registers
    its input-gradient hook again, which is idempotent.
    """
    if keep == "none" and not attention:
        enable_gradient_checkpointing(language_model)
        return
    cfg = language_model.config.get_text_config()
    width = expert_width(cfg) if keep != "none" else 0  # a dense model has no expert width
    policy = recompute_policy(cfg.hidden_size, width, keep, attention)
    enable_gradient_checkpointing(language_model, context_fn=partial(create_selective_checkpoint_contexts, policy))
