"""What a fit trained, said once at its end: a run that trained nothing fails, a finished one says what and where.

`max_steps: 0`, a training split that filtering left empty, or a resume from a checkpoint that already reached
`max_steps` all end Lightning's fit without a single optimizer step and with exit 0, and the final adapter export
would then write the untrained (or resumed) adapter as if it were a result. `RunOutcome` (added to every
`bin/main.py fit` run, first among the callbacks so that its check runs before `AdapterExport` writes) counts the
optimizer steps, samples and supervised tokens this fit trained on this rank; at the end of fit it raises
`NothingTrainedError` (exit 1, one line with the reason) when there were no steps, or when no step of the run
(those before a resumed checkpoint included) had a window that reached a trainable parameter (an image-path-only
run on text-only samples), `StalledError` (exit 1) when the gradient norm was exactly 0 from some step to the end
(mgmlora.training.finite), and otherwise prints one final line: steps, samples and tokens (summed over ranks), the
adapter directory and the newest checkpoint. At the start of training it warns when an epoch is shorter than one
accumulation window (`short_window`); a fit that fails before training starts, or a `validate` / `test` that fails,
takes what it wrote into its log directory away (`run_dir.discard_failed_run`).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mgmlora.errors import MgmloraError
from mgmlora.training.finite import StalledError
from mgmlora.training.run_dir import discard_failed_run, remove_empty_dirs, saved_config_name


class NothingTrainedError(MgmloraError):
    """A fit ended without one optimizer step; nothing it would write is a result."""


def _reason(trainer: L.Trainer) -> str:
    """Why a fit made no optimizer step, from what the trainer knows at its end."""
    if trainer.max_steps == 0:
        return "trainer.max_steps is 0"
    if trainer.max_epochs == 0:
        return "trainer.max_epochs is 0"
    if trainer.limit_train_batches == 0:
        return "trainer.limit_train_batches is 0"
    if not trainer.num_training_batches:
        return "the training split has no batches (empty after filtering, or every sample skipped)"
    if trainer.ckpt_path and trainer.global_step and 0 < trainer.max_steps <= trainer.global_step:
        return (f"the resumed checkpoint is already at optimizer step {trainer.global_step}, and trainer.max_steps is "
                f"{trainer.max_steps}; raise trainer.max_steps above {trainer.global_step} to train further")
    return "no training micro-batch completed an accumulation window"


def short_window(epoch_batches: int | float, accumulate: int) -> str | None:
    """The warning for an epoch shorter than one accumulation window (plain Lightning's stepping), or None.

    Lightning steps the optimizer at the end of every epoch, so with fewer micro-batches per epoch (per device) than
    `accumulate_grad_batches` every optimizer step sees only the epoch's: a smaller batch per step than the config
    states (e.g. a 128-sample recipe on a small file), with nothing else saying so. The loss stays normalised over
    what each window holds (mgmlora.training.window).
    """
    if not isinstance(epoch_batches, int) or not 0 < epoch_batches < accumulate:
        return None
    return (f"trainer.accumulate_grad_batches is {accumulate}, but an epoch has {epoch_batches} micro-batch(es) per "
            f"device, and Lightning steps the optimizer at each epoch's end: every optimizer step takes "
            f"{epoch_batches}, not {accumulate}. Set accumulate_grad_batches to {epoch_batches} or less to say so, "
            "or give an epoch more micro-batches (more data, or a higher trainer.limit_train_batches).")


def _written_adapters(trainer: L.Trainer) -> list:
    """The adapter directories this fit's callbacks wrote (AdapterExport's `written`, once written)."""
    return [c.written for c in trainer.callbacks if getattr(c, "written", None) is not None]


class RunOutcome(L.Callback):
    """Fails a fit that made no optimizer step and ends a successful one with a summary line (module docstring)."""

    def __init__(self) -> None:
        self.steps = self.samples = 0
        self.tokens: torch.Tensor | int = 0  # supervised tokens, a device tensor once training ran
        self._ok = False
        # for `on_exception`: what this process may remove, until it trained or an evaluation logged its metrics
        self._since, self._training, self._logged = time.time(), False, False
        self.fresh_dirs: set[Path] = set()  # MgmCLI: the log directories this fit makes (what it writes there may go)
        self.made_parents: list[Path] = []  # MgmCLI: the parents its version claim created, deepest first

    def on_validation_end(self, trainer, pl_module) -> None:
        """An evaluation outside fit has written its metrics to the loggers by now (RunOutcome's hook runs first).

        From then on this callback removes nothing: its event file holds them, and a later command of the same
        Trainer (the Python API) writes into the same directory, its files not told apart by their modification time.
        """
        self._logged = self._logged or trainer.state.fn != "fit"

    def on_test_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._logged = True

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.steps = self.samples = 0
        self.tokens = 0
        self._ok = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A fit that fails before training starts, or a failed evaluation, leaves no empty event file behind.

        Nor a directory of its own files only. Only for an error (not SIGTERM or Ctrl+C, after which
        PreemptionCheckpoint saves into the run), in `fit` (before training), `validate` or `test` (before its metrics
        were logged, at the epoch's end: a callback failing in `on_validation_end` or `teardown` leaves them), on rank
        zero (the rank that writes the logs), and for TensorBoard's logger (CSV's writes its file again after this
        hook). Nothing once a command of this Trainer trained or logged evaluation metrics (`on_validation_end`).
        """
        fn = trainer.state.fn
        if self._training or self._logged or not isinstance(exception, Exception) \
                or fn not in ("fit", "validate", "test") or not trainer.is_global_zero:
            return
        # `fn` is Lightning's TrainerFn, whose str() is "TrainerFn.VALIDATING": its value is the subcommand
        config = saved_config_name(TrainerFn(fn).value)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and logger.log_dir is not None:
                # closed first: TensorBoard's writer appends by file name, so a file removed while events were
                # still buffered would come back when Lightning closes the logger after this hook (closing twice
                # is a no-op)
                logger.finalize("failed")
                discard_failed_run(logger.log_dir, self._since, Path(logger.log_dir) in self.fresh_dirs, config)
        remove_empty_dirs(self.made_parents)  # the parents of a version directory the command made and took away

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._training = True
        # DeepSpeed steps every window across epoch ends; its samplers refuse a short epoch (data.sampling)
        line = None if trainer.strategy.handles_gradient_accumulation else \
            short_window(trainer.num_training_batches, trainer.accumulate_grad_batches)
        if line:
            rank_zero_warn(f"mgmlora: {line}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.samples += len(batch)
        self.tokens = self.tokens + batch.supervised_tokens()  # summed on the device: no host sync per micro-batch
        window = getattr(pl_module, "window", None)
        if window is None or window.ended:  # the optimizer steps after a window's last micro-batch
            self.steps += 1

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self.steps == 0:
            raise NothingTrainedError(f"the run trained nothing: {_reason(trainer)}; no adapter was written.")
        guard = getattr(pl_module, "finite", None)  # LoraLitModule's FiniteGuard (mgmlora.training.finite)
        # a resumed fit's guard goes on from its checkpoint's counts: steps before the checkpoint count too
        untrained = guard.untrained() if guard is not None else None
        why = guard.stalled() if guard is not None else None
        if untrained or why:
            written = _written_adapters(trainer)
            kept = f"the adapter in {written[0]} is that run's" if written else "no adapter was written"
            if untrained:
                raise NothingTrainedError(f"the run trained nothing: {untrained}; {kept}. Check model.trainable "
                                          "against the data.")
            raise StalledError(f"{why}; {kept}. Lower model.optim.lr (or set trainer.gradient_clip_val) and train "
                               "again from the start.")
        self._ok = True

    def teardown(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if stage != "fit" or not self._ok:  # Lightning calls teardown after on_fit_end only when fit succeeded
            return
        self._ok = False
        totals = torch.tensor([self.samples, int(self.tokens)], dtype=torch.long, device=pl_module.device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        samples, tokens = (int(v) for v in totals.tolist())
        where = [f"adapter {written}" for written in _written_adapters(trainer)]
        newest = getattr(trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(trainer.checkpoint_callback, "best_model_path", "")
        if newest:
            where.append(f"newest checkpoint {Path(newest)}")
        if trainer.log_dir is not None:
            where.append(f"logs {trainer.log_dir}")
        rank_zero_info(f"mgmlora: trained {self.steps} optimizer steps on {samples} samples ({tokens} supervised "
                       f"tokens) to step {trainer.global_step}; " + ("; ".join(where) or "nothing was saved"))


__all__ = ["NothingTrainedError", "RunOutcome", "short_window"]
