"""Preemption: on SIGTERM, SIGINT or SIGHUP a run stops at the next micro-batch, saves a checkpoint and the adapter.

The exit status is 128 + signal (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP: a closed terminal or ssh
session), so that a scheduler records the run as stopped, not done, and `fit --ckpt_path` continues from where it
stopped.

Built on Lightning's own SIGTERM handling (`trainer.received_sigterm`): when that flag is up, Lightning's training loop
raises `SIGTERMException` after the micro-batch in flight and its exception path calls `Callback.on_exception`. By
itself that exits 0 and saves nothing; SIGINT raises KeyboardInterrupt and exits 1, also saving nothing, and SIGHUP
kills the process.
`PreemptionCheckpoint` (added to every `bin/main.py` run):

- notes SIGTERM, SIGINT and SIGHUP during training and raises that flag on all ranks after the same micro-batch (a
  second SIGINT still interrupts at once). A signal during a validation pass takes effect at the first training
  micro-batch after it: ranks may hold one validation batch more than another, so agreeing there could not be a
  collective;
- in `on_exception`, saves `<checkpoint dir>/interrupted-step=NNNNNN.ckpt` through `trainer.save_checkpoint` (the
  configured CheckpointIO, or DeepSpeed's own format), so `fit --ckpt_path` resumes it, and writes the adapter
  through the run's `AdapterExport`; then sets the exit code;
- in `on_save_checkpoint`, makes any checkpoint taken in the middle of a gradient-accumulation window describe the
  window's start: the weights, optimizer and scheduler there are still those of the last optimizer step (only
  gradients have accumulated since, and those are not saved), so the loop counters and the data position are wound
  back by the window's finished micro-batches. A resumed run then replays the whole window, and its optimizer step
  sees every micro-batch's gradient, as it would have without the interruption.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mgmlora.training.callbacks import AdapterExport
from mgmlora.training.lightning_private import request_graceful_stop, resumed_checkpoint_saved
from mgmlora.training.window import window_offset


def _rewind(checkpoint: dict[str, Any], micro_batches: int) -> None:
    """Winds a checkpoint's training-loop position back by `micro_batches` (see the module docstring)."""
    loop = checkpoint["loops"]["fit_loop"]
    for scope in ("total", "current"):
        counters = loop["epoch_loop.batch_progress"][scope]
        for key in ("ready", "started", "processed", "completed"):
            counters[key] -= micro_batches
    for state in loop["state_dict"].get("combined_loader", []):  # mgmlora's resumable loader: batches consumed
        if isinstance(state, dict) and "batches_consumed" in state:
            state["batches_consumed"] -= micro_batches


def _after_epoch_end(trainer: L.Trainer) -> bool:
    """Whether the fit loop has already closed the epoch whose last micro-batch just ran.

    A stop requested at an epoch's last micro-batch is raised by Lightning only after the fit loop counted the epoch
    complete (`FitLoop.on_advance_end`), while the epoch loop's counters still describe the finished epoch's last
    batch. Saved as they are, a resumed run takes the (already new) epoch for finished too and skips it.
    """
    epochs, batches = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress
    last = batches.is_last_batch or batches.current.ready >= trainer.num_training_batches  # (limit_train_batches)
    return last and batches.current.ready > 0 and epochs.ready == epochs.started == epochs.processed == epochs.completed


def _to_next_epoch_start(checkpoint: dict[str, Any]) -> None:
    """Makes a checkpoint saved after an epoch's end describe the start of the next epoch (`_after_epoch_end`)."""
    loop = checkpoint["loops"]["fit_loop"]
    batches = loop["epoch_loop.batch_progress"]
    for key in ("ready", "started", "processed", "completed"):
        batches["current"][key] = 0
    batches["is_last_batch"] = False
    for state in loop["state_dict"].get("combined_loader", []):
        if isinstance(state, dict) and "batches_consumed" in state:
            state["batches_consumed"] = 0


