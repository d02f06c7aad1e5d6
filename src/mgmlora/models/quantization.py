"""QLoRA's frozen base: the language model's decoder weights in 4-bit NF4, the fused MoE experts included.

`model.model.quantization` (QuantizationArgs) turns it on. What is stored in 4 bits: every `nn.Linear` inside the
decoder layers (attention projections, dense MLPs, shared experts) and every fused 3-D expert parameter
(Qwen3-MoE's `mlp.experts.gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)). What stays in the model dtype:
embeddings, norms, the MoE router, the LM head, and MGM's towers and projector (outside the decoder layers). LoRA
weights stay full precision.

- Dense linears: bitsandbytes' `Linear4bit` where bitsandbytes is installed (the `qlora` extra; PEFT then injects its
  own QLoRA layer, `peft.tuners.lora.bnb.Linear4bit`); otherwise `Nf4Linear` below, an `nn.Linear` whose weight is
  the NF4 codes (same format, mgmlora.models.nf4), which PEFT adapts like any linear.
- Fused experts: no library stores a 3-D parameter in 4 bits (bitsandbytes' layers are 2-D linears; transformers'
  `BitsAndBytesConfig` skips the fused experts), so mgmlora does. The codes live in `Nf4Weight` children of the
  experts module (`nf4_gate_up_proj`, `nf4_down_proj`); the parameter itself becomes a frozen zero placeholder of the
  right shape and dtype that holds no memory (one element, expanded). mgmlora's experts forward
  (mgmlora.models.experts, `experts_implementation: mgmlora_grouped_mm`, required) dequantises each weight when the
  layer runs (`expert_weight`) and adds the placeholder when PEFT has parametrised it: PEFT's expert LoRA
  (`lora.target_experts`, `ParamWrapper`) adds its delta to whatever the parameter holds, so the placeholder then
  reads as zero + delta and the sum is the 4-bit weight + delta, with gradients reaching LoRA only. Autograd keeps
  the dequantised tensor for the grouped GEMM's backward; non-reentrant gradient checkpointing drops it with the
  layer's other activations and the recompute dequantises again, so only one layer's experts exist in the compute
  dtype at a time. Training a quantised MoE model therefore requires checkpointing (mgmlora.training.trainable
  refuses it off: every layer's dequantised experts would stay alive until the backward pass); inference (no
  autograd) keeps none.

Quantised one decoder layer at a time on the run's device, so the device never holds more than one layer in the
model dtype beyond the 4-bit layers already done (transformers' bitsandbytes loading would skip the fused experts).
A text model is built on the meta device and each layer gets its values just before it is quantised
(mgmlora.models.layerwise): read from a safetensors checkpoint layer by layer, or random init on the device, so the
host never holds the model-dtype model either (56.9 GiB for Qwen3-30B-A3B in bf16). Other checkpoints (`.bin`,
layouts the layer-by-layer reader does not cover) and MGM are built whole on the CPU first, then quantised the same
way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from mgmlora.errors import UsageError
from mgmlora.models.dtypes import DTYPES, DtypeName
from mgmlora.models.nf4 import Backend, Nf4Tensor, bitsandbytes_available, dequantize, quantize


@dataclass
class QuantizationArgs:
    """The frozen base in 4 bits (QLoRA).

    Attributes:
        bits: bits per stored weight; 4 is the only width.
        quant_type: the 4-bit code; NF4 (normal-float quantiles, QLoRA's choice for normally distributed weights).
        double_quant: store the per-64-value scales in 8 bits too (4.13 instead of 4.5 bits per weight).
        compute_dtype: dtype the weights are dequantised to for each matrix product.
        backend: `auto` uses bitsandbytes' kernels on a CUDA device where the package is installed (the `qlora`
            extra) and mgmlora's pure-PyTorch NF4 (same format) otherwise, the CPU included: bitsandbytes' CPU
            backend dequantises some shapes wrongly (bench/nf4_cpu.py's shape check; mgmlora.models.nf4).
            `bitsandbytes` or `torch` force one.
    """

    bits: Literal[4] = 4
    quant_type: Literal["nf4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DtypeName = "bfloat16"
    backend: Literal["auto", "bitsandbytes", "torch"] = "auto"

    def resolved_backend(self, device: torch.device) -> Backend:
        """The backend that runs on `device`."""
        if self.backend == "auto":
            return "bitsandbytes" if device.type == "cuda" and bitsandbytes_available() else "torch"
        if self.backend == "bitsandbytes" and not bitsandbytes_available():
            raise UsageError("model.model.quantization.backend=bitsandbytes needs the bitsandbytes package: "
                             "pip install 'mgmlora[qlora]', or set backend: auto.")
        return self.backend

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        return DTYPES[self.compute_dtype]


class Nf4Weight(nn.Module):
    """One frozen tensor in NF4 (codes and scales as non-persistent buffers, so `.to(device)` moves them)."""

    def __init__(self, q: Nf4Tensor, backend: Backend):
        super().__init__()
        self.shape, self.dtype, self.backend = q.shape, q.dtype, backend
        for name in ("codes", "absmax", "absmax_scale", "absmax_offset"):
            self.register_buffer(name, getattr(q, name), persistent=False)

    def tensor(self) -> Nf4Tensor:
        """The stored codes as an `Nf4Tensor`."""
        return Nf4Tensor(self.codes, self.absmax, self.shape, self.dtype, self.absmax_scale, self.absmax_offset)

    def dequantize(self) -> torch.Tensor:
        """A fresh tensor of `shape` in the compute dtype."""
        return dequantize(self.tensor(), self.backend)

    def extra_repr(self) -> str:  # noqa: D102
        return f"shape={tuple(self.shape)}, nf4 -> {self.dtype}, {self.backend}"


class _Nf4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantised in forward and again in backward: only the 4-bit codes are kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Nf4Weight) -> torch.Tensor:  # noqa: D102
        ctx.weight = weight
        return x @ weight.dequantize().t()  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        # (..., out) @ (out, in) -> (..., in); the base is frozen. grad may be in autocast's dtype, not the weight's
        return grad @ ctx.weight.dequantize().to(grad.dtype), None


class Nf4Linear(nn.Linear):
    """A frozen `nn.Linear` stored in NF4, the pure-PyTorch counterpart of bitsandbytes' `Linear4bit`.

    It subclasses `nn.Linear` so PEFT wraps it with its standard LoRA layer (which only calls the base layer and reads
    `in_features`, `out_features` and the weight's device); `weight` is the uint8 codes (frozen), so anything that
    treats it as a float matrix fails loudly instead of computing with codes.
    """

    def __init__(self, linear: nn.Linear, args: QuantizationArgs, device: torch.device):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.nf4 = Nf4Weight(quantize(linear.weight.detach().to(device), args.double_quant, args.dtype, "torch"),
                             "torch")
        self.weight = nn.Parameter(self.nf4.codes, requires_grad=False)
        bias = None if linear.bias is None else linear.bias.detach().to(device, args.dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = _Nf4Matmul.apply(x.to(self.nf4.dtype), self.nf4)
        return out if self.bias is None else out + self.bias


def _bnb_linear(linear: nn.Linear, args: QuantizationArgs, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=args.dtype, compress_statistics=args.double_quant, quant_type="nf4",
                              device="meta")
    weight = bnb.nn.Params4bit(linear.weight.detach().to(device), requires_grad=False, blocksize=64,
                               compress_statistics=args.double_quant, quant_type="nf4")
    layer.weight = weight.to(device)  # Params4bit quantises when it moves to a device
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device, args.dtype), requires_grad=False)
    return layer


def _placeholder(weight: Nf4Weight) -> torch.Tensor:
    # one element expanded to the full shape: shape, dtype and device as the parameter had, no memory
    return torch.zeros((), dtype=weight.dtype, device=weight.codes.device).expand(weight.shape)


def _quantize_experts(experts: nn.Module, names: tuple[str, ...], args: QuantizationArgs, backend: Backend,
                      device: torch.device) -> int:
    for name in names:
        param = getattr(experts, name)
        delattr(experts, name)  # nn.Module.__delattr__ drops it from the module's parameters
        q = Nf4Weight(quantize(param.detach().to(device), args.double_quant, args.dtype, backend), backend)
        experts.add_module(f"nf4_{name}", q)
        # a frozen Parameter, not a buffer: PEFT's target_parameters only matches parameters
        experts.register_parameter(name, nn.Parameter(_placeholder(q), requires_grad=False))
        del param
    return len(names)


def expert_weight(experts: nn.Module, name: str) -> torch.Tensor:
    """The fused expert parameter `name` as the experts forward should use it, LoRA delta included.

    Unquantised: the attribute itself (PEFT's parametrisation adds expert LoRA to it). Quantised: the 4-bit weight,
    dequantised now, plus the attribute, which is the zero placeholder with PEFT's delta added when expert LoRA is on.
    """
    weight = getattr(experts, name)
    nf4 = getattr(experts, f"nf4_{name}", None)
    if nf4 is None:
        return weight
    base = nf4.dequantize()  # (E, ., .) one layer's experts in the compute dtype
    return base + weight if parametrize.is_parametrized(experts, name) else base


def quantize_layers(layers: nn.Module, args: QuantizationArgs, device: torch.device | str,
                    prepare: Callable[[nn.Module], None] | None = None) -> dict[str, int]:
    """Replaces the frozen weights of `layers` (the decoder layer list) with NF4, one layer at a time on `device`.

    `prepare(layer)` runs on each layer just before it is quantised: QLoRA's random init gives a meta-device layer its
    memory and values there (mgmlora.models.layerwise), so at most one layer exists in the model dtype at a time.

    Returns:
        counts of what was quantised: {"linear": n, "experts": n}.

    Raises:
        UsageError: on a model partitioned by DeepSpeed ZeRO-3.
    """
    device = torch.device(device)
    backend = args.resolved_backend(device)
    counts = {"linear": 0, "experts": 0}
    if any(hasattr(p, "ds_id") for p in layers.parameters()):
        raise UsageError("model.model.quantization does not run under DeepSpeed ZeRO-3 (partitioned weights cannot be "
                         "quantised); drop the ZeRO-3 strategy config or set model.model.quantization: null.")
    for layer in layers:
        if prepare is not None:
            prepare(layer)
        for parent_name, parent in list(layer.named_modules()):
            fused = tuple(n for n, p in parent.named_parameters(recurse=False) if p.ndim == 3)
            if fused:
                counts["experts"] += _quantize_experts(parent, fused, args, backend, device)
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    make = _bnb_linear if backend == "bitsandbytes" else Nf4Linear
                    setattr(parent, child_name, make(child, args, device))
                    counts["linear"] += 1
        layer.to(device)  # what stays in the model dtype (norms, router) joins the 4-bit weights
    return counts


DEEPSPEED_MOE_REFUSAL = (
    "model.model.quantization on a MoE model does not run under DeepSpeed: each 4-bit fused expert weight sits behind "
    "a zero-memory placeholder parameter, and DeepSpeed's start-up broadcast of every parameter cannot send it. Train "
    "on one GPU without DeepSpeed (trainer.strategy: auto; drop configs/strategy/zero*.yaml), or set "
    "model.model.quantization: null.")


def quantized_bytes(numel: int, double_quant: bool) -> float:
    """Device bytes of `numel` weights in NF4: half a byte each plus the block scales."""
    scales = numel / 64 * (1 + 4 / 256) if double_quant else numel / 64 * 4
    return numel / 2 + scales


__all__ = ["DEEPSPEED_MOE_REFUSAL", "Nf4Linear", "Nf4Weight", "QuantizationArgs", "expert_weight",
           "quantize_layers", "quantized_bytes"]
