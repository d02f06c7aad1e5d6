"""Every private attribute of PyTorch that mgmlora reads or writes, in one place, each with why.

PyTorch offers no public way for these; tests/models/test_torch_private.py fails when a release renames or removes
one, so an upgrade breaks loudly here instead of silently in a benchmark or an estimate.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.profiler import profile


def uncompile(module: nn.Module) -> None:
    """Undoes `module.compile()`: calls run the eager forward again.

    `nn.Module.compile` keeps the compiled call in `_compiled_call_impl` and has no public inverse; the benchmark
    compares compiled and eager variants on one loaded model instead of loading it twice.
    """
    module._compiled_call_impl = None


def trace_through_checkpoint_side_effects() -> None:
    """Lets dynamo compile a checkpointed layer whose forward sets and resets a context variable.

    Newer transformers releases (5.25) checkpoint inside each decoder layer's `forward`, so a compiled layer traces
    `torch.utils.checkpoint` as a higher-order op; and with the `kernels` package (a transformers dependency there)
    every layer's forward sets and resets a context variable around its body. Dynamo refuses a side effect inside the
    checkpoint ("HOP: Unsafe side effect"), breaks the graph, and the layer runs eagerly: `speed.compile` then
    compiles nothing, silently. The set and reset cancel out before the forward returns, so the recompute in the
    backward needs neither: dynamo's own switch for that case (process-wide, read when a call is first traced).
    """
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def dynamo_counts() -> tuple[int, dict[str, int]]:
    """(graphs dynamo has compiled in this process, graph-break reasons with their counts), from dynamo's counters.

    torch.compile compiles lazily and falls back to eager code silently where it cannot trace; its public surface
    (`torch._dynamo.explain`) runs a separate trace, while the counters say what the real run compiled.
    """
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """`torch._scaled_mm` with row-wise scales: a (M, K) row-major e4m3, b (K, N) column-major, scales (M, 1), (1, N).

    The public `torch.nn.functional.scaled_mm` (torch 2.10+) calls `_scaled_mm_v2`, which inductor does not lower
    (it runs as an opaque extern call, no autotuning); `_scaled_mm` is the form torch.compile and torchao use.
    """
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=dtype)


def scaled_grouped_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                      offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`torch._scaled_grouped_mm` of 2-D rows by 3-D experts: a (S, K), b (E, K, N) column-major, scales (S,), (E, N).

    The public `torch.nn.functional.scaled_grouped_mm` calls `_scaled_grouped_mm_v2`, which has no meta function in
    torch 2.11 (the GPU image's), so torch.compile cannot trace it; `_scaled_grouped_mm` has one and an inductor
    lowering (torchao's MoE training calls it too).
    """
    return torch._scaled_grouped_mm(a, b, a_scale, b_scale, offs=offsets, out_dtype=dtype)


def allocation_events(prof: profile) -> Iterator[tuple[int, int]]:
    """(start time in ns, bytes) of every allocation (positive) and free (negative) a `profile_memory` run recorded.

    The public `prof.events()` attributes memory to operators (net per op), which loses the moment of the peak; the
    raw timeline is only on the profiler's kineto results.
    """
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":
            yield event.start_ns(), event.nbytes()


def stack_config() -> torch._C._profiler._ExperimentalConfig:
    """The profiler setting under which `with_stack=True` records each operator's Python stack.

    Without it, recent PyTorch records empty stacks; the loop profile (bench/loop_timing.py) uses the stacks to name
    the line behind each host wait.
    """
    return torch._C._profiler._ExperimentalConfig(verbose=True)


def grouped_gemm_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The aten operators the grouped expert GEMMs dispatch to: `grouped_mm`'s and `_scaled_grouped_mm`'s.

    A selective-checkpointing policy (mgmlora.models.recompute) sees operators at the aten level, below
    `torch.nn.functional.grouped_mm`, whose implementation is `aten._grouped_mm`.
    """
    return torch.ops.aten._grouped_mm.default, torch.ops.aten._scaled_grouped_mm.default


def unpadded_inductor_options() -> dict[str, bool]:
    """Inductor options (torch.compile's `options`) that turn its comprehensive stride padding off.

    Inductor pads the strides of buffers it lays out to a multiple of 128 bytes where a stride is large and unaligned
    (`comprehensive_padding`). With that padding, PyTorch 2.11's varlen attention op (`torch_attn._varlen_attn`, which
    mgmlora's packed attention calls) returned wrong values in compiled layers (NaN, or losses that changed between
    identical calls) on packed rows whose per-head stride, tokens x head_dim x 2 bytes, is not a multiple of 128
    bytes; without it, the compiled layers matched the eager ones (bench/results/
    2026-12-06-packed_compile_padding-h100.json). Head dimensions that are multiples of 64 never pad that stride.
    """
    return {"comprehensive_padding": False}


def attention_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The operators one call of which is a whole attention kernel, as a selective-checkpointing policy sees them.

    SDPA's fused kernels (`aten._scaled_dot_product_*`: flash, memory-efficient, cuDNN, and the CPU's flash) and the
    variable-length op `torch.nn.attention.varlen.varlen_attn` dispatches to (`torch_attn._varlen_attn`, a private
    custom op registered when that module is imported; mgmlora's packed attention calls it, mgmlora.models.attention).
    SDPA's math fallback is many small operators and is not among them. mgmlora.models.recompute keeps their outputs.
    """
    aten = torch.ops.aten
    ops = [aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default]
    try:
        importlib.import_module("torch.nn.attention.varlen")  # registers torch_attn._varlen_attn (torch >= 2.10)
    except ImportError:
        return tuple(ops)
    return (*ops, torch.ops.torch_attn._varlen_attn.default)


__all__ = ["allocation_events", "attention_ops", "dynamo_counts", "grouped_gemm_ops", "scaled_grouped_mm", "scaled_mm",
           "stack_config", "trace_through_checkpoint_side_effects", "uncompile", "unpadded_inductor_options"]
