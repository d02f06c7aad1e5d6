"""mgmlora's MoE experts forward: transformers' grouped GEMM without the expert-parallel masks, weighted earlier.

transformers runs fused MoE experts (Qwen3-MoE's `mlp.experts.gate_up_proj` / `down_proj`, 3-D tensors) through an
"experts implementation" chosen by name (`grouped_mm` by default). In the Qwen3-30B-A3B step profile (configs/README.md,
transformers 5.17) `grouped_mm` spends much of its time around the GEMMs: its expert-parallel sentinel masking runs
three bf16 `masked_fill` passes per layer even when nothing is expert-parallel, and the routing weight multiplies the
(tokens x top_k, hidden) output of the down projection. Newer transformers releases skip the masks without expert
parallelism; the weighting is unchanged.

`mgmlora_grouped_mm` (registered with transformers' own `ExpertsInterface`, selected by
`model.experts_implementation`) computes the same function with the same kernels (`grouped_mm`), but:
- no sentinel masks (mgmlora never shards experts across ranks; an expert-parallel module is handed back to
  transformers' implementation);
- the routing weight multiplies the (S, intermediate) activation before the down projection instead of its
  (S, hidden) output: the projection is linear and bias-free, so the result is the same up to bf16 rounding, on a
  smaller tensor (768 instead of 2048 columns for Qwen3-30B-A3B), forward and backward;
- the tokens' permutation into expert order and back runs as gathers in both directions (mgmlora.models.routing),
  where indexing would make autograd scatter (an `index_copy` back to token order, an accumulating `index_put` for
  the backward of the gather).
Layouts it does not cover (biases, no gate, a post-expert norm) are handed back to transformers' `grouped_mm`.
It is also the one experts forward that runs quantised experts (mgmlora.models.quantization): it reads each 4-bit
fused weight, and an FP8 one PEFT's expert LoRA joins its delta to, through `expert_weight`, which dequantises it
when it runs; a frozen FP8 weight goes through `fp8_dequantized_grouped_linear`, which dequantises it again for the
backward instead of keeping it, or with `expert_products: fp8` is multiplied by its codes directly
(mgmlora.models.fp8's grouped GEMM).
It also runs LoRA on the experts without merging it into their weights (`lora`, `ExpertLora`): the frozen expert
GEMM plus two thin grouped GEMMs through each routed token's expert's A and B, so no (E, out, in) weight + delta is
ever formed (mgmlora.training.expert_lora passes PEFT's factors in).
Same loss and gradients as `grouped_mm` (tests/models/test_experts.py); bench/train_step.py (`+fastexperts`)
measures its speed, and configs/README.md has the results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from mgmlora.errors import MgmloraError, UsageError
from mgmlora.models import fp8
from mgmlora.models.fp8 import Fp8Weight
from mgmlora.models.quantization import (
    expert_weight,
    frozen_stored_weight,
    has_quantized_experts,
)
from mgmlora.models.routing import from_expert_order, route, to_expert_order

FAST_EXPERTS = "mgmlora_grouped_mm"


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S, in) @ per-group (E, in, out) -> (S, out); rows [offsets[e-1], offsets[e]) use expert e's matrix.

    PyTorch's public `torch.nn.functional.grouped_mm` (torch 2.11, the GPU image's, and later have it).
    """
    if not hasattr(torch.nn.functional, "grouped_mm"):
        raise MgmloraError(f"model.model.experts_implementation: {FAST_EXPERTS} needs torch.nn.functional.grouped_mm, "
                           f"which torch {torch.__version__} lacks: upgrade torch, or set "
                           "model.model.experts_implementation: grouped_mm (transformers' own).")
    if weight.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _eager_grouped_mm(x.to(weight.dtype), weight, offsets)
    return torch.nn.functional.grouped_mm(x.to(weight.dtype), weight, offs=offsets)


