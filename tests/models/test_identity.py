"""An adapter remembers its base model and refuses any other, on every path that loads it (identity.py)."""

import dataclasses
import shutil

import lightning as L
import pytest

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import classify
from mgmlora.models.args import ModelArgs
from mgmlora.models.identity import BaseMismatchError, base_fingerprint
from mgmlora.tools.export import build_trained_model, export_adapter, model_args_for, read_run_adapter
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from tests.conftest import TOKENIZER, tiny_model
from tests.training.test_module import _module, _subset


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path):
    for seed in (0, 1):
        tiny_model(seed=seed).save_pretrained(tmp_path / f"seed{seed}")
    shutil.copytree(tmp_path / "seed0", tmp_path / "copy")
    fingerprint = {name: base_fingerprint(ModelArgs(model_path=str(tmp_path / name), tokenizer_path=str(TOKENIZER)))
                   for name in ("seed0", "seed1", "copy")}
    assert fingerprint["seed0"] == fingerprint["copy"]  # moved to another machine: the same base
    assert fingerprint["seed0"] != fingerprint["seed1"]  # same shapes, other weights: another base
    assert base_fingerprint(ModelArgs(preset="tiny-qwen3", init_seed=0)) == "random:tiny-qwen3:seed=0"


def test_every_adapter_records_its_base_and_export_keeps_it(checkpoint, tmp_path):
    run = read_run_adapter(checkpoint)
    assert run.base_fingerprint == "random:tiny-qwen3:seed=0"
    assert read_run_adapter(export_adapter(run, tmp_path / "out")).base_fingerprint == run.base_fingerprint
    final = checkpoint.parents[1] / "run" / "version_0" / "adapter"  # AdapterExport's final adapter
    assert read_run_adapter(final).base_fingerprint == run.base_fingerprint


def test_the_tools_refuse_an_adapter_on_another_base_before_loading_it(checkpoint, tmp_path):
    run = read_run_adapter(export_adapter(read_run_adapter(checkpoint), tmp_path / "out"))
    args = model_args_for(run, dtype="float32")
    build_trained_model(run, args)  # its own base
    with pytest.raises(BaseMismatchError, match=r"trained on another base model than tiny-qwen3") as refused:
        build_trained_model(run, dataclasses.replace(args, init_seed=1))
    assert classify(refused.value) == ("user", 1) and "\n" not in str(refused.value)


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_resume_and_evaluation_refuse_a_checkpoint_of_another_base(checkpoint, tmp_path, stage):
    base = dataclasses.replace(_module().model_args, init_seed=1)
    module = LoraLitModule(base, LoraArgs(preset="balanced", lora_dropout=0.0))
    data = ChatDataModule(_subset(tmp_path, 4), val_path=_subset(tmp_path, 4), batch_size=2, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        plugins=[AdapterCheckpointIO()])
    with pytest.raises(BaseMismatchError, match="the checkpoint: this adapter was trained on another base"):
        getattr(trainer, stage)(module, datamodule=data, ckpt_path=checkpoint)
    assert trainer.global_step == 0
