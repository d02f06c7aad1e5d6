"""The accumulation window: the one owner of loss normalisation and of "does the optimizer step now?".

The gradient of one optimizer step is d/dθ [ Σ token losses over the window, on all ranks ] / N_window, where
N_window is the number of supervised tokens in that window (after the causal shift), counted by the
WindowBatchSampler before the window's first backward pass and carried by every `Batch` of the window. Each
micro-batch returns loss_sum * A * W / N_window:

- plain Lightning and DDP: Lightning divides the returned loss by A (accumulate_grad_batches) and DDP averages
  gradients over the W ranks, which cancels both factors;
- DeepSpeed: Lightning divides by A too, and `MgmDeepSpeedStrategy` turns DeepSpeed's own division by A off
  (mgmlora.training.strategies), so the same scale holds; DeepSpeed averages over ranks like DDP.

So the scale is the same for every strategy, and it lives here only. Where a window ends is decided once, by the
sampler (`Batch.window_end`); loaders without a window sampler fall back to Lightning's counting (every A
micro-batches and at the epoch's last one) and to a mean of per-micro-batch token means (each micro-batch then stands
for 1/A of the window).
"""

from __future__ import annotations

import torch

from mgmlora.batch import Batch


class AccumulationWindow:
    """Scales each micro-batch's loss for the window and keeps the window's loss for logging.

    The LightningModule owns one; callbacks read `ended` (whether the micro-batch that just ran closed its window)
    instead of asking Lightning's loop.
    """

    def __init__(self) -> None:
        self.loss: torch.Tensor | float = 0.0  # Σ token losses so far in this window (this rank), on the device
        self.tokens: torch.Tensor | int = 0  # supervised tokens so far in this window (this rank)
        self.ended = False  # the latest micro-batch was its window's last: the optimizer steps after it

    def scaled(self, batch: Batch, loss_sum: torch.Tensor, n_tokens: torch.Tensor, batch_idx: int, accumulate: int,
               world_size: int, epoch_batches: int | float) -> torch.Tensor:
        """The loss to return from `training_step` for this micro-batch (see the module docstring).

        Args:
            batch: the micro-batch (its window facts).
            loss_sum: () summed token losses of this micro-batch.
            n_tokens: () its supervised tokens.
            batch_idx: the micro-batch's index in the epoch.
            accumulate: A, micro-batches per optimizer step.
            world_size: W, data-parallel ranks.
            epoch_batches: micro-batches in the epoch (`trainer.num_training_batches`), for the fallback window end.
        """
        if batch.window_tokens is not None:
            window, self.ended = batch.window_tokens, bool(batch.window_end)
        else:  # no window sampler: each micro-batch weighs 1/A of the window
            window = n_tokens * accumulate
            self.ended = (batch_idx + 1) % accumulate == 0 or batch_idx + 1 >= epoch_batches
        self.loss = self.loss + loss_sum.detach()  # tensors: no host sync per micro-batch
        self.tokens = self.tokens + n_tokens
        return loss_sum * (accumulate * world_size / window.clamp(min=1))

    def close(self) -> torch.Tensor:
        """The window's token-mean loss on this rank (fp32), and a fresh window."""
        loss = torch.as_tensor(self.loss, dtype=torch.float32) / max(int(self.tokens), 1)
        self.loss, self.tokens = 0.0, 0
        return loss


def window_offset(trainer) -> int:
    """Micro-batches of the current epoch trained since the last optimizer step (0 at a window boundary).

    Windows start at every multiple of `accumulate_grad_batches` within an epoch; an epoch's last micro-batch always
    ends its window (Lightning steps there, or, under DeepSpeed, the sampler yields whole windows only). A checkpoint
    taken at a nonzero offset describes its window's start (mgmlora.training.preemption, mgmlora.training.rng).
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch:
        return 0
    return progress.current.processed % trainer.accumulate_grad_batches


__all__ = ["AccumulationWindow", "window_offset"]
