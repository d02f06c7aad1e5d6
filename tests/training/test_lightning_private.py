"""The fence on Lightning's private attributes (mgmlora.training.lightning_private): each still does what mgmlora needs.

An upgrade of Lightning that renames or removes one fails here, not somewhere in a training run.
"""

import lightning as L
import pytest
import torch

from mgmlora.training.lightning_private import attached_trainer, request_graceful_stop


def _trainer():
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False)


def test_attached_trainer_is_none_where_the_public_property_raises_and_the_trainer_once_attached():
    module = L.LightningModule()
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):  # why the fence exists
        module.trainer  # noqa: B018
    assert attached_trainer(module) is None
    trainer = _trainer()
    module.trainer = trainer  # the public setter Lightning itself uses when it attaches a module
    assert attached_trainer(module) is trainer


def test_request_graceful_stop_raises_the_flag_lightnings_loop_reads():
    trainer = _trainer()
    assert trainer.received_sigterm is False
    request_graceful_stop(trainer)
    assert trainer.received_sigterm is True  # the public, read-only view of the flag its training loop checks


def test_format_summary_table_renders_the_summary_lightning_logs():
    from lightning.pytorch.utilities.model_summary import summarize

    from mgmlora.training.lightning_private import format_summary_table

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    summary = summarize(Tiny(), max_depth=1)
    table = format_summary_table(summary.total_parameters, summary.trainable_parameters, summary.model_size,
                                 summary.total_training_modes, 0, *summary._get_summary_data())
    assert "layer" in table and "Linear" in table and "8         Trainable params" in table  # 3 x 2 + 2
