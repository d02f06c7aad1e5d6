"""The training loss without full-vocabulary logits, and padding-free micro-batches.

Two costs of the plain transformers path that do not change what is learned:

- The LM head runs on every position and the loss upcasts the (B, T, V) logits to fp32. For Gemma's 256k vocabulary
  and 2048 positions that is 2 GiB of fp32 logits plus their gradient, the largest single block of LoRA peak memory
  (docs/design/gpu.md), while only the supervised answer positions carry a loss. `loss: chunked` selects the
  supervised positions first and runs head + cross-entropy over them in chunks whose logits are recomputed in the
  backward pass (activation checkpointing per chunk), so at most `chunk x V` logits exist at once. `loss: compiled`
  is `chunked` with each chunk's head + cross-entropy compiled by torch.compile: the fp32 upcast, log-softmax and
  target pick become fused reductions over the logits instead of full-size fp32 copies and passes, forward and
  backward (compiled in the first steps: after a chunk of a second size dynamo compiles one graph for any size, and a
  one-position chunk apart; evaluation, without gradients, runs the chunks uncompiled). `loss: liger` does the same
  with Liger-Kernel's fused Triton kernel (CUDA, optional extra). `loss: full` is the plain path, kept as the
  reference the tests compare against. All four give the same sum up to float summation order.
- Padding. A micro-batch of B samples padded to the longest computes attention and MLPs on pad positions.
  `packing: true` removes the padding on the GPU: the B rows become one row of their real tokens, with position ids
  restarting at each sample, which transformers turns into a block-diagonal (per-sample) causal mask. The window
  normalisation is untouched: the supervised tokens are the same ones.

Written here rather than taken from a library where no library fits: transformers 5 has no chunked loss
(`ForCausalLMLoss` upcasts the full logits), and Liger needs Triton/CUDA, so the chunked path is also the CPU path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mgmlora.batch import IGNORE_INDEX
from mgmlora.errors import SettingsError
from mgmlora.models.recompute import KeptOutputs
from mgmlora.models.torch_private import dynamo_counts
from mgmlora.models.transfer import queue_to

LossImpl = Literal["full", "chunked", "compiled", "liger"]


@dataclass
class SpeedArgs:
    """How the loss and the micro-batches are computed (each switch measured on its own in bench/train_step.py).

    Attributes:
        loss: `chunked` (LM head + cross-entropy only on supervised positions, in checkpointed chunks; the default),
            `compiled` (the same, each chunk compiled by torch.compile: fused reductions instead of fp32 copies of
            the logits; needs what torch.compile needs, a C++ compiler on the CPU, Triton on CUDA; under DeepSpeed
            ZeRO-3 the head's parameter hooks split the compiled graph: the same result, its speed not measured),
            `liger` (Liger-Kernel's fused linear cross-entropy; CUDA and the `liger` extra) or `full` (the plain path:
            full-vocabulary logits at every position).
        loss_chunk_size: supervised positions per chunk for `chunked` and `compiled`; the logits of one chunk are
            `loss_chunk_size x vocab` floats.
        packing: drop padding inside each micro-batch (one row per micro-batch, per-sample attention through
            position ids). Raise `data.batch_size` with it: padding no longer costs compute.
        peft_input_cast: keep PEFT's cast of each LoRA layer's input to the adapter dtype. `false` skips it where that
            is bit-identical (bf16 autocast, DeepSpeed bf16 or fp32 models; LoRA layers without dropout): two
            activation-sized copies per adapted projection fewer (mgmlora.training.fastpath).
        compile: torch.compile the family's regions (`LoadedModel.compile`: each decoder layer, and MGM's image path;
            regional compilation; compiled during the first steps). Fuses the element-wise work that dominates small
            micro-batches (mgmlora.training.fastpath).
        pad_to_multiple: with `packing`, pad each packed row to a multiple of this many positions (a trailing segment
            of its own, no loss), so the GPU sees a few distinct shapes instead of one per row length; 0 = off
            (mgmlora.models.attention.bucket_padding).
        expert_lora: how LoRA on fused MoE experts (`lora.target_experts`) runs: `split` (the frozen expert GEMM
            plus two LoRA GEMMs per routed token, compiled with the rest of the layer in bf16; needs
            `model.model.experts_implementation: mgmlora_grouped_mm`, other layers keep PEFT's path; the faster of
            the two where measured, configs/README.md) or `peft` (PEFT's own: W + B A formed for every expert on
            every call; the experts stay eager under `compile`) (mgmlora.training.expert_lora).
        keep_expert_outputs: under gradient checkpointing, which outputs of the frozen MoE expert GEMMs the forward
            keeps for the backward instead of the recompute computing them again: `none` (whole-layer recompute),
            `gate_up` (the gate/up projection's, (tokens x top_k, 2 x expert width) per layer) or `all` (the down
            projection's too; compiled layers that hold their own checkpoint never recompute it, so `all` acts as
            `gate_up` there). Memory for FLOPs, same loss and gradients; needs a MoE model, checkpointing,
            mgmlora's experts forward and split expert LoRA where the experts carry LoRA
            (mgmlora.models.recompute).
        keep_attention_outputs: under gradient checkpointing, the forward keeps each decoder layer's attention kernel
            output (the attended values, (tokens, query heads, head dimension), and their float32 log-sum-exp) for the
            backward, so the recompute computes queries, keys and values but not the attention again. Memory for
            FLOPs, same loss and gradients; needs checkpointing and `model.model.attn_implementation: sdpa`
            (mgmlora.models.recompute).
    """

    loss: LossImpl = "chunked"
    loss_chunk_size: int = 2048
    packing: bool = False
    peft_input_cast: bool = False
    compile: bool = False
    pad_to_multiple: int = 0
    expert_lora: Literal["peft", "split"] = "split"
    keep_expert_outputs: KeptOutputs = "none"
    keep_attention_outputs: bool = False

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1:
            raise SettingsError(f"model.speed.loss_chunk_size must be >= 1 (got {self.loss_chunk_size}).")
        if self.pad_to_multiple < 0 or (self.pad_to_multiple > 1 and not self.packing):
            raise SettingsError(f"model.speed.pad_to_multiple={self.pad_to_multiple}: must be >= 0 and needs "
                                "model.speed.packing: true (the padding is a segment of the packed row).")


def check_available(speed: SpeedArgs) -> None:
    """Fails before any model is loaded when the configured loss needs a package that is not installed.

    Checked when a run starts, not when the config is parsed, so the estimator and the sample viewer still read a
    Liger config on a machine without Liger.
    """
    if speed.loss == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise SettingsError("model.speed.loss=liger needs Liger-Kernel (pip install 'mgmlora[liger]', CUDA only); "
                            "use `chunked` otherwise (same result, pure PyTorch).")
    if speed.loss == "compiled" and not compile_backend_found():
        compiler = os.environ.get("CXX", "g++")
        raise SettingsError("model.speed.loss=compiled needs torch.compile's inductor backend: Triton on CUDA, a C++ "
                            f"compiler on the CPU ({compiler}, or $CXX), and none was found; use `chunked` (same "
                            "result, not compiled).")


def compile_backend_found() -> bool:
    """Whether inductor can generate code here: Triton where CUDA is available, else a C++ compiler (`$CXX`, g++)."""
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return shutil.which(os.environ.get("CXX", "g++")) is not None


@dataclass
class LossOut:
    """Summed token losses over supervised positions, their count, and (evaluation only) predictions and targets."""

    loss_sum: torch.Tensor  # () fp32
    n_tokens: torch.Tensor  # () long
    preds: torch.Tensor | None = None  # (N,) argmax at the N supervised positions
    targets: torch.Tensor | None = None  # (N,)


def _chunk_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 cross-entropy for one chunk: hidden (n, H), targets (n,)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class CompiledChunkLoss:
    """`_chunk_loss` compiled (`loss: compiled`), counting the graphs and graph breaks its compiles add.

    The counts (of every instance, `compiled_loss_counts`) let `speed.compile`'s check
    (mgmlora.training.fastpath.CompileWatch), which reads dynamo's process-wide counters, leave the loss's graphs out:
    a model whose layers compiled nothing still says so.
    """

    graphs = 0  # class-wide: what every instance's compiles added
    breaks: Counter[str] = Counter()

    def __init__(self, backend: str = "inductor") -> None:
        self.fn = torch.compile(_chunk_loss, backend=backend)

    def __call__(self, hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        """`_chunk_loss(hidden, head, targets)`, compiled; adds what this call compiled to the class-wide counts."""
        before = dynamo_counts()
        try:
            return self.fn(hidden, head, targets)
        finally:
            graphs, breaks = dynamo_counts_added(before, dynamo_counts())
            CompiledChunkLoss.graphs += graphs
            CompiledChunkLoss.breaks.update(breaks)


def dynamo_counts_added(before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]
                        ) -> tuple[int, dict[str, int]]:
    """What dynamo compiled between two `dynamo_counts()`: graphs added, and each break reason seen more often."""
    breaks = {reason: n - before[1].get(reason, 0) for reason, n in after[1].items() if n > before[1].get(reason, 0)}
    return after[0] - before[0], breaks


@functools.cache
def compiled_chunk_loss() -> CompiledChunkLoss:
    """The process's compiled chunk loss, made on first use: importing torch.compile's machinery costs time."""
    return CompiledChunkLoss()


def compiled_loss_counts() -> tuple[int, dict[str, int]]:
    """(graphs, graph-break reasons with their counts) that compiled chunk losses added to dynamo's counters so far."""
    return CompiledChunkLoss.graphs, dict(CompiledChunkLoss.breaks)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, impl: LossImpl, chunk_size: int,
            with_preds: bool = False, host_labels: torch.Tensor | None = None) -> LossOut:
    """Next-token cross-entropy summed over supervised positions.

    Args:
        hidden: final hidden states (B, T, H), before the LM head.
        labels: (B, T) token ids, IGNORE_INDEX where nothing is supervised. Position t predicts labels[t + 1].
        head: the LM head module (called as a module so DeepSpeed ZeRO-3 gathers its weight, also in recomputation).
        impl: `full`, `chunked`, `compiled` or `liger` (see SpeedArgs).
        chunk_size: supervised positions per chunk (`chunked`, `compiled`).
        with_preds: also return argmax predictions at the supervised positions (evaluation).
        host_labels: `labels` on the CPU, where the forward knows them (`Forward.host_labels`): `chunked` and `liger`
            then select the supervised positions from them, so the number of positions is known without a device
            sync and the host keeps queueing work while the GPU computes (Liger's kernel still reads its own count
            of targets once); `compiled` likewise.
    """
    targets = labels[:, 1:]  # (B, T-1)
    if impl == "full":
        logits = head(hidden[:, :-1])  # (B, T-1, V)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        keep = targets != IGNORE_INDEX
        preds = logits.argmax(-1)[keep] if with_preds else None
        return LossOut(loss_sum, keep.sum(), preds, targets[keep] if with_preds else None)
    if host_labels is None:
        keep = targets != IGNORE_INDEX  # (B, T-1)
        h = hidden[:, :-1][keep]  # (N, H): only supervised positions reach the head
        y = targets[keep]  # (N,)
        n = keep.sum()
    else:
        h, y, n = _supervised(hidden, host_labels)
    if h.shape[0] == 0:
        return LossOut(hidden.sum() * 0.0, n, y if with_preds else None, y if with_preds else None)
    if impl == "liger":
        if not isinstance(head, nn.Linear):
            raise ValueError("speed.loss=liger needs a plain linear LM head; this model transforms its logits after "
                             "the head (soft-capping or scaling): use speed.loss=chunked.")
        loss_sum = _liger_loss(h, head, y)
        preds = torch.cat([head(h[s:s + chunk_size]).argmax(-1) for s in range(0, len(y), chunk_size)]) \
            if with_preds else None
        return LossOut(loss_sum, n, preds, y if with_preds else None)
    parts, preds = [], []
    chunk_loss = compiled_chunk_loss() if impl == "compiled" else _chunk_loss
    for s in range(0, h.shape[0], chunk_size):
        h_c, y_c = h[s:s + chunk_size], y[s:s + chunk_size]
        if torch.is_grad_enabled() and h_c.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping them: memory chunk x V, not N x V.
            parts.append(checkpoint(chunk_loss, h_c, head, y_c, use_reentrant=False))
        else:
            logits = head(h_c)  # (n, V)
            parts.append(F.cross_entropy(logits.float(), y_c, reduction="sum"))
            if with_preds:
                preds.append(logits.argmax(-1))
    loss_sum = torch.stack(parts).sum()
    if with_preds and not preds:
        with torch.no_grad():
            preds = [head(h[s:s + chunk_size]).argmax(-1) for s in range(0, h.shape[0], chunk_size)]
    return LossOut(loss_sum, n, torch.cat(preds) if with_preds else None, y if with_preds else None)


def _supervised(hidden: torch.Tensor, host_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states (B, T, H) at the supervised positions (N, H), their targets (N,) and N, from CPU labels.

    The same rows, in the same order, as boolean indexing with the labels on the device, which waits for the GPU to
    count them.
    """
    targets = host_labels[:, 1:]  # (B, T-1)
    where = (targets != IGNORE_INDEX).nonzero()  # (N, 2): sample, position
    flat = where[:, 0] * hidden.shape[1] + where[:, 1]  # (N,) row of hidden.flatten(0, 1)
    h = hidden.flatten(0, 1).index_select(0, queue_to(flat, hidden.device))  # (N, H)
    y = queue_to(targets[where[:, 0], where[:, 1]], hidden.device)  # (N,)
    return h, y, torch.full((), len(flat), dtype=torch.long, device=hidden.device)


def _liger_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Liger-Kernel's fused linear + cross-entropy (fp32 accumulation; never materialises the logits)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight = head.weight
    bias = getattr(head, "bias", None)
    if hasattr(weight, "ds_id"):  # ZeRO-3: the frozen head is partitioned; gather it for the fused kernel
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight] + ([bias] if bias is not None else [])):
            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
