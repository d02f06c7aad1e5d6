"""Per-sample causal attention over packed rows, at a cost linear in the number of samples.

With `speed.packing: true` a micro-batch of B samples becomes one row of their real tokens, with position ids that
restart at every sample. Attention must then stay inside each sample. transformers derives that from the position
ids, but how it does so depends on the attention implementation:

- `sdpa` (the default) builds a dense (N, N) boolean mask over the whole packed row and hands it to SDPA, which
  cannot use its flash kernel with an arbitrary mask. Memory and time grow with the square of the pack, so bigger packs
  run *slower* (bench/train_step.py's packing variants; configs/README.md).
- `flex_attention` builds a block mask and skips the masked blocks (compiled by transformers on first use).
- `flash_attention_2` (the `flash` extra) runs flash-attn's varlen kernel from the position ids.

When packing is on and the configured implementation is `sdpa`, mgmlora loads the model with `PACKED_SDPA` instead:
an attention function registered with transformers' own `AttentionInterface` that

- on a packed row (the caller passes `cu_seq_lens_q` / `max_length_q`, see `varlen_kwargs`) runs PyTorch's own
  variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`, CUDA, bf16/fp16) with no mask at all, or,
  where that kernel is not available (CPU, fp32, an older torch), one causal SDPA call per sample;
- on anything else (unpacked batches, generation with a KV cache) is exactly transformers' `sdpa` function with
  exactly its mask.

Its mask function is transformers' `sdpa_mask`, except for packed rows, where it builds no mask (the attention
function needs none). A packed row is what transformers' mask preparation flags as one: no 2-D padding mask, more than
one query, and the causal-skip shortcut withdrawn because restarting position ids were found. Contract: a packed row
must come with the `varlen_kwargs` of its samples (`mgmlora.models.forward_hidden` and MGM's packed forward pass them);
without them the attention function refuses to guess and raises.

Written here rather than taken as is: PyTorch provides the kernel and transformers the registry, but neither routes
packed rows of an `sdpa` model to the kernel. `eager` has no such path: packing under `eager` keeps the dense mask and
warns (`packed_attention`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mgmlora.errors import UsageError
from mgmlora.models.torch_private import unpadded_inductor_options
from mgmlora.models.transfer import queue_to

log = logging.getLogger(__name__)

PACKED_SDPA = "mgmlora_packed_sdpa"
_LINEAR_IN_PACK = ("flash_attention_2", "flash_attention_3", "flex_attention", PACKED_SDPA)


def _varlen_attn():
    """PyTorch's varlen flash-attention function (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN = _varlen_attn()
_VARLEN_PARAMS = set(inspect.signature(_VARLEN).parameters) if _VARLEN is not None else set()


def varlen_kwargs(lengths: Sequence[int], device: torch.device | str) -> dict:
    """The keyword arguments that mark a packed row: cumulative sample boundaries and the longest sample.

    Uses transformers' own names (`FlashAttentionKwargs`), so `flash_attention_2` reads them too and every
    decoder layer forwards them to its attention function.

    Args:
        lengths: positions of each sample in the packed row, in order (Python ints: no device sync).
        device: where the row lives.
    """
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)  # (S + 1,)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    cu = queue_to(cu, device)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def bucket_padding(n: int, multiple: int) -> int:
    """Positions to append to a packed row of `n` so its length is a multiple of `multiple` (0 when off or exact).

    Why: every new row length costs the GPU path work that does not depend on the data (kernel heuristics per GEMM
    shape, and with `speed.compile` shape guards and dynamic-shape kernels): in the MGM-2B training loop rows of a
    few distinct lengths run faster per micro-batch than realistic rows of hundreds of lengths, though those are
    shorter on average (configs/README.md). The padding is a sample of its own (its own attention segment, labels
    ignored), so it changes no loss and no gradient.
    """
    return (-n) % multiple if multiple > 1 else 0


_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _kernel_ok(query: torch.Tensor) -> bool:
    """Whether PyTorch's varlen flash kernel can take this query (CUDA, half precision, a torch that has it)."""
    return _VARLEN is not None and query.is_cuda and query.dtype in _KERNEL_DTYPES


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(N, H_kv, D) -> (N, H_kv * n_rep, D), each key/value head repeated for its query heads (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
            scale: float | None) -> torch.Tensor:
    """PyTorch's varlen flash kernel, causal within each sample. q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D)."""
    n_rep = q.shape[1] // k.shape[1]
    extra = {}
    if "enable_gqa" in _VARLEN_PARAMS:
        extra["enable_gqa"] = n_rep > 1
    else:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if "window_size" in _VARLEN_PARAMS:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    return _VARLEN(q, k, v, cu, cu, longest, longest, scale=scale, **extra)


