"""The 4-bit NF4 storage format of QLoRA's frozen base: one tensor in, codes and scales out, and back.

The format is bitsandbytes' (`quantize_4bit(..., quant_type="nf4")`): the tensor is flattened and cut into blocks of
64 values; each block is divided by its absolute maximum (`absmax`, fp32) and each value rounded to the nearest of the
16 NF4 code values (normal-distribution quantiles); two 4-bit codes share a byte, the first in the high nibble. With
double quantisation the fp32 absmax are themselves stored in 8 bits: their mean is subtracted (`offset`) and the
remainder is cut into blocks of 256 rounded to bitsandbytes' signed 8-bit "dynamic" code, with one fp32 scale per
block. 4.13 bits per value with double quantisation, 4.5 without.

Two implementations of the same format: bitsandbytes' kernels, which `backend: auto` runs on CUDA where the package is
installed, and the pure-PyTorch one below everywhere else (the CPU, CI, machines without bitsandbytes). The pure one
writes bitsandbytes' 4-bit codes and block scales; only double quantisation's 8-bit absmax codes differ on rare
near-ties (bitsandbytes rounds them in C). tests/models/test_nf4.py compares the two where both run.

Why a codec of its own rather than a library's alone (bench/nf4_cpu.py, bench/results/2026-12-04-nf4_cpu-dev.json):
- torchao's NF4Tensor stores 2-D tensors only (not the fused 3-D experts), needs a multiple of 64 x 256 values (so no
  tiny test model) and keeps its own int8 scalers, not bitsandbytes' format.
- bitsandbytes' CPU backend writes the same codes and dequantises far faster, but it does not serve: its
  `dequantize_4bit` returns wrong values for some tensors whose last dimension is not a multiple of the 64-value
  block (e.g. (64, 32) and (32, 96): its own round trip, from the same codes), which tiny test models and some
  expert shapes have;
  it is a large optional install (CUDA and ROCm libraries included) that CI does not have; and on CPUs with
  AVX512-bf16 importing it tries to fetch a kernel from the Hugging Face Hub, which a tool that never downloads at
  run time must not do. So `backend: auto` runs bitsandbytes on CUDA only (mgmlora.models.quantization).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

import torch

BLOCK = 64  # values per absmax block (bitsandbytes' default for 4-bit)
ABSMAX_BLOCK = 256  # absmax values per block of the double quantisation
Backend = Literal["bitsandbytes", "torch"]

# the 16 NF4 code values, sorted (index = code); QLoRA paper, appendix E
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def bitsandbytes_available() -> bool:
    """Whether the bitsandbytes package is importable (the `qlora` extra)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def dynamic_code() -> torch.Tensor:
    """Bitsandbytes' signed 8-bit dynamic code (256 sorted values in [-1, 1]), which double quantisation rounds to.

    Each exponent 10^-6 .. 10^0 gets a run of evenly spaced fractions in [0.1, 1] (midpoints), both signs, plus 0 and
    1: the same construction as `bitsandbytes.functional.create_dynamic_map(signed=True)`.
    """
    values: list[float] = []
    for i in range(7):  # exponent bits 0..6; 2**i + 1 boundaries -> 2**i fractions per sign
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _codes_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 code, dynamic code) on `device`, made once: no host-to-device copy per dequantised layer."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device), dynamic_code().to(device)


