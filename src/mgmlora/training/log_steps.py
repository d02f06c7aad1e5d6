"""One step label for everything a run logs: the number of optimizer steps done, as checkpoint names count them.

Lightning labels the metrics it logs during fit with its count of batches that stepped *and have ended*
(mgmlora.training.lightning_private.logging_step). That count trails `trainer.global_step` by one from optimizer
step N until the end of its batch, so the loss of step N, the validation after it and the learning rate step N used
went to TensorBoard at N - 1, while the checkpoint written after step N is `step=N` and GenerationEval's table and
images said N. `StepLabels` (installed by mgmlora.cli) relabels Lightning's metrics to N; `run_step` is the step
mgmlora's own events use. So every event of one optimizer step carries the same step:

- train/*, perf/* and the learning rate of optimizer step N, and `epoch`: N;
- val/*, val_gen/* and the sample table and images of the validation after step N: N (`step=N` checkpoints);
- what is logged once at the start of fit (params/*, the LoRA report, hparams): the step the fit starts from.

Evaluation outside fit (`validate`, `test` of a checkpoint) is labelled with the checkpoint's step, so its metrics
line up with the run the checkpoint comes from (0 without a checkpoint).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from mgmlora.training.lightning_private import logging_step


def run_step(trainer: L.Trainer) -> int:
    """The step of what is logged now: optimizer steps done in fit, the evaluated checkpoint's step otherwise."""
    if trainer.state.fn == "fit":
        return trainer.global_step
    return getattr(trainer.lightning_module, "checkpoint_step", None) or trainer.global_step


class StepLabels(L.Callback):
    """Relabels the metrics Lightning logs with the optimizer step they belong to (module docstring).

    Each logger's `log_metrics` is wrapped from `setup` to `teardown`. A call whose step is Lightning's own label
    (`logging_step`) gets N instead of N - 1 while training runs, and the checkpoint's step in evaluation outside fit;
    a step given explicitly (another value) is kept, as is everything logged before training starts.
    """

    def __init__(self) -> None:
        self._training = False
        self._wrapped: list[L.pytorch.loggers.Logger] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        for logger in trainer.loggers:
            if logger in self._wrapped:
                continue
            original = logger.log_metrics

            def log_metrics(metrics: dict[str, Any], step: int | None = None, _original=original) -> None:
                _original(metrics, self._label(trainer, step))

            logger.log_metrics = log_metrics  # the instance attribute shadows the class's method until teardown
            self._wrapped.append(logger)

    def _label(self, trainer: L.Trainer, step: int | None) -> int | None:
        if step is None or step != logging_step(trainer):
            return step  # explicit: kept
        if trainer.state.fn == "fit":
            return step + 1 if self._training else step
        return run_step(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._training = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._training = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        self._unwrap()

    def _unwrap(self) -> None:
        for logger in self._wrapped:
            vars(logger).pop("log_metrics", None)  # the class's method again
        self._wrapped, self._training = [], False


__all__ = ["StepLabels", "run_step"]
