"""The training progress bar: one bar for the whole fit, counting optimizer steps against the run's real total.

Lightning's own bars count micro-batches but take their total from `max_steps` (optimizer steps) when
`max_epochs: -1`, so with gradient accumulation the counter ran past it (`24/12`), restarted every epoch, and the
epoch read `Epoch 1/-2`. Here the counter is `trainer.global_step` (optimizer steps done, resumed runs included) and
the total is `trainer.estimated_stepping_batches` (Lightning's count of optimizer steps for the whole fit, from
max_steps, max_epochs, the batches per epoch and accumulate_grad_batches), so the bar reads e.g.
`Epoch 2: 45%|███   | 54/120 steps`. The epoch shows alone when the run is bounded by steps (`max_epochs: -1`) and as
`Epoch 2/3` (1-based) when it is bounded by epochs. Validation bars are Lightning's (they count batches, whose total
is right). mgmlora.cli adds this bar to every run that has a progress bar, unless the config names its own.

When standard output is not a terminal (a log file, a scheduler's capture, a pipe), a redrawn bar leaves carriage
returns and cursor codes in the file; `progress_callback` then gives `LineProgress` instead: one plain line per
`log_every_n_steps` optimizer steps and one per validation, nothing redrawn.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """TQDMProgressBar counting optimizer steps (see the module docstring)."""

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    @property
    def total_train_batches(self) -> int | float:
        """Optimizer steps of the whole fit (inf when neither max_steps nor max_epochs bounds it)."""
        return self.trainer.estimated_stepping_batches

    def epoch_description(self) -> str:
        """`Epoch N` (1-based), with `/M` only when max_epochs bounds the run."""
        epoch = self.trainer.current_epoch + 1
        max_epochs = self.trainer.max_epochs
        return f"Epoch {epoch}/{max_epochs}" if max_epochs is not None and max_epochs > 0 else f"Epoch {epoch}"

    def _show(self, n: int) -> None:
        bar = self.train_progress_bar
        if bar.total is not None and n > bar.total:  # never claim more than the total (an estimate fell short)
            bar.total = n
        bar.n = n
        bar.refresh()

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar, created with the fit's step total, the resumed step and `step` as its unit."""
        total = self.total_train_batches
        return Tqdm(desc=self.epoch_description(), total=None if math.isinf(total) else total,
                    initial=self.trainer.global_step, unit="step", position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:  # noqa: D102
        # one bar for the whole fit: a new epoch only changes the label (Lightning's bar resets to 0 here)
        self.train_progress_bar.set_description(self.epoch_description(), refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        n = trainer.global_step
        if n != self.train_progress_bar.n and self._should_update(n, self.train_progress_bar.total or n):
            self._show(n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if not self.train_progress_bar.disable:
            self._show(trainer.global_step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class LineProgress(ProgressBar):
    """Progress as plain lines for non-terminals: `Epoch 2 | step 54/120 | <metrics> | 3.21 s/step`."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._last: tuple[int, float] | None = None  # (step, time) of the last line, for the step time

    def disable(self) -> None:  # noqa: D102
        self._enabled = False

    def enable(self) -> None:  # noqa: D102
        self._enabled = True

    def _line(self, trainer, pl_module, prefix: str) -> None:
        total = trainer.estimated_stepping_batches
        step, now = trainer.global_step, time.perf_counter()
        parts = [prefix, f"step {step}" + ("" if math.isinf(total) else f"/{int(total)}")]
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        if self._last is not None and step > self._last[0]:
            parts.append(f"{(now - self._last[1]) / (step - self._last[0]):.2f} s/step")
        self._last = (step, now)
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def on_train_start(self, trainer, *_: Any) -> None:  # noqa: D102
        self._last = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        step = trainer.global_step
        every = max(1, trainer.log_every_n_steps)
        if self._enabled and trainer.is_global_zero and step != self._last[0] and (
                step % every == 0 or step == trainer.estimated_stepping_batches):
            epoch = trainer.current_epoch + 1
            self._line(trainer, pl_module, f"Epoch {epoch}")

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking and trainer.state.fn == "fit":
            last = self._last
            self._line(trainer, pl_module, "validation")
            self._last = last  # validation time is not step time


def progress_callback() -> ProgressBar:
    """The bar for a terminal, plain lines for anything else (files, pipes, schedulers' logs)."""
    return StepProgressBar() if sys.stdout.isatty() else LineProgress()
