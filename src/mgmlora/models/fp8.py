"""FP8 frozen base: decoder weights stored in float8 e4m3, one scale per output row, their products run in FP8.

`model.model.quantization: {quant_type: fp8}` (mgmlora.models.quantization selects the same weights as for NF4). A
LoRA run never updates the base, so its weights are quantised once, when the model loads, and stored that way: one
byte per weight instead of two, and no per-step cast of the weights (a library built for training the weights, such as
torchao's `Float8Linear`, casts them again at every call because they change). The activations entering each product
and the gradients leaving it are quantised per row when they run. GPUs of compute capability 8.9 and later (Ada,
Hopper; the experts' grouped product needs 9.x or 10.x in torch 2.11) run these products on their FP8 tensor cores,
whose peak rate is twice the bf16 one; the quantisation around them is element-wise work that torch.compile
(`speed.compile`) fuses into the neighbouring kernels.

Numerics, per product y = x W^T of a frozen weight W (out, in):
- W = diag(s_w) Q_w: Q_w in e4m3, s_w (out,) the row's absolute maximum over 448 (e4m3's largest value);
- x = diag(s_x) Q_x, per row of x the same way, each time; the kernel accumulates in fp32 and writes the compute
  dtype;
- the input gradient g W = (g diag(s_w)) Q_w: the weight's row scales move onto the gradient's columns before it is
  quantised per row, so the one stored copy of Q_w serves both directions (the kernel reads it transposed, a copy of
  one byte per weight made in the backward).
No gradient reaches the base (it is frozen); LoRA's own products stay in the compute dtype.

Where the products run: `torch._scaled_mm` / `torch._scaled_grouped_mm` on CUDA (mgmlora.models.torch_private says
why the private forms); elsewhere (the CPU tests and demos) the same quantised values are multiplied in float32
(`emulated`), which is what the kernels compute up to the order of the fp32 sums (tests/models/test_fp8.py checks
the dense kernel against it where the CPU build has it, the GPU tier both kernels). The emulated grouped product
stays out of torch.compile (grouped_mm compiles for bf16 only), so on the CPU a checkpointed layer with FP8 experts
runs eagerly under `speed.compile`.
"""

from __future__ import annotations

import torch
from torch import nn

from mgmlora.models import torch_private

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ALIGN = 16  # the FP8 kernels need both dimensions of each weight matrix to be multiples of 16
_TINY = 1e-12  # the smallest amax a row is scaled by (an all-zero row keeps a finite scale)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T (..., n) -> (codes (..., n) in e4m3, scales (..., 1) fp32) with t ~= codes * scales, each row's amax at 448."""
    t = t.detach()
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX  # (..., 1)
    codes = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # (..., n)
    return codes.contiguous(), scale  # the kernels take row-major codes; a strided input keeps its strides above


