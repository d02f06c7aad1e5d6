"""Every private attribute of Lightning that mgmlora reads or writes, in one place, each with why.

Lightning offers no public way for these; each has a test in tests/training/test_lightning_private.py that fails
when an upstream release renames or removes it, so an upgrade breaks loudly here instead of silently elsewhere.
"""

from __future__ import annotations

import lightning as L


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


__all__ = ["attached_trainer", "request_graceful_stop"]