@torch.compiler.disable
def _eager_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grouped_mm outside the compiled graph, for weights that are not bf16.

    Its compiled form (the meta function dynamo traces with) takes bf16 only, so a float32 MoE model (the CPU demos)
    crashed under `speed.compile`; this runs the GEMM eagerly and the rest of the layer compiled around it.
    """
    return torch.nn.functional.grouped_mm(x, weight, offs=offsets)


def _linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    # weight (E, out, in) as nn.Linear stores it, or (E, in, out) when the model keeps it transposed
    return _grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)


@torch.library.custom_op("mgmlora::contiguous_factor", mutates_args=())
def contiguous_factor(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that torch.compile keeps contiguous (the gradient passes through unchanged).

    grouped_mm needs each expert's matrix row- or column-major, and PEFT's B factor is neither (its experts are the
    innermost dimension, `ExpertLora`). `Tensor.contiguous()` says so in eager mode, but inductor picks the layout of a
    copy itself and, for a copy of a strided view, keeps the view's stride order: the compiled step then fails in
    grouped_mm ("Invalid strides/sizes", bench/results/2026-12-04-train_step_r8_experts_split_compile_x32-*; the same
    on the CPU, tests/models/test_experts.py). The output of a custom op has the layout its fake function gives.
    """
    return t.clone(memory_format=torch.contiguous_format)


@contiguous_factor.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


contiguous_factor.register_autograd(lambda ctx, grad: grad)


