"""Every private attribute of Lightning that mgmlora reads or writes, in one place, each with why.

Lightning offers no public way for these; each has a test in tests/training/test_lightning_private.py that fails
when an upstream release renames or removes it, so an upgrade breaks loudly here instead of silently elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

VERSION_ENV = "MGMLORA_LOG_VERSION"  # the version rank 0 claimed, for the processes Lightning launches after it


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None when it runs without one (export, tests, the estimate's meta build).

    `LightningModule.trainer` raises when no Trainer is attached; the module's hooks that also run outside `fit`
    (configure_model, on_load_checkpoint, the checkpoint gather) need to ask without raising.
    """
    return module._trainer


def request_graceful_stop(trainer: L.Trainer) -> None:
    """Marks the run as stopped by SIGTERM, as Lightning's own signal handler does (its loops then stop cleanly).

    `trainer.received_sigterm` is read-only; this flag is what Lightning's training loop checks after every
    micro-batch (mgmlora.training.preemption raises it on all ranks together).
    """
    trainer._signal_connector.received_sigterm = True


def resumed_checkpoint_saved(trainer: L.Trainer) -> None:
    """Tells every ModelCheckpoint that the current step (a resumed fit's first) is already saved.

    `ModelCheckpoint._last_global_step_saved` is not part of its state_dict, so a resumed fit starts with 0 and, with
    `every_n_train_steps` dividing the resumed step and `accumulate_grad_batches` > 1, saves `step=N` again at the end
    of the first resumed micro-batch (the optimizer has not stepped yet): a mid-window duplicate that overwrites the
    checkpoint the fit resumed from when both share a directory (mgmlora.training.preemption).
    """
    for callback in trainer.checkpoint_callbacks:
        if hasattr(callback, "_last_global_step_saved"):
            callback._last_global_step_saved = trainer.global_step


def claim_new_version(loggers: Sequence, rank: int) -> Path | None:
    """Creates the next free `version_N` directory of a TensorBoard or CSV logger that picks its own, and pins it.

    These loggers pick `version_N` by listing the directories that exist, and create it only when they first write:
    two fits started together under one `save_dir`/`name` picked the same N and wrote one run (config.yaml,
    checkpoints, adapter) over each other. Creating the directory is atomic, so the fit that loses the race takes the
    next N. The first logger claims; the fit's other TensorBoard/CSV loggers under the same directory get the same N
    (else they would list the claimed directory and take N+1). Rank 0 claims and puts the number in the environment,
    which the processes Lightning starts for the other ranks inherit; they pin the same version. A remote (fsspec
    URL) directory is left to the logger: a local mkdir there would make a directory named after the URL. Returns
    the directory created (None: nothing claimed). Private: `_version` (where the loggers keep the version once
    picked) and `_get_next_version` (how they pick it).
    """
    first = loggers[0] if loggers else None
    if not isinstance(first, TensorBoardLogger | CSVLogger) or first._version is not None \
            or "://" in str(first.root_dir):  # a remote save_dir (fsspec URL): left to the logger
        return None
    root = Path(first.root_dir)
    same_root = [lg for lg in loggers if isinstance(lg, TensorBoardLogger | CSVLogger) and lg._version is None
                 and Path(lg.root_dir).absolute() == root.absolute()]
    if rank != 0:
        for logger in same_root if VERSION_ENV in os.environ else ():
            logger._version = int(os.environ[VERSION_ENV])
        return None
    root.mkdir(parents=True, exist_ok=True)
    version = first._get_next_version()
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:  # another fit made it since the listing, or a file (or dead link) the listing skips
            version = max(version + 1, first._get_next_version())
        except FileNotFoundError:  # a refused command took the parents it had made away meanwhile: make them again
            root.mkdir(parents=True, exist_ok=True)
    for logger in same_root:
        logger._version = version
    os.environ[VERSION_ENV] = str(version)
    return root / f"version_{version}"


def estimated_stepping_batches(trainer: L.Trainer) -> int | float:
    """`trainer.estimated_stepping_batches`, without building the training loader before a checkpoint is restored.

    With `max_epochs` bounding the run, Lightning counts the epoch's micro-batches by setting up the training loader
    (`fit_loop.setup_data`, which starts its iterator and prefetches a batch). Asked from `configure_optimizers`, that
    happens before `restore_training_state`, so the loader position a resumed fit saved was never applied: the fit
    re-trained the epoch's first micro-batches (of the permutation of epoch 0) under the indices of the ones it had
    left. The loader this call built is dropped (private: `fit_loop._combined_loader`, `fit_loop._data_fetcher`), so
    the fit loop builds it again after the restore, as it does when `max_steps` bounds the run.
    """
    loop = trainer.fit_loop
    built = loop._combined_loader is not None
    total = trainer.estimated_stepping_batches
    if not built and loop._combined_loader is not None:
        if loop._data_fetcher is not None:
            loop._data_fetcher.teardown()
            loop._data_fetcher = None
        loop._combined_loader = None
    return total


def format_summary_table(total_parameters: int, trainable_parameters: int, model_size: float,
                         total_training_modes: dict[str, int], total_flops: int, *summary_data) -> str:
    """The text table Lightning's ModelSummary logs at fit start.

    `ModelSummary.summarize` formats and logs in one step; mgmlora's summary (training.callbacks.RunSummary) needs the
    text to drop the FLOPs total Lightning prints as 0 when it measured nothing.
    """
    from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

    return _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                 total_flops, *summary_data)


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning gives the loggers for the metrics it logs itself, when no `step` metric is logged.

    It is `fit_loop.epoch_loop._batches_that_stepped`: the batches that stepped the optimizer *and have ended*. From
    optimizer step N until the end of its batch (train metrics, the validation after it, the next window's
    LearningRateMonitor) it reads N - 1, while `trainer.global_step` and the checkpoints say N; mgmlora.training.
    callbacks.StepLabels compares a logged step with it to tell Lightning's label from an explicit one. 0 outside fit.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


__all__ = ["attached_trainer", "estimated_stepping_batches", "format_summary_table", "logging_step",
           "request_graceful_stop", "resumed_checkpoint_saved"]

