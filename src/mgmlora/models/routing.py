"""An MoE layer's token permutation as gathers both ways: into expert order and back, no scatters of rows.

`mgmlora.models.experts.fast_experts_forward` sorts the T * k (token, slot) pairs of a layer by expert so that the
grouped GEMMs see each expert's rows together, then brings the rows back and sums each token's k of them. Written
with plain indexing, autograd turns that into scatters: the forward's way back is an `index_copy` into token order
followed by the sum over k, and the backward of the first gather is an accumulating `index_put` (atomic adds, one per
routed copy of a token). configs/README.md ("Which compiled kernels") has the share of the Qwen3-30B-A3B FP8 step's
device time that the permutation around the grouped GEMMs takes.

Both directions here are gathers of whole rows, and each is the other's backward (`route` scatters only the (S,)
int64 positions, to invert the permutation):
- `to_expert_order`: (T, H) -> (S, H), row s is token `token[s]`; its backward sums each token's k rows by gathering
  them through the inverse permutation (no atomics, a reduction inductor fuses with the gather);
- `from_expert_order`: (S, H) -> (T, H), each token's k rows gathered through the inverse permutation and summed (no
  token-order copy in between); its backward is the first gather.
Same values and gradients as the indexing form (tests/models/test_routing.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Route(NamedTuple):
    """Where each routed row goes, from `order` (S,): the (token, slot) pair of each row in expert order, S = T * k."""

    token: torch.Tensor  # (S,) the token of each row in expert order
    inverse: torch.Tensor  # (S,) the expert-order row of each (token, slot) pair, token-major
    k: int


def route(order: torch.Tensor, k: int) -> Route:
    """The route of `order` (S,), the permutation that sorts the token-major (T * k) pairs by expert."""
    positions = torch.arange(order.numel(), device=order.device, dtype=order.dtype)  # (S,)
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # (S,) inverse[order[s]] = s
    return Route(order // k, inverse, k)


def _gather_sum(rows: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """(S, H) rows in expert order -> (T, H): each token's k rows, gathered and summed.

    Compiled, the sum is written as k - 1 additions of (T, H) slices rather than a reduction over k: inductor makes the
    reduction a kernel whose neighbouring threads read the k rows of one column (one element from each of k places),
    which reads memory far below its bandwidth (the FP8 step profile, configs/README.md), and the additions one
    element-wise kernel whose neighbouring threads read along a row. Both add in float32 (float64 inputs in float64)
    and round once.
    """
    picked = rows[inverse].view(-1, k, rows.shape[-1])  # (T, k, H)
    if not torch.compiler.is_compiling():
        return picked.sum(1)  # (T, H)
    accumulate = torch.promote_types(rows.dtype, torch.float32)  # float64 stays float64, as in the eager sum
    total = picked[:, 0].to(accumulate)  # (T, H)
    for j in range(1, k):
        total = total + picked[:, j].to(accumulate)
    return total.to(rows.dtype)


class _ToExpertOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[token]  # (S, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _gather_sum(grad, inverse, ctx.k), None, None, None  # (T, H)


class _FromExpertOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(token)
        return _gather_sum(rows, inverse, k)  # (T, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (token,) = ctx.saved_tensors
        return grad[token], None, None, None  # (S, H)


def to_expert_order(x: torch.Tensor, r: Route) -> torch.Tensor:
    """(T, H) tokens -> (S, H) their routed copies in expert order."""
    return _ToExpertOrder.apply(x, r.token, r.inverse, r.k)


def from_expert_order(rows: torch.Tensor, r: Route) -> torch.Tensor:
    """(S, H) rows in expert order -> (T, H): the sum of each token's k rows."""
    return _FromExpertOrder.apply(rows, r.token, r.inverse, r.k)