class PreemptionCheckpoint(L.Callback):
    """Stops on SIGTERM/SIGINT/SIGHUP at a micro-batch boundary with a resumable checkpoint and the adapter.

    Args:
        filename: checkpoint name (in the ModelCheckpoint's directory, else `<log_dir>/checkpoints`); `{step}` is the
            optimizer step the checkpoint resumes from.
    """

    def __init__(self, filename: str = "interrupted-step={step:06d}.ckpt") -> None:
        self.filename = filename
        self.signum: int | None = None  # the signal that stopped the run (SIGINT when ours, else Lightning's SIGTERM)
        self.saved: Path | None = None
        self._trainer: L.Trainer | None = None  # set while fitting
        self._previous: dict[int, Any] = {}  # the handlers ours replaced, by signal

    # ---- signals into Lightning's stop flag, decided by all ranks together ----------------------------------------
    # SIGINT and SIGHUP are taken in on_fit_start (mgmlora's DataLoader workers ignore all three:
    # `mgmlora.data.datamodule.ignore_stop_signals`). SIGTERM is taken in on_train_start, after Lightning installed
    # its own: that one runs a collective (`dist.broadcast`) inside the signal handler and each rank then stops on
    # its own flag, so a 2-rank DDP run stopped mid collective and crashed (gloo: "Connection closed by peer"). Here
    # a handler only notes the signal; after every micro-batch all ranks agree (one all-reduce of a bool, as
    # Lightning itself broadcasts a flag per micro-batch) and raise Lightning's flag together. Lightning restores the
    # handlers it found when the run ends; outside a fit this one passes a signal on to the handler it replaced.
    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.signum, self.saved, self._trainer = None, None, trainer
        self._take(signal.SIGINT)
        if hasattr(signal, "SIGHUP"):  # POSIX only
            self._take(signal.SIGHUP)

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._trainer = trainer
        self._take(signal.SIGTERM)
        if trainer.ckpt_path is not None and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The checkpoint this fit resumes is its step's save. Without this, ModelCheckpoint (which does not
            # remember its last saved step) saves that step again after the first resumed micro-batch: inside the
            # window, and over the resumed file itself when it lies in the same directory. Not at an epoch's end: there
            # the resumed loop finishes the epoch at once, and its epoch-end save is due.
            resumed_checkpoint_saved(trainer)

    def _take(self, signum: int) -> None:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signum, self._on_signal)
            if previous != self._on_signal:  # a second fit with the same callback keeps the first one's original
                self._previous[signum] = previous

    def teardown(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        self._trainer = None
        for signum, previous in self._previous.items():
            if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        again = signum == signal.SIGINT and self.signum is not None
        if self._trainer is None or again:  # not fitting, or Ctrl+C pressed again: the user wants out now
            self._trainer = None
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL and signum == signal.SIGINT:
                raise KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        if self.signum is None:
            self.signum = signum
            rank_zero_info(f"mgmlora: {signal.Signals(signum).name} received; stopping after this micro-batch with "
                           "a checkpoint" + (" (Ctrl+C again aborts without one)." if signum == signal.SIGINT else "."))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if trainer.strategy.reduce_boolean_decision(self.signum is not None or trainer.received_sigterm, all=False):
            request_graceful_stop(trainer)  # on every rank: Lightning raises SIGTERMException after this micro-batch

    # ---- mid-window checkpoints describe the window's start ----------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:  # noqa: D102
        if trainer.state.fn == TrainerFn.FITTING and "loops" in checkpoint:
            partial = window_offset(trainer)
            if partial:
                _rewind(checkpoint, partial)
            elif _after_epoch_end(trainer):
                _to_next_epoch_start(checkpoint)

    # ---- the stop itself ---------------------------------------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:  # noqa: D102
        self._trainer = None  # from here on SIGINT interrupts as it would without this callback
        if not isinstance(exception, SIGTERMException):
            return
        signum = self.signum or signal.SIGTERM  # Lightning's own SIGTERM handler (before training started)
        exception.code = 128 + signum  # SIGTERMException is a SystemExit: this becomes the process's exit status
        if trainer.state.fn != TrainerFn.FITTING or trainer.model is None:
            return
        path = self._path(trainer)
        # every rank calls it (DeepSpeed saves collectively); Lightning's broadcast flag stops the ranks together
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path
        for callback in trainer.callbacks:
            if isinstance(callback, AdapterExport):
                callback.export(trainer, pl_module)
        name = signal.Signals(signum).name
        rank_zero_info(f"mgmlora: stopped by {name} at optimizer step {trainer.global_step}; resumable checkpoint "
                       f"written to {path} (resume with: fit ... --ckpt_path {path}); exiting with {128 + signum}.")

    def _path(self, trainer: L.Trainer) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename.format(step=trainer.global_step)
