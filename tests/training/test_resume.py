"""Resume refuses a change of dropout, accumulation, micro-batch or precision unless it is allowed (resume.py)."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import USAGE, classify
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.resume import resume_differences
from tests.training.test_callbacks import _fit_tiny
from tests.training.test_module import _module, _subset


def _fit(root, max_steps, ckpt_path=None, accumulate=2, batch_size=2, dropout=0.0, precision="32-true",
         allow=False, callbacks=(), **optim):
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = LoraLitModule(_module().model_args, LoraArgs(preset="balanced", lora_dropout=dropout),
                           OptimArgs(**{"lr": 1e-2, "warmup_ratio": 0.0, **optim}), allow_resume_changes=allow)
    data = ChatDataModule(_subset(root, 16), batch_size=batch_size, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                        precision=precision, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
                        callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                                               every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    _fit(root, max_steps=2)
    return root / "ckpt" / "step=2.ckpt"


@pytest.mark.parametrize(("change", "named"), [
    ({"accumulate": 4}, "trainer.accumulate_grad_batches: checkpoint 2 vs now 4"),
    ({"batch_size": 1}, "data.init_args.batch_size: checkpoint 2 vs now 1"),
    ({"dropout": 0.1}, "model.lora.lora_dropout: checkpoint 0.0 vs now 0.1"),
    ({"precision": "bf16-mixed"}, "trainer.precision: checkpoint '32-true' vs now 'bf16-mixed'"),
    ({"lr": 1e-3}, "model.optim.lr: checkpoint 0.01 vs now 0.001"),  # restored whole, it would have been ignored
    ({"betas": (0.8, 0.95)}, "model.optim.betas: checkpoint [0.9, 0.999] vs now [0.8, 0.95]"),
    ({"weight_decay": 0.1}, "model.optim.weight_decay: checkpoint 0.0 vs now 0.1"),
])
def test_resume_with_a_setting_that_changes_the_step_is_refused_naming_it(checkpoint, tmp_path, change, named):
    with pytest.raises(Exception, match="^cannot resume: ") as refused:
        _fit(tmp_path, max_steps=4, ckpt_path=checkpoint, **change)
    assert named in str(refused.value) and "model.allow_resume_changes: true" in str(refused.value)
    assert classify(refused.value) == ("user", USAGE) and "\n" not in str(refused.value)
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing written


def test_the_same_settings_resume_and_the_override_lets_a_change_through(checkpoint, tmp_path):
    assert _fit(tmp_path / "same", max_steps=4, ckpt_path=checkpoint).global_step == 4
    assert _fit(tmp_path / "allowed", max_steps=4, ckpt_path=checkpoint, accumulate=4, allow=True).global_step == 4


def test_a_checkpoint_without_a_record_compares_nothing():
    assert resume_differences(None, {"batch_size": 2}) == []
    assert resume_differences({"batch_size": 2, "gone": 1}, {"batch_size": 3}) == [
        "data.init_args.batch_size: checkpoint 2 vs now 3"]


class _Groups(L.Callback):
    """The optimizer's param groups as the first optimizer step of the fit uses them."""

    def __init__(self):
        self.groups = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.groups is None:
            self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def test_an_allowed_optimizer_change_on_resume_takes_effect_from_the_first_resumed_step(checkpoint, tmp_path):
    seen = _Groups()
    _fit(tmp_path, max_steps=4, ckpt_path=checkpoint, allow=True, callbacks=[seen], lr=1e-3, betas=(0.8, 0.95),
         eps=1e-6, weight_decay=0.1)
    # step 3 of 4 runs at step index 2 of the cosine (no warmup, floor 0): 0.5 * (1 + cos(pi * 2 / 4)) of the peak
    factor = 0.5 * (1 + math.cos(math.pi * 2 / 4))
    (decayed,) = seen.groups  # LoRA's matrices only: no 1-D trainables here, so no undecayed group
    assert decayed["lr"] == pytest.approx(1e-3 * factor) and decayed["initial_lr"] == 1e-3
    assert decayed["betas"] == (0.8, 0.95) and decayed["eps"] == 1e-6 and decayed["weight_decay"] == 0.1


def _losses(tmp_path, name: str, ckpt_path=None) -> list[float]:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / name, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    logger = _fit_tiny(tmp_path, 12, [checkpoints], max_epochs=2, max_steps=-1, enable_checkpointing=True,
                       ckpt_path=ckpt_path)[1]
    return [m["train/loss"] for _, m in logger.rows if "train/loss" in m]


def test_a_mid_epoch_resume_under_max_epochs_equals_the_unbroken_run(tmp_path):
    # 12 samples, 2 per micro-batch, accumulate 2: 6 micro-batches = 3 optimizer steps per epoch, 2 epochs
    whole = _losses(tmp_path, "whole")
    assert len(whole) == 6
    for step in (1, 4):  # mid-epoch in the first epoch, and in the second
        assert _losses(tmp_path, f"from{step}", str(tmp_path / "whole" / f"step={step}.ckpt")) == whole[step:], step