def supports(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a weight of this shape ((out, in) or (E, out, in)) can be stored for the FP8 kernels."""
    return all(d % ALIGN == 0 for d in shape[-2:])


GROUPED_MAJORS = (9, 10)  # where torch 2.11 runs _scaled_grouped_mm (Blas.cpp: `_scaled_mm_allowed_device`)


def check_device(device: torch.device, dtype: torch.dtype, experts: bool) -> None:
    """Raises unless `device` runs the FP8 products returning `dtype`; the CPU emulates them in any dtype.

    On CUDA: bf16 products (the grouped kernel writes bf16 only, the dense row-wise one bf16 or fp16), a GPU of compute
    capability 8.9 or later, and with fused MoE `experts` a 9.x or 10.x one (the grouped kernel's only builds).

    Raises:
        ValueError: naming the GPU, its capability or the dtype, and the setting to change.
    """
    if device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        name = str(dtype).removeprefix("torch.")
        raise ValueError(f"model.model.quantization.quant_type=fp8 on a GPU computes bfloat16 products; set "
                         f"model.model.quantization.compute_dtype: bfloat16, or null (it is {name}).")
    capability = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
    if capability < (8, 9):
        raise ValueError(f"model.model.quantization.quant_type=fp8 needs FP8 tensor cores (compute capability 8.9 or "
                         f"later); {gpu}. Use quant_type: nf4, or model.model.quantization: null (either changes the "
                         f"memory the run needs: check it with bin/estimate.py --config ... --gpu_memory_gib N).")
    if experts and capability[0] not in GROUPED_MAJORS:
        raise ValueError(f"model.model.quantization.expert_products=fp8 needs PyTorch's grouped FP8 kernel, built for "
                         f"compute capability 9.x and 10.x only; {gpu}. Set model.model.quantization.expert_products: "
                         "dequantized (the experts then run bf16 grouped GEMMs).")


def _mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
        dtype: torch.dtype) -> torch.Tensor:
    """(a_scale * a) @ (b * b_scale): a (M, K) row-major codes, a_scale (M, 1); b (K, N) column-major, (1, N)."""
    if a.device.type == "cuda":
        return torch_private.scaled_mm(a, b, a_scale, b_scale, dtype)
    return emulated_mm(a, a_scale, b, b_scale, dtype)


def emulated_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """`_mm` in float32 from the dequantised operands (the CPU's path, and the reference the kernels are tested by)."""
    return ((a.float() * a_scale) @ (b.float() * b_scale)).to(dtype)


def _grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows [offsets[e-1], offsets[e]) of a (S, K) times expert e's b (E, K, N) column-major; scales (S,), (E, N)."""
    if a.device.type == "cuda":
        return torch_private.scaled_grouped_mm(a, b, a_scale, b_scale, offsets, dtype)
    return emulated_grouped_mm(a, a_scale, b, b_scale, offsets, dtype)


@torch.compiler.disable  # grouped_mm's compiled form takes bf16 only; the emulation multiplies in float32
def emulated_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                        offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_grouped_mm` in float32 from the dequantised operands."""
    deq_b = b.float() * b_scale[:, None, :]  # (E, K, N)
    return torch.nn.functional.grouped_mm(a.float() * a_scale[:, None], deq_b, offs=offsets).to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes (..., out, in), uint8 bits of e4m3, and row scales (..., out, 1) fp32 -> a new (..., out, in) `dtype`."""
    return codes.view(FP8).to(dtype).mul_(scale)  # e4m3 is exact in bf16; the product is rounded once


class _Fp8Linear(torch.autograd.Function):
    """x @ W.T with x and W in FP8; the backward returns the input gradient only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # x (..., in); codes (out, in) e4m3; scale (out, 1) fp32
        ctx.save_for_backward(codes, scale)
        ctx.dtype = x.dtype
        xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))  # (M, in), (M, 1)
        out = _mm(xq, xs, codes.t(), scale.t(), dtype)  # (M, out)
        return out.view(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        codes, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        g = grad.reshape(-1, grad.shape[-1]).float() * scale.t()  # (M, out): W's row scales onto g's columns
        gq, gs = quantize_rows(g)  # (M, out), (M, 1)
        ones = torch.ones(1, codes.shape[1], dtype=torch.float32, device=codes.device)
        gx = _mm(gq, gs, codes.t().contiguous().t(), ones, ctx.dtype)  # (M, in); codes as a column-major (out, in)
        return gx.view(*grad.shape[:-1], codes.shape[1]), None, None, None


class _Fp8GroupedLinear(torch.autograd.Function):
    """Row s of x times its expert's W_e.T (rows grouped by expert, `offsets`), in FP8; input gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        # x (S, in); codes (E, out, in) e4m3; scale (E, out, 1) fp32; offsets (E,) int32, the end of each expert's rows
        ctx.save_for_backward(codes, scale, offsets)
        ctx.dtype = x.dtype
        xq, xs = quantize_rows(x)  # (S, in), (S, 1)
        return _grouped_mm(xq, xs.view(-1), codes.transpose(-2, -1), scale.squeeze(-1), offsets, dtype)  # (S, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        codes, scale, offsets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        rows = torch.arange(grad.shape[0], device=grad.device, dtype=offsets.dtype)
        expert = torch.searchsorted(offsets, rows, right=True).clamp(max=codes.shape[0] - 1)  # (S,) each row's expert
        g = grad.float() * scale.squeeze(-1)[expert]  # (S, out): each row's expert's row scales on its columns
        gq, gs = quantize_rows(g)  # (S, out), (S, 1)
        ones = torch.ones(codes.shape[0], codes.shape[2], dtype=torch.float32, device=codes.device)  # (E, in)
        weights = codes.transpose(-2, -1).contiguous().transpose(-2, -1)  # (E, out, in) column-major
        return _grouped_mm(gq, gs.view(-1), weights, ones, offsets, ctx.dtype), None, None, None, None  # (S, in)


class Fp8Weight(nn.Module):
    """One frozen weight in FP8: codes (..., out, in) e4m3 and row scales (..., out, 1) fp32, as non-persistent buffers.

    Both are kept as integer bits (`codes` uint8, `scale_bits` int32) and read through dtype views: a cast of the
    whole model to another floating dtype (`model.to(torch.bfloat16)`, DeepSpeed's bf16 module) converts every
    floating buffer, which would turn the codes into numbers and round the scales, and leaves integers alone.
    `transposed` records a weight the model keeps as (..., in, out) (fused experts with `is_transposed`): the codes
    are stored (out, in) either way and `dequantize` gives the model's own layout back. `grouped_fp8`: whether the
    experts forward multiplies by it in FP8 (`grouped`) or dequantises it (`expert_products`, quantization.py).
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, transposed: bool = False, grouped_fp8: bool = True):
        super().__init__()
        self.shape, self.dtype, self.transposed, self.grouped_fp8 = weight.shape, dtype, transposed, grouped_fp8
        self.dequantize_in_backward = True  # quantization.set_expert_backward: False under checkpointing
        codes, scale = quantize_rows(weight.transpose(-2, -1) if transposed else weight)
        self.register_buffer("codes", codes.contiguous().view(torch.uint8), persistent=False)
        self.register_buffer("scale_bits", scale.view(torch.int32), persistent=False)

    @property
    def e4m3(self) -> torch.Tensor:
        """The codes as float8 e4m3, (..., out, in)."""
        return self.codes.view(FP8)

    @property
    def scale(self) -> torch.Tensor:
        """The row scales as float32, (..., out, 1)."""
        return self.scale_bits.view(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """A fresh tensor of `shape` in the compute dtype."""
        weight = dequantize(self.codes, self.scale, self.dtype)
        return weight.transpose(-2, -1) if self.transposed else weight

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows (S, in) grouped by expert (`offsets`, as for grouped_mm) -> (S, out) through this (E, out, in).

        The rows enter in the compute dtype (the kernels write it; the cast's backward returns x's dtype).
        """
        return _Fp8GroupedLinear.apply(x.to(self.dtype), self.e4m3, self.scale, offsets, self.dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return f"shape={tuple(self.shape)}, fp8 e4m3 per-row -> {self.dtype}"


class Fp8Linear(nn.Linear):
    """A frozen `nn.Linear` stored and run in FP8.

    It subclasses `nn.Linear` so PEFT wraps it with its standard LoRA layer (which calls the base layer and reads
    `in_features`, `out_features` and the weight's device and dtype: uint8 keeps PEFT from casting the adapter to it).
    `weight` holds the codes' bits flat, (out * in,) uint8, frozen: the one copy of the codes (a module move moves it
    once), and anything that reads it as an (out, in) float matrix (DoRA's weight norm, PEFT's merge) fails loudly
    instead of computing with codes. The row scales are int32 bits, as in `Fp8Weight`.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, device: torch.device):
        nn.Module.__init__(self)
        # not `compute_dtype`: PEFT casts a new adapter to a base layer's `compute_dtype` (bitsandbytes' attribute)
        self.in_features, self.out_features, self.product_dtype = linear.in_features, linear.out_features, dtype
        codes, scale = quantize_rows(linear.weight.detach().to(device))
        self.weight = nn.Parameter(codes.view(torch.uint8).view(-1), requires_grad=False)
        self.register_buffer("scale_bits", scale.view(torch.int32), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(device, dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def e4m3(self) -> torch.Tensor:
        """The codes as float8 e4m3, (out, in)."""
        return self.weight.view(self.out_features, self.in_features).view(FP8)

    @property
    def scale(self) -> torch.Tensor:
        """The row scales as float32, (out, 1)."""
        return self.scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps x (..., in) to (..., out), computed in the compute dtype and returned in x's.

        As bitsandbytes' 4-bit layer does: a float32 model's attention needs its value projection in float32 too. The
        casts' backward returns x's dtype.
        """
        out = _Fp8Linear.apply(x.to(self.product_dtype), self.e4m3, self.scale, self.product_dtype)  # (..., out)
        return (out if self.bias is None else out + self.bias).to(x.dtype)

    def extra_repr(self) -> str:  # noqa: D102
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row -> "
                f"{self.product_dtype}")


def stored_bytes(numel: int, rows: int) -> int:
    """Device bytes of `numel` weights in FP8 over `rows` output rows: one byte each plus a 4-byte scale per row."""
    return numel + 4 * rows


__all__ = ["ALIGN", "FP8", "FP8_MAX", "Fp8Linear", "Fp8Weight", "check_device", "dequantize", "emulated_grouped_mm",
           "emulated_mm", "quantize_rows", "stored_bytes", "supports"]