def _per_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                scale: float | None) -> torch.Tensor:
    """One causal SDPA call per sample (CPU, fp32, or no varlen kernel). q (N, Hq, D), k/v (N, Hkv, D)."""
    n_rep = q.shape[1] // k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # 4-D, a batch of one: SDPA's fused kernels take only 4-D inputs (3-D ones run its many-operator math path,
        # whose output a selective checkpoint cannot keep, mgmlora.models.recompute)
        qs = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
        ks, vs = (_repeat_kv(t[start:end], n_rep).transpose(0, 1).unsqueeze(0) for t in (k, v))  # (1, Hq, n, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)  # (N, Hq, D)


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers attention function: per-sample causal attention on packed rows, `sdpa` otherwise.

    query (B, Hq, T, D), key/value (B, Hkv, T, D) -> (B, T, Hq, D), as transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if attention_mask is None and query.shape[2] > 1 and _is_packed_row(kwargs.get("position_ids")):
            raise ValueError("a packed row (restarting position ids) reached mgmlora's packed attention without its "
                             "sample boundaries: pass mgmlora.models.attention.varlen_kwargs(lengths) to the model.")
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention takes one packed row without a padding mask (B=1, attention_mask=None).")
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError("packed attention supports neither attention dropout, sliding windows nor soft-capping; set "
                         "model.attn_implementation: flex_attention for this model.")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
    if _kernel_ok(q):
        out = _varlen(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    else:
        out = _per_sample(q, k, v, cu.tolist(), scaling)
    return out.unsqueeze(0), None  # (1, N, Hq, D)


def packed_compile_options(head_dim: int) -> dict[str, bool]:
    """Inductor options for decoder layers that take packed rows, their attention heads `head_dim` wide.

    Inductor's stride padding made PyTorch's varlen op compute wrong values in compiled layers where a head's stride
    over the packed row (tokens x head_dim x 2 bytes) was not a multiple of 128 bytes, which padding would make it
    (`torch_private.unpadded_inductor_options`): such layers compile without padding. A head dimension that is a
    multiple of 64 (Qwen3's 128, Gemma's 256) never gives that stride an unaligned size, so its compile is the
    measured one.
    """
    return {} if head_dim % 64 == 0 else unpadded_inductor_options()


def _is_packed_row(position_ids: torch.Tensor | None) -> bool:
    """Whether the position ids restart inside the row. Only checked on the CPU: on a GPU it would cost a sync."""
    if position_ids is None or position_ids.is_cuda or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())


def packed_sdpa_mask(*, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
                     q_length: int = 0, **kwargs) -> torch.Tensor | None:
    """Transformers mask function: no mask for packed rows (see the module docstring), `sdpa_mask` otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not allow_is_causal_skip and q_length > 1:
        return None
    return sdpa_mask(attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, q_length=q_length,
                     **kwargs)


def register() -> None:
    """Registers `PACKED_SDPA` with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def packed_attention(requested: str, packing: bool) -> str:
    """The attention implementation to load for `requested` (the config's) when micro-batches are `packing`.

    `sdpa` becomes `PACKED_SDPA` (identical on unpacked input); flash-attn and FlexAttention are linear in the pack
    already; `eager` keeps the dense mask, with a warning that says how to avoid it.
    """
    if not packing:
        return requested
    if requested == "sdpa":
        register()
        return PACKED_SDPA
    if requested not in _LINEAR_IN_PACK:
        log.warning("speed.packing with model.attn_implementation=%s attends through a dense (N x N) mask over the "
                    "whole packed row: its cost grows with the square of the pack. Use `sdpa` (mgmlora's per-sample "
                    "kernel), `flex_attention` or `flash_attention_2`.", requested)
    return requested


def check_trains_on(requested: str, device: torch.device) -> None:
    """Refuses, before the model loads, to train with FlexAttention on the CPU, where PyTorch has no backward for it.

    Its forward without gradients runs there (validation, generation); a forward that needs gradients fails with
    PyTorch's own NotImplementedError.

    Raises:
        UsageError: naming the setting and what to set instead.
    """
    if requested == "flex_attention" and device.type == "cpu":
        raise UsageError("model.model.attn_implementation=flex_attention trains on a GPU only (PyTorch's "
                         "FlexAttention has no backward on the CPU); set it to sdpa, packed micro-batches included.")


def describe_packed_attention(args) -> str:
    """What attends over packed rows for `args` (a `ModelArgs`), for the run's log."""
    requested = args.attn_implementation
    if requested != "sdpa":
        return requested + ("" if requested in _LINEAR_IN_PACK else " (dense N x N mask: quadratic in the pack)")
    if _VARLEN is None:
        return f"{PACKED_SDPA} (one causal SDPA call per sample: this torch has no varlen kernel)"
    return f"{PACKED_SDPA} (PyTorch's varlen flash kernel for bf16/fp16 on CUDA, else one causal SDPA call per sample)"


__all__ = ["PACKED_SDPA", "bucket_padding", "check_trains_on", "describe_packed_attention", "packed_attention",
           "packed_compile_options", "packed_sdpa_forward", "register", "varlen_kwargs"]
