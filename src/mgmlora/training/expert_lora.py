"""Split LoRA on fused MoE experts: the frozen expert GEMM plus two thin LoRA GEMMs, never W + B A.

PEFT adapts a fused 3-D expert parameter (`target_parameters`, `ParamWrapper`; mgmlora.training.lora) by adding
scaling * B_e A_e to every expert's weight on every call: a parametrization registered for the length of the call, so
the experts read W + delta. Each call therefore forms a tensor the size of the layer's whole expert stack (for a
top-k router most of those experts see few tokens), again in the checkpointed recompute, and the backward forms its
gradient of the same size before reducing it onto A and B. The parametrization also swaps the experts module's class
on each call, which keeps torch.compile away from those layers (mgmlora.models.loaded.eager_regions).

`speed.expert_lora: split` runs the same function the way unsloth and the Split-LoRA literature do: each routed
token goes through its expert's frozen weight and, beside it, through its expert's A then B (grouped GEMMs over the
same expert offsets, `mgmlora.models.experts.ExpertLora`), so the extra work scales with the tokens, not with the
experts, and nothing of the expert stack's size is formed. The trainable tensors stay PEFT's own (`lora_A`/`lora_B`
of each `ParamWrapper`): state dict keys, saved adapters, merging and export are unchanged. Only the outermost
wrapper of an experts module changes: its class becomes `SplitLoraExperts` (a `ParamWrapper` whose forward hands
the factors of the whole wrapper chain to the experts forward), once, when the run starts. PEFT recognises its
wrappers by class name when it adds or loads another adapter: `set_expert_lora(model, "peft")` first.

It needs mgmlora's experts forward (`model.model.experts_implementation: mgmlora_grouped_mm`, the default) and a
layout that forward runs itself (mgmlora.models.experts.supports_lora); other modules keep PEFT's path, and the run's
log says which. Same loss and gradients as PEFT's path (tests/training/test_expert_lora.py): equal in float32; in
bf16 the split rounds less, since PEFT rounds W + B A to bf16 before its GEMM.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import ParamWrapper
from torch import nn

from mgmlora.models.experts import FAST_EXPERTS, ExpertLora, supports_lora
from mgmlora.models.loaded import outer_param_wrappers
from mgmlora.models.transformers_private import experts_implementation


def _chain(wrapper: ParamWrapper) -> list[ParamWrapper]:
    """`wrapper` and the ParamWrappers nested inside it (PEFT nests one per adapted parameter of a module)."""
    chain = [wrapper]
    while isinstance(chain[-1].base_layer, ParamWrapper):
        chain.append(chain[-1].base_layer)
    return chain


def expert_factors(wrapper: ParamWrapper, adapter: str) -> ExpertLora:
    """PEFT's LoRA weights of one fused expert parameter as per-expert factors (a (E, in, r), b (E, r, out)).

    PEFT stores one `nn.Linear` pair for all experts: `lora_A.weight` (E * r, in) with expert e's rows at
    [e * r, (e + 1) * r), and `lora_B.weight` (out, r * E) with rank i of expert e in column i * E + e
    (`ParamWrapper.get_delta_weight`). `in` and `out` are the projection's own input and output sizes whichever way
    the model stores the fused weight, so the factors need no transposition flag.
    """
    experts, r = wrapper.num_experts, wrapper.r[adapter]
    a = wrapper.lora_A[adapter].weight.view(experts, r, -1).transpose(1, 2)  # (E, in, r), a view
    b = wrapper.lora_B[adapter].weight.view(-1, r, experts).permute(2, 1, 0)  # (E, r, out), a view
    return ExpertLora(a, b, wrapper.scaling[adapter])


class SplitLoraExperts(ParamWrapper):
    """PEFT's ParamWrapper whose forward runs the experts with their LoRA beside the weights, not merged into them."""

    def forward(self, x, *args, **kwargs):
        """The experts module's forward with every wrapped parameter's LoRA passed as factors (`lora=`).

        Disabled adapters run the plain experts (merged ones are unmerged first, as PEFT does); merged ones run them
        too (their delta is in the weights already). Several active adapters, per-sample adapter names, a chain only
        partly merged or an experts implementation other than mgmlora's go through PEFT's own forward, eagerly even
        inside a compiled layer (`_peft_forward`).
        """
        chain = _chain(self)
        base = chain[-1].base_layer
        if self.disable_adapters:
            for wrapper in chain:
                if wrapper.merged:
                    wrapper.unmerge()
            return base(x, *args, **kwargs)
        if all(w.merged for w in chain):
            return base(x, *args, **kwargs)
        active = {tuple(a for a in w.active_adapters if a in w.lora_A) for w in chain}  # {(name,)} when split
        one = next(iter(active)) if len(active) == 1 else ()
        if (len(one) != 1 or any(w.merged for w in chain) or kwargs.get("adapter_names")
                or not _runs_fast_experts(base)):
            return _peft_forward(self, x, *args, **kwargs)
        lora = {w.parameter_name: expert_factors(w, one[0]) for w in chain}
        return base(x, *args, lora=lora, **kwargs)


@torch.compiler.disable
def _peft_forward(wrapper: ParamWrapper, x, *args, **kwargs):
    """PEFT's own forward, never traced by torch.compile.

    Its per-call parametrization recompiles on every call and, checkpointed, could run compiled in the forward and
    eagerly in the recompute (mgmlora.models.loaded.eager_regions says why); eager, both take the same path.
    """
    return ParamWrapper.forward(wrapper, x, *args, **kwargs)


def _runs_fast_experts(experts: nn.Module) -> bool:
    config = getattr(experts, "config", None)
    return config is not None and experts_implementation(config) == FAST_EXPERTS


def splittable(wrapper: nn.Module) -> bool:
    """Whether `wrapper` (an outermost ParamWrapper) adapts fused experts that mgmlora's experts forward runs."""
    base = wrapper.get_base_layer()
    return all(w.num_experts > 1 for w in _chain(wrapper)) and supports_lora(base) and _runs_fast_experts(base)


def set_expert_lora(model: nn.Module, mode: str) -> tuple[int, int]:
    """Runs expert LoRA split (`mode="split"`) or through PEFT (`"peft"`) in `model`, in place.

    Returns:
        (modules now split, adapted expert modules left on PEFT's path although `split` was asked for).
    """
    split = skipped = 0
    for wrapper in outer_param_wrappers(model):
        if mode == "split" and splittable(wrapper):
            wrapper.__class__ = SplitLoraExperts
            split += 1
        else:
            skipped += mode == "split"
            wrapper.__class__ = ParamWrapper
    return split, skipped
