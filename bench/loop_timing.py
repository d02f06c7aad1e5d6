"""How much of the real `fit` loop's time the GPU spends inside micro-batches: the loop-overhead figure.

bench/fit_smoke.py adds `MicroBatchTiming` to every run it measures. CUDA events are recorded on the compute stream at
`on_train_batch_start` (the batch is fetched, not yet moved or run) and at `on_train_batch_end` (its forward, backward
and, at the end of a window, the optimizer step are queued). Read on the GPU's clock after the run:

- `in_batch_s`: the sum over micro-batches of end - start: what an isolated step of the same shapes costs (its
  kernels plus any launch gaps inside it);
- `span_s`: from the first measured micro-batch's start to the last one's end;
- `loop_overhead` = 1 - in_batch_s / span_s: the share of the loop's time between micro-batches (data loading,
  host-to-device copies, Lightning's and DeepSpeed's per-batch hooks, logging). `in_batch_tokens_per_s` is the speed
  the loop would run at without it, at the loop's own shapes.

The first `skip_steps` optimizer steps are left out (compilation and allocator warm-up). No synchronisation happens
during the run, so measuring does not slow it down; events are read once at the end.
"""

from __future__ import annotations

import lightning as L
import torch


class MicroBatchTiming(L.Callback):
    """Records one CUDA event pair per micro-batch after the first `skip_steps` optimizer steps."""

    def __init__(self, skip_steps: int = 2):
        self.skip_steps = skip_steps
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._start = None
        if torch.cuda.is_available() and trainer.global_step >= self.skip_steps:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
            self._start = None

    def summary(self, tokens: float | None = None) -> dict:
        """The figures above (seconds, shares); `tokens` (positions in the measured micro-batches) adds tokens/s."""
        if not self.events:
            return {"loop_overhead": None, "measured_micro_batches": 0}
        torch.cuda.synchronize()
        in_batch = sum(start.elapsed_time(end) for start, end in self.events) / 1e3
        span = self.events[0][0].elapsed_time(self.events[-1][1]) / 1e3
        result = {"measured_micro_batches": len(self.events), "skipped_optimizer_steps": self.skip_steps,
                  "in_batch_s": round(in_batch, 3), "span_s": round(span, 3),
                  "loop_overhead": round(1 - in_batch / span, 4)}
        if tokens:
            result |= {"loop_tokens_per_s": round(tokens / span, 1),
                       "in_batch_tokens_per_s": round(tokens / in_batch, 1)}
        return result
