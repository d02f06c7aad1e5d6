"""The fence on Lightning's private attributes (mgmlora.training.lightning_private): each still does what mgmlora needs.

An upgrade of Lightning that renames or removes one fails here, not somewhere in a training run.
"""

from pathlib import Path

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


def test_logging_step_is_the_step_lightning_logs_with_and_trails_global_step_until_the_batch_ends():
    """The two facts StepLabels (mgmlora.training.callbacks) relies on, on Lightning's own loop and logger calls."""
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import Logger

    from mgmlora.training.lightning_private import logging_step

    class Steps(Logger):
        name, version = "steps", 0
        logged: list = []

        def log_metrics(self, metrics, step=None):
            self.logged.append(step)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    class Seen(L.Callback):
        pairs: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.pairs.append((trainer.global_step, logging_step(trainer)))

    class Logs(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("loss", out["loss"])
            return out

    logger = Steps()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=1, logger=logger, callbacks=[Seen()],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Logs())
    assert Seen.pairs == [(1, 0), (2, 1), (3, 2)]  # optimizer step N done, Lightning's label still N - 1
    assert Steps.logged == [0, 1, 2]  # the label it gave the logger for steps 1, 2, 3
    assert logging_step(trainer) == 3  # once the batch has ended


def test_resumed_checkpoint_saved_reaches_modelcheckpoints_skip_of_the_saved_step(tmp_path):
    # the fence on `ModelCheckpoint._last_global_step_saved`: a fit resumed at step 1 with accumulation saved step 1
    # again after its first micro-batch (the optimizer had not stepped); told it is saved, it saves only step 2
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mgmlora.training.lightning_private import resumed_checkpoint_saved

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            resumed_checkpoint_saved(trainer)

    def fit(folder, max_steps, *callbacks, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                            callbacks=[*callbacks, checkpoint], enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)

    fit(tmp_path / "a", 1)
    fit(tmp_path / "b", 2, ckpt_path=tmp_path / "a" / "step=1.ckpt")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step=1.ckpt", "step=2.ckpt"]  # the duplicate
    fit(tmp_path / "c", 2, AtStart(), ckpt_path=tmp_path / "a" / "step=1.ckpt")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step=2.ckpt"]


def test_claim_new_version_takes_the_next_free_version_when_another_fit_made_the_listed_one(tmp_path, monkeypatch):
    """Two fits listed the same free version_N: the one whose mkdir loses takes N+1 (and rank 1 follows rank 0's)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from mgmlora.training.lightning_private import VERSION_ENV, claim_new_version

    monkeypatch.delenv(VERSION_ENV, raising=False)
    for cls in (TensorBoardLogger, CSVLogger):
        logger = cls(save_dir=tmp_path / cls.__name__, name="run")
        listed = logger._get_next_version()  # what both fits saw: 0
        (tmp_path / cls.__name__ / "run" / f"version_{listed}").mkdir(parents=True)  # the other fit won the mkdir
        real, stale = logger._get_next_version, [listed]  # this fit's stale listing first, then the real one
        monkeypatch.setattr(logger, "_get_next_version", lambda: stale.pop() if stale else real())
        claimed = claim_new_version([logger], rank=0)
        assert claimed == tmp_path / cls.__name__ / "run" / "version_1" and claimed.is_dir()
        assert logger.version == 1 and logger.log_dir.endswith("version_1")
        follower = cls(save_dir=tmp_path / cls.__name__, name="run")  # rank 1, started by Lightning after rank 0
        assert claim_new_version([follower], rank=1) is None and follower.version == 1
    pinned = TensorBoardLogger(save_dir=tmp_path, name="pinned", version=7)  # a version the config names
    assert claim_new_version([pinned], rank=0) is None and not (tmp_path / "pinned").exists()


def test_claim_new_version_makes_the_parents_again_when_a_refused_command_took_them_away(tmp_path, monkeypatch):
    """Another command's give-back removed the (empty) log directory between this claim's mkdir and its listing."""
    import shutil

    from lightning.pytorch.loggers import TensorBoardLogger

    from mgmlora.training.lightning_private import VERSION_ENV, claim_new_version

    monkeypatch.delenv(VERSION_ENV, raising=False)
    logger = TensorBoardLogger(save_dir=tmp_path / "runs", name="run")
    real, calls = logger._get_next_version, []

    def listing():
        calls.append(1)
        if len(calls) == 1:
            shutil.rmtree(tmp_path / "runs")  # the other command's give-back, after this claim made the parents
        return real()

    monkeypatch.setattr(logger, "_get_next_version", listing)
    claimed = claim_new_version([logger], rank=0)
    assert claimed == tmp_path / "runs" / "run" / "version_0" and claimed.is_dir() and logger.version == 0


def test_claim_new_version_gives_loggers_sharing_the_directory_one_version_and_never_loops(tmp_path, monkeypatch):
    """A CSV logger beside the TensorBoard one shares its version_N (it listed the claimed one and took N+1);
    an entry the listing skips (a dead link) is stepped over; a remote directory makes no local one."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from mgmlora.training.lightning_private import VERSION_ENV, claim_new_version

    monkeypatch.delenv(VERSION_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tb, csv, other = TensorBoardLogger("logs"), CSVLogger("logs"), CSVLogger("logs", name="other")
    assert claim_new_version([tb, csv, other], rank=0) == Path("logs/lightning_logs/version_0")
    assert tb.log_dir == csv.log_dir == str(Path("logs/lightning_logs/version_0"))
    assert other._version is None  # another directory: its own listing

    (tmp_path / "logs" / "lightning_logs" / "version_1").symlink_to(tmp_path / "gone")  # not a directory to list
    logger, calls = TensorBoardLogger("logs"), []
    real = logger._get_next_version

    def listing():  # before the fix: the listing said 1 again and again, mkdir failed, forever
        calls.append(1)
        assert len(calls) < 5, "claim_new_version loops"
        return real()

    monkeypatch.setattr(logger, "_get_next_version", listing)
    assert claim_new_version([logger], rank=0) == Path("logs/lightning_logs/version_2") and logger.version == 2

    remote = TensorBoardLogger("memory://bucket/logs", name="run")
    assert claim_new_version([remote], rank=0) is None and not Path("memory:").exists()


def test_estimated_stepping_batches_leaves_no_training_loader_built(tmp_path):
    """Under max_epochs Lightning builds the training loader to count the steps; the fenced helper drops it again."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from mgmlora.training.lightning_private import estimated_stepping_batches

    seen = {}

    class Counting(BoringModel):
        def configure_optimizers(self):
            loop = self.trainer.fit_loop
            seen["attributes"] = hasattr(loop, "_combined_loader") and hasattr(loop, "_data_fetcher")
            seen["total"] = estimated_stepping_batches(self.trainer)
            seen["left"] = (loop._combined_loader, loop._data_fetcher)
            return super().configure_optimizers()

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Counting())
    assert seen == {"attributes": True, "total": 6, "left": (None, None)} and trainer.global_step == 6
