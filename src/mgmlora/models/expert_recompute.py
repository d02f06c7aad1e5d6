"""What gradient checkpointing recomputes in a MoE layer: `speed.keep_expert_outputs`.

Whole-layer checkpointing runs each decoder layer's forward again in the backward pass, the frozen expert GEMMs
included: in a fine-grained MoE such as Qwen3-30B-A3B those are the larger part of a layer's matrix work. PyTorch's
selective activation checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`, the mechanism
torchtitan's per-operator checkpointing uses) lets the forward keep the outputs of chosen operators, which the recompute
then reads instead of computing again; everything else is recomputed as before. The operators kept here are the
grouped GEMMs through frozen expert weights (`aten._grouped_mm`, and `aten._scaled_grouped_mm` for FP8 experts), told
apart by their weight operand, (E, hidden, 2 x expert width) for the fused gate/up projection and (E, expert width,
hidden) for the down projection:
- `gate_up`: the gate/up projection's output, (S, 2 x expert width) for the S = tokens x top_k routed rows;
- `all`: the down projection's output too, (S, hidden): no expert GEMM runs twice.
Each kept output stays alive from its layer's forward to its layer's backward: memory for FLOPs, which
mgmlora.tools.memory counts and bench/train_step.py (`+keepgateup`, `+keepexperts`) measures. LoRA's own grouped
GEMMs (their factors train) and everything outside the experts (attention, norms, routing, the element-wise
expert activation, a quantised weight's dequantisation) are recomputed. Kept or recomputed, an operator returns the
same values: loss and gradients do not change (tests/models/test_expert_recompute.py).

Where the checkpoint sits matters under `speed.compile`. transformers 5.17 checkpoints around each decoder layer's
call: the recompute reruns the whole compiled forward, so `all` skips both projections. Newer 5.x releases checkpoint
inside `forward`, within the compiled layer, and the compiler recomputes only what the backward reads, which never
included the down projection's output: there `all` keeps no more than `gate_up` (`effective_keep`).

mgmlora's experts forward is required (`experts_implementation: mgmlora_grouped_mm` on layouts it runs itself):
transformers' own adds an expert bias to the kept output in place, which the kept copy forbids.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mgmlora.models.causal_lm import enable_gradient_checkpointing, expert_width
from mgmlora.models.experts import FAST_EXPERTS
from mgmlora.models.torch_private import grouped_gemm_ops
from mgmlora.models.transformers_private import checkpoint_inside_forward

KeptOutputs = Literal["none", "gate_up", "all"]


def keep_refusal(keep: KeptOutputs, moe: bool, checkpointing: bool, experts_implementation: str | None,
                 peft_expert_lora: bool) -> str | None:
    """Why training refuses `speed.keep_expert_outputs: keep` (the error message), or None where it applies.

    The one rule for training (mgmlora.training.fastpath, which also checks each experts module's layout) and the
    estimate (mgmlora.tools.memory): there must be frozen expert GEMMs whose recompute the setting skips.
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


def expert_output_policy(hidden_size: int, expert_width: int, keep: KeptOutputs) -> Callable[..., CheckpointPolicy]:
    """The selective-checkpointing policy keeping the outputs of the frozen expert products that `keep` names.

    A frozen product is a grouped GEMM whose weight operand (the second, (E, in, out)) does not require grad: the
    experts' own weights, not LoRA's factors.
    """
    products = grouped_gemm_ops()
    kept = {"none": (), "gate_up": ((hidden_size, 2 * expert_width),),
            "all": ((hidden_size, 2 * expert_width), (expert_width, hidden_size))}[keep]

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in products and not args[1].requires_grad and tuple(args[1].shape[-2:]) in kept:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def keep_expert_outputs(language_model: nn.Module, keep: KeptOutputs) -> None:
    """Turns the language model's checkpointing on again with the policy for `keep` (`none`: whole-layer recompute).

    The caller checks `keep_refusal` first (mgmlora.training.fastpath). Enabling again replaces each layer's checkpoint
    function; transformers also registers its input-gradient hook again, which is idempotent.
    """
    if keep == "none":
        enable_gradient_checkpointing(language_model)
        return
    cfg = language_model.config.get_text_config()
    policy = expert_output_policy(cfg.hidden_size, expert_width(cfg), keep)
    enable_gradient_checkpointing(language_model, context_fn=partial(create_selective_checkpoint_contexts, policy))