class ExpertLora(NamedTuple):
    """LoRA of one fused expert weight as per-expert factors: expert e maps x to x @ W_e + scaling * x @ a[e] @ b[e].

    `a` and `b` may be any strided views (PEFT's storage, mgmlora.training.expert_lora.expert_factors); each call
    copies them (cast to the input's dtype, rank padding where needed, the contiguous copy), r x (in + out) values per
    expert each time.
    """

    a: torch.Tensor  # (E, in, r)
    b: torch.Tensor  # (E, r, out)
    scaling: float

    def __call__(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(S, in) rows grouped by expert (`offsets` as in `_grouped_mm`) -> (S, out) LoRA outputs, scaled."""
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        if pad := -a.shape[-1] % (16 // x.element_size()):
            # grouped_mm needs 16-byte row strides; zero rank columns of A and rows of B add nothing
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, 0, 0, pad))
        low = _grouped_mm(x, contiguous_factor(a), offsets)  # (S, r)
        return _grouped_mm(low, contiguous_factor(b), offsets) * self.scaling  # (S, out)


@torch.library.custom_op("mgmlora::fp8_dequantized_grouped_linear", mutates_args=())
def fp8_dequantized_grouped_linear(x: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                                   backward: bool) -> torch.Tensor:
    """Rows grouped by expert through a frozen FP8 expert weight W_e (out, in), dequantised here and dropped.

    `codes` (E, out, in) uint8 bits of e4m3, `scale` (E, out, 1) fp32. `backward=False`: (S, in) -> (S, out),
    x @ W_e.T; `backward=True`: (S, out) -> (S, in), x @ W_e (the input gradient). An opaque operator, so that
    torch.compile cannot merge the forward's dequantisation with the backward's and keep the weight between them.
    """
    weight = fp8.dequantize(codes, scale, x.dtype)  # (E, out, in)
    return _grouped_mm(x, weight if backward else weight.transpose(-2, -1), offsets)


@fp8_dequantized_grouped_linear.register_fake
def _(x, offsets, codes, scale, backward):
    return x.new_empty(x.shape[0], codes.shape[2] if backward else codes.shape[1])


def _save_codes(ctx, inputs, output) -> None:
    _, offsets, codes, scale, backward = inputs
    ctx.save_for_backward(offsets, codes, scale)  # the stored weight, not a dequantised copy
    ctx.backward = backward


def _input_gradient(ctx, grad: torch.Tensor):
    offsets, codes, scale = ctx.saved_tensors
    grad_x = fp8_dequantized_grouped_linear(grad.contiguous(), offsets, codes, scale, not ctx.backward)
    return grad_x, None, None, None, None  # the weight is frozen


fp8_dequantized_grouped_linear.register_autograd(_input_gradient, setup_context=_save_codes)


def _expert_linear(experts: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor,
                   transposed: bool) -> torch.Tensor:
    """X (S, in) grouped by expert through the fused weight `name` -> (S, out): in FP8 where it is stored so."""
    stored = frozen_stored_weight(experts, name)  # None where PEFT's expert LoRA joins its delta to the weight
    if isinstance(stored, Fp8Weight) and stored.grouped_fp8:  # expert_products: fp8
        return stored.grouped(x, offsets)
    if isinstance(stored, Fp8Weight) and stored.dequantize_in_backward:
        # without checkpointing (quantization.set_expert_backward): dequantised in the forward and again in the
        # backward, since autograd around a dequantise-then-multiply would keep every layer's dequantised
        # (E, out, in) weight until the backward pass (under torch.compile too, which merges the two
        # dequantisations). NF4 experts train under checkpointing only (quantization.checkpointing_required)
        return fp8_dequantized_grouped_linear(x.to(stored.dtype), offsets, stored.codes, stored.scale, False)
    return _linear(x, expert_weight(experts, name), offsets, transposed)


def supports_lora(module: nn.Module) -> bool:
    """Whether `fast_experts_forward` runs this experts module itself, so that it can take LoRA factors (`lora`)."""
    return not (getattr(module, "_is_expert_parallel", False) or getattr(module, "has_bias", False)
                or not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False))


def fast_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, lora: Mapping[str, ExpertLora] | None = None) -> torch.Tensor:
    """The experts of one MoE layer over its tokens: sum over k of weight_k * expert_k(token).

    Args:
        self: the experts module (transformers' `use_experts_implementation` class: `gate_up_proj`, `down_proj`,
            `num_experts`, `_apply_gate`).
        hidden_states: (T, H) the layer's tokens.
        top_k_index: (T, k) the experts each token is routed to.
        top_k_weights: (T, k) their routing weights.
        lora: LoRA factors by parameter name (`gate_up_proj`, `down_proj`), added beside the frozen GEMMs.

    Returns:
        (T, H) in the dtype of `hidden_states`.
    """
    if not supports_lora(self):
        if has_quantized_experts(self):
            raise UsageError("model.model.quantization: this MoE layout (expert-parallel, biased, gate-less or "
                             "post-normed experts) runs through transformers' experts forward, which cannot read "
                             "quantised experts; set model.model.quantization: null for this model.")
        if lora:
            raise ValueError("fast_experts_forward got LoRA factors for a layout it hands to transformers "
                             "(expert-parallel, biased, gate-less or post-normed experts)")
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    lora = lora or {}
    k = top_k_index.shape[-1]
    transposed = getattr(self, "is_transposed", False)
    expert_ids, order = torch.sort(top_k_index.reshape(-1))  # (S,) S = T * k, grouped by expert
    # histc (not bincount) keeps this free of host syncs; CPU histc takes floats only
    ids = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()
    offsets = torch.cumsum(torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1), 0,
                           dtype=torch.int32)  # (E,) end of each expert's rows
    path = route(order, k)
    x = to_expert_order(hidden_states, path)  # (S, H) each routed copy of a token, grouped by expert
    gate_up = _expert_linear(self, "gate_up_proj", x, offsets, transposed)  # (S, 2I)
    if "gate_up_proj" in lora:
        gate_up = gate_up + lora["gate_up_proj"](x.to(gate_up.dtype), offsets)
    weights = top_k_weights.reshape(-1)[order].to(gate_up.dtype)  # (S,)
    if hasattr(self, "_apply_gate"):
        inter = self._apply_gate(gate_up)  # (S, I)
    else:  # transformers releases before the gate hook: gate and up concatenated
        gate, up = gate_up.chunk(2, dim=-1)
        inter = self.act_fn(gate) * up  # (S, I)
    inter = inter * weights[:, None]  # weighted here, before the linear down projection
    out = _expert_linear(self, "down_proj", inter, offsets, transposed)  # (S, H)
    if "down_proj" in lora:
        out = out + lora["down_proj"](inter.to(out.dtype), offsets)
    return from_expert_order(out, path).to(hidden_states.dtype)  # (T, H)


def register() -> None:
    """Registers `FAST_EXPERTS` with transformers' experts registry (idempotent); the model loaders call it."""
    ALL_EXPERTS_FUNCTIONS.register(FAST_EXPERTS, fast_experts_forward)
