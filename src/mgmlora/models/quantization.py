"""The frozen base in fewer bits: the language model's decoder weights in 4-bit NF4 (QLoRA) or FP8, experts included.

`model.model.quantization` (QuantizationArgs) turns it on; `quant_type` picks the format. `nf4` stores 4 bits per
weight and dequantises each weight to the compute dtype when it runs (the smallest memory, a little slower than the
bf16 base); `fp8` stores one byte per weight and runs the linears' products in FP8 on GPUs with FP8 tensor cores
(mgmlora.models.fp8: half the bf16 weight memory; configs/README.md has what its speed measured). The rest of this
docstring describes NF4; FP8 takes the same weights, layer by layer the same way, with mgmlora.models.fp8's
`Fp8Linear` and `Fp8Weight` in place of the NF4 ones (`fp8_<name>` children of the experts module); its experts are
dequantised as below unless `expert_products: fp8` runs PyTorch's grouped FP8 GEMM on them (then only PEFT's expert
LoRA dequantises them). What is stored in 4 bits: every `nn.Linear` inside the
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
  reads as zero + delta and the sum is the 4-bit weight + delta, with gradients reaching LoRA only. Autograd keeps the
  dequantised weight (or that sum) for the grouped GEMM's backward; non-reentrant gradient checkpointing drops it with
  the layer's other activations and the recompute dequantises again, so only one layer's experts exist in the compute
  dtype at a time. Training an NF4 MoE model, or PEFT's expert LoRA on a quantised one, therefore requires checkpointing
  (`checkpointing_required`, the one rule that training, the estimate, the speed plan and the bench apply: every layer's
  dequantised experts would stay alive until the backward pass). Frozen FP8 experts without a parametrisation and
  without checkpointing go through an operator that dequantises in its forward and again in its backward and keeps only
  the codes (mgmlora.models.experts, `set_expert_backward`); inference (no autograd) keeps none.

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
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from mgmlora.errors import SettingsError, UsageError
from mgmlora.models import fp8
from mgmlora.models.dtypes import DTYPES, DtypeName
from mgmlora.models.nf4 import Backend, Nf4Tensor, bitsandbytes_available, dequantize, quantize

BITS = {"nf4": 4, "fp8": 8}  # bits per stored weight of each format


@dataclass
class QuantizationArgs:
    """The frozen base in fewer bits: 4-bit NF4 (QLoRA) or FP8.

    Attributes:
        quant_type: `nf4` (normal-float quantiles, QLoRA's choice for normally distributed weights; dequantised for
            each product) or `fp8` (float8 e4m3 with one scale per output row, products in FP8: mgmlora.models.fp8;
            needs a GPU of compute capability 8.9 or later, emulated on the CPU).
        bits: bits per stored weight: 4 for nf4, 8 for fp8; null takes the format's.
        expert_products: fp8 only: how the fused MoE experts multiply. `dequantized` (default): each expert weight is
            dequantised to the compute dtype when it runs (and again in the backward without checkpointing) and
            multiplied by bf16 grouped GEMMs;
            `fp8`: PyTorch's grouped FP8 kernel, which ran at about half the bf16 kernel's rate per token on an H200
            with torch 2.11 (bench/results/2026-12-05-train_step_profile_fp8_compiled_x32-qwen3-30b-a3b-h200.json)
            and needs compute capability 9.x or 10.x.
        double_quant: nf4 only: store the per-64-value scales in 8 bits too (4.13 instead of 4.5 bits per weight).
        compute_dtype: dtype the products are computed in (nf4: the dtype weights are dequantised to); null (the
            default): bfloat16 for FP8 on a GPU (its kernels' output), the model's (`model.model.dtype`) otherwise
            (`resolved`). A layer returns its input's dtype, as bitsandbytes' 4-bit layers do, so a float32 model
            runs bfloat16 products too.
        backend: nf4 only: `auto` uses bitsandbytes' kernels on a CUDA device where the package is installed (the
            `qlora` extra) and mgmlora's pure-PyTorch NF4 (same format) otherwise, the CPU included: bitsandbytes'
            CPU backend dequantises some shapes wrongly (bench/nf4_cpu.py's shape check; mgmlora.models.nf4).
            `bitsandbytes` or `torch` force one.
    """

    quant_type: Literal["nf4", "fp8"] = "nf4"
    bits: Literal[4, 8] | None = None
    expert_products: Literal["dequantized", "fp8"] = "dequantized"
    double_quant: bool = True
    compute_dtype: DtypeName | None = None
    backend: Literal["auto", "bitsandbytes", "torch"] = "auto"

    def __post_init__(self) -> None:
        width = BITS[self.quant_type]
        if self.bits is None:
            self.bits = width
        elif self.bits != width:
            raise SettingsError(f"model.model.quantization: bits={self.bits} does not match "
                                f"quant_type={self.quant_type} ({width} bits); set bits: {width}, or drop it.")
        if self.quant_type == "nf4" and self.expert_products == "fp8":
            raise SettingsError("model.model.quantization: expert_products=fp8 needs quant_type=fp8 (NF4 experts are "
                                "dequantised); drop expert_products or set quant_type: fp8.")
        if self.quant_type == "fp8" and self.backend == "bitsandbytes":
            raise SettingsError("model.model.quantization: backend=bitsandbytes stores NF4 only; with "
                                "quant_type=fp8 set backend: auto.")

    def resolved_backend(self, device: torch.device) -> Backend:
        """The NF4 backend that runs on `device` (`torch` for FP8, which has its own: mgmlora.models.fp8)."""
        if self.quant_type == "fp8":
            return "torch"
        if self.backend == "auto":
            return "bitsandbytes" if device.type == "cuda" and bitsandbytes_available() else "torch"
        if self.backend == "bitsandbytes" and not bitsandbytes_available():
            raise UsageError("model.model.quantization.backend=bitsandbytes needs the bitsandbytes package: "
                             "pip install 'mgmlora[qlora]', or set backend: auto.")
        return self.backend

    def resolved(self, model_dtype: DtypeName, device: torch.device | str) -> QuantizationArgs:
        """These settings with `compute_dtype` decided for a model in `model_dtype` on `device` (null: see above).

        Decided where the layers are quantised, not in the saved settings, so a run's config and its checkpoint's
        hyperparameters say the same (null) and a tool that loads the model in another dtype decides again.
        """
        if self.compute_dtype is not None:
            return self
        fp8_kernels = self.quant_type == "fp8" and torch.device(device).type == "cuda"
        return replace(self, compute_dtype="bfloat16" if fp8_kernels else model_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype (of `resolved` settings, or ones that set it)."""
        if self.compute_dtype is None:
            raise ValueError("QuantizationArgs.compute_dtype is null here: call resolved(model_dtype, device) first.")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps x (..., in) to (..., out) in the compute dtype, returned in x's dtype (as bitsandbytes' layer does)."""
        out = _Nf4Matmul.apply(x.to(self.nf4.dtype), self.nf4)  # (..., out)
        return (out if self.bias is None else out + self.bias).to(x.dtype)


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


def _placeholder(weight: Nf4Weight | fp8.Fp8Weight) -> torch.Tensor:
    # one element expanded to the full shape: shape, dtype and device as the parameter had, no memory
    return torch.zeros((), dtype=weight.dtype, device=weight.codes.device).expand(weight.shape)


def _quantize_experts(experts: nn.Module, names: tuple[str, ...], args: QuantizationArgs, backend: Backend,
                      device: torch.device) -> int:
    for name in names:
        param = getattr(experts, name)
        delattr(experts, name)  # nn.Module.__delattr__ drops it from the module's parameters
        if args.quant_type == "fp8":
            q = fp8.Fp8Weight(param.detach().to(device), args.dtype, getattr(experts, "is_transposed", False),
                              grouped_fp8=args.expert_products == "fp8")
        else:
            q = Nf4Weight(quantize(param.detach().to(device), args.double_quant, args.dtype, backend), backend)
        experts.add_module(f"{args.quant_type}_{name}", q)
        # a frozen Parameter, not a buffer: PEFT's target_parameters only matches parameters
        experts.register_parameter(name, nn.Parameter(_placeholder(q), requires_grad=False))
        del param
    return len(names)


def _stored(experts: nn.Module, name: str) -> Nf4Weight | fp8.Fp8Weight | None:
    """The quantised copy `_quantize_experts` keeps of the fused parameter `name`, or None."""
    return getattr(experts, f"nf4_{name}", None) or getattr(experts, f"fp8_{name}", None)


def has_quantized_experts(experts: nn.Module) -> bool:
    """Whether an experts module holds quantised fused weights (its parameters are then empty placeholders)."""
    return any(isinstance(child, (Nf4Weight, fp8.Fp8Weight)) for child in experts.children())


def expert_weight(experts: nn.Module, name: str) -> torch.Tensor:
    """The fused expert parameter `name` as the experts forward should use it, LoRA delta included.

    Unquantised: the attribute itself (PEFT's parametrisation adds expert LoRA to it). Quantised: the stored weight
    (NF4 or FP8), dequantised now, plus the attribute, which is the zero placeholder with PEFT's delta added when
    expert LoRA is on.
    """
    weight = getattr(experts, name)
    stored = _stored(experts, name)
    if stored is None:
        return weight
    base = stored.dequantize()  # (E, ., .) one layer's experts in the compute dtype
    return base + weight if parametrize.is_parametrized(experts, name) else base


def frozen_stored_weight(experts: nn.Module, name: str) -> Nf4Weight | fp8.Fp8Weight | None:
    """The quantised copy of `name` when the experts forward multiplies by it alone, or None.

    None where the weight is not quantised, or where PEFT's expert LoRA has parametrised the placeholder: its delta
    then joins the dequantised weight (`expert_weight`) and needs autograd through the sum. mgmlora's split expert
    LoRA (`speed.expert_lora: split`) leaves it unparametrised and runs beside the product.
    """
    stored = _stored(experts, name)
    return None if stored is None or parametrize.is_parametrized(experts, name) else stored


def set_expert_backward(model: nn.Module, checkpointed: bool) -> int:
    """How frozen FP8 experts (`expert_products: dequantized`) give the backward their weight; returns how many.

    Without checkpointing each product dequantises again in the backward and keeps only the codes
    (mgmlora.models.experts.fp8_dequantized_grouped_linear): autograd would otherwise keep every layer's dequantised
    experts until the backward pass. Under checkpointing the plain dequantise-then-multiply is kept: the recompute
    frees the weight with the layer, and the operator would dequantise a third time per step, outside compiled code.
    """
    weights = [m for m in model.modules() if isinstance(m, fp8.Fp8Weight) and len(m.shape) == 3]
    for weight in weights:
        weight.dequantize_in_backward = not checkpointed
    return len(weights)


def checkpointing_required(quant_type: str | None, moe: bool, peft_expert_lora: bool) -> str | None:
    """Why this base trains with gradient checkpointing only (the error message), or None where it also trains without.

    The one rule behind training's refusal (mgmlora.training.fastpath), the estimate's (mgmlora.tools.memory), the
    speed plan's candidates and bench/train_step.py's `+nockpt`. A quantised MoE base dequantises each layer's experts
    when they run. Where the product keeps the dequantised weight for its backward (NF4 experts always, FP8 ones where
    PEFT's expert LoRA joins its delta to it), autograd without the recompute keeps every layer's copy until the
    backward pass. Frozen FP8 experts and split expert LoRA keep the codes only (`set_expert_backward`).

    Args:
        quant_type: `model.quantization.quant_type`, None for a bf16 base.
        moe: whether the language model has fused MoE experts.
        peft_expert_lora: whether LoRA on the experts runs through PEFT's path (`speed.expert_lora: peft`, or the
            layers split expert LoRA cannot take).
    """
    if quant_type is None or not moe:
        return None
    if quant_type == "nf4":
        why = ("NF4 experts are dequantised when they run, and without the recompute every layer's dequantised experts "
               "stay alive until the backward pass. Or use quant_type: fp8, whose frozen experts keep only their codes")
    elif peft_expert_lora:
        why = ("PEFT's expert LoRA joins its delta to each layer's dequantised experts, which without the recompute "
               "stay alive until the backward pass. Or set model.speed.expert_lora: split (LoRA beside the frozen "
               "experts)")
    else:
        return None
    return (f"model.model.quantization ({quant_type}) on a MoE model trains with model.model.gradient_checkpointing: "
            f"true only: {why}.")


def _fp8_fits(experts: nn.Module, name: str) -> bool:
    return fp8.supports(getattr(experts, name).shape)


def quantize_layers(layers: nn.Module, args: QuantizationArgs, device: torch.device | str,
                    prepare: Callable[[nn.Module], None] | None = None) -> dict[str, int]:
    """Replaces the frozen weights of `layers` (the decoder layers) with NF4 or FP8, one layer at a time on `device`.

    FP8 keeps in the model dtype the weights whose dimensions the FP8 kernels cannot take (`fp8.supports`), counted
    as `kept`.

    `prepare(layer)` runs on each layer just before it is quantised: QLoRA's random init gives a meta-device layer its
    memory and values there (mgmlora.models.layerwise), so at most one layer exists in the model dtype at a time.

    Returns:
        counts of what was quantised: {"linear": n, "experts": n, "kept": n}.

    Raises:
        UsageError: on a model partitioned by DeepSpeed ZeRO-3, or FP8 on a GPU without FP8 tensor cores.
    """
    device = torch.device(device)
    backend = args.resolved_backend(device)
    if args.quant_type == "fp8":
        try:
            grouped = args.expert_products == "fp8" and any(p.ndim == 3 for p in layers.parameters())
            fp8.check_device(device, args.dtype, experts=grouped)
        except ValueError as err:
            raise UsageError(str(err)) from None
    counts = {"linear": 0, "experts": 0, "kept": 0}
    if any(hasattr(p, "ds_id") for p in layers.parameters()):
        raise UsageError("model.model.quantization does not run under DeepSpeed ZeRO-3 (partitioned weights cannot be "
                         "quantised); drop the ZeRO-3 strategy config or set model.model.quantization: null.")
    for layer in layers:
        if prepare is not None:
            prepare(layer)
        for parent_name, parent in list(layer.named_modules()):
            fused = tuple(n for n, p in parent.named_parameters(recurse=False) if p.ndim == 3)
            if fused and args.quant_type == "fp8" and not all(_fp8_fits(parent, n) for n in fused):
                counts["kept"] += len(fused)
            elif fused:
                counts["experts"] += _quantize_experts(parent, fused, args, backend, device)
            for child_name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                if args.quant_type == "fp8":
                    if not fp8.supports(child.weight.shape):
                        counts["kept"] += 1
                        continue
                    setattr(parent, child_name, fp8.Fp8Linear(child, args.dtype, device))
                else:
                    make = _bnb_linear if backend == "bitsandbytes" else Nf4Linear
                    setattr(parent, child_name, make(child, args, device))
                counts["linear"] += 1
        layer.to(device)  # what stays in the model dtype (norms, router) joins the 4-bit weights
    return counts


DEEPSPEED_MOE_REFUSAL = (
    "model.model.quantization on a MoE model does not run under DeepSpeed: each quantised fused expert weight sits "
    "behind a zero-memory placeholder parameter, and DeepSpeed's start-up broadcast of every parameter cannot send "
    "it. Train on one GPU without DeepSpeed (trainer.strategy: auto; drop configs/strategy/zero*.yaml), or set "
    "model.model.quantization: null.")


def quantized_bytes(numel: int, rows: int, args: QuantizationArgs) -> float:
    """Device bytes of `numel` weights over `rows` output rows in the format of `args`.

    NF4: half a byte each plus the block scales; FP8: one byte each plus a 4-byte scale per row.
    """
    if args.quant_type == "fp8":
        return float(fp8.stored_bytes(numel, rows))
    scales = numel / 64 * (1 + 4 / 256) if args.double_quant else numel / 64 * 4
    return numel / 2 + scales


__all__ = ["BITS", "DEEPSPEED_MOE_REFUSAL", "Nf4Linear", "Nf4Weight", "QuantizationArgs", "expert_weight",
           "frozen_stored_weight", "has_quantized_experts", "quantize_layers", "quantized_bytes",
           "set_expert_backward"]