@dataclass
class Nf4Tensor:
    """One frozen tensor in NF4: what the base model keeps instead of its bf16 weight.

    Attributes:
        codes: (ceil(n / 2),) uint8, two 4-bit codes per byte.
        absmax: (ceil(n / 64),) fp32 block scales, or uint8 codes of them when double-quantised.
        shape: the original tensor's shape.
        dtype: the dtype `dequantize` returns (the compute dtype).
        absmax_scale: double quantisation only: (ceil(blocks / 256),) fp32 scales of the absmax blocks.
        absmax_offset: double quantisation only: () fp32 mean subtracted from the absmax before quantising them.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (codes and scales)."""
        parts = (self.codes, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> Nf4Tensor:
        """The same codes on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Nf4Tensor(move(self.codes), move(self.absmax), self.shape, self.dtype, move(self.absmax_scale),
                         move(self.absmax_offset))


def _blockwise(values: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (n,) int64 indices into sorted `code`, (ceil(n / block),) fp32 absmax per block."""
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, -n % block)).view(-1, block)  # zeros never raise a block's absmax
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    safe = absmax.clamp(min=1e-38)
    scaled = padded * (1.0 / safe)[:, None]
    if n % block:  # bitsandbytes divides a trailing partial block instead of multiplying by the reciprocal
        scaled[-1] = padded[-1] / safe[-1]
    scaled = scaled.clamp(-1, 1).view(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints), absmax


def _unblock(indices: torch.Tensor, absmax: torch.Tensor, block: int, code: torch.Tensor) -> torch.Tensor:
    """Inverse of `_blockwise`: (n,) fp32 values."""
    n = indices.numel()
    values = torch.nn.functional.pad(code[indices], (0, -n % block)).view(-1, block) * absmax[:, None]
    return values.view(-1)[:n]


def quantize(weight: torch.Tensor, double_quant: bool, dtype: torch.dtype, backend: Backend) -> Nf4Tensor:
    """`weight` (any shape, floating) in NF4 on its own device; `dtype` is what dequantising will return."""
    if backend == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        codes, state = bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCK, quant_type="nf4",
                                          compress_statistics=double_quant)
        if double_quant:
            return Nf4Tensor(codes.view(-1), state.absmax, weight.shape, dtype, state.state2.absmax,
                             torch.as_tensor(state.offset, dtype=torch.float32, device=weight.device))
        return Nf4Tensor(codes.view(-1), state.absmax.float(), weight.shape, dtype)
    flat = weight.detach().reshape(-1).float()
    nf4_code, dyn_code = _codes_on(flat.device)
    indices, absmax = _blockwise(flat, BLOCK, nf4_code)
    indices = torch.nn.functional.pad(indices, (0, indices.numel() % 2), value=7)  # odd length: pad with code 0.0
    pairs = indices.to(torch.uint8).view(-1, 2)
    codes = (pairs[:, 0] << 4) | pairs[:, 1]  # (ceil(n / 2),)
    if not double_quant:
        return Nf4Tensor(codes, absmax, weight.shape, dtype)
    offset = absmax.mean()
    absmax_codes, absmax_scale = _blockwise(absmax - offset, ABSMAX_BLOCK, dyn_code)
    return Nf4Tensor(codes, absmax_codes.to(torch.uint8), weight.shape, dtype, absmax_scale, offset)


def dequantize(q: Nf4Tensor, backend: Backend) -> torch.Tensor:
    """The tensor `q` stores, in `q.dtype`, allocated fresh (one layer's weights at a time, never cached)."""
    nf4_code, dyn_code = _codes_on(q.codes.device)
    if backend == "bitsandbytes":
        ops = torch.ops.bitsandbytes
        absmax = q.absmax
        if q.absmax_scale is not None:
            absmax = ops.dequantize_blockwise(q.absmax, q.absmax_scale, dyn_code, ABSMAX_BLOCK,
                                              torch.float32) + q.absmax_offset
        return ops.dequantize_4bit(q.codes, absmax, BLOCK, "nf4", list(q.shape), q.dtype)
    absmax = q.absmax
    if q.absmax_scale is not None:
        absmax = _unblock(q.absmax.long(), q.absmax_scale, ABSMAX_BLOCK, dyn_code) + q.absmax_offset
    n = q.shape.numel()
    indices = torch.stack((q.codes >> 4, q.codes & 0xF), dim=1).view(-1)[:n].long()  # (n,)
    return _unblock(indices, absmax, BLOCK, nf4_code).view(q.shape).to(q.dtype)


__all__ = ["ABSMAX_BLOCK", "BLOCK", "Backend", "NF4_CODE", "Nf4Tensor", "bitsandbytes_available", "dequantize",
           "dynamic_code", "quantize"]
