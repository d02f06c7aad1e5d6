"""Every TensorBoard event of one optimizer step carries that step, as checkpoint names count it (log_steps.py)."""

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.models.args import ModelArgs
from mgmlora.training.callbacks import ThroughputMonitor
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.generation_eval import GenerationEval
from mgmlora.training.log_steps import StepLabels
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from tests.conftest import ASSETS

LLAVA = ASSETS / "llava"
STEPS, ACCUMULATE = 3, 2
ONCE = {"params/trainable", "params/total", "hp_metric", "lora/text_summary"}  # logged once, where the fit starts


def _steps_by_tag(log_dir) -> dict[str, set[int]]:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    steps = {tag: {e.step for e in events.Scalars(tag)} for tag in tags["scalars"]}
    steps |= {tag: {e.step for e in events.Tensors(tag)} for tag in tags["tensors"]}  # text (the sample table)
    steps |= {tag: {e.step for e in events.Images(tag)} for tag in tags["images"]}
    return steps


def _module():
    return LoraLitModule(ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"), dtype="float32",
                                   gradient_checkpointing=False), LoraArgs(preset="balanced"))


def _data(module):
    data = LlavaDataModule(str(LLAVA / "llava_demo.json"), str(LLAVA), val_path=str(LLAVA / "llava_demo_val.json"),
                           batch_size=2, eval_batch_size=2)
    data.connect(module.tokenizer, module.info)
    return data


def test_every_event_of_an_optimizer_step_carries_that_step_as_the_checkpoints_do(tmp_path):
    """Logging, validation and a checkpoint after every optimizer step: each tag's steps are exactly 1..STEPS."""
    module = _module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, log_every_n_steps=1,
        val_check_interval=ACCUMULATE, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[StepLabels(), ModelCheckpoint(filename="{step:06d}", every_n_train_steps=1, save_top_k=-1),
                   LearningRateMonitor(logging_interval="step"), ThroughputMonitor(),
                   GenerationEval(num_samples=2, max_new_tokens=3, batch_size=2, table_rows=1)])
    trainer.fit(module, _data(module))

    run = tmp_path / "run" / "version_0"
    checkpoints = {int(p.name.removeprefix("step=").removesuffix(".ckpt")) for p in (run / "checkpoints").iterdir()}
    assert checkpoints == set(range(1, STEPS + 1))
    steps = _steps_by_tag(run)
    per_step = {tag: s for tag, s in steps.items() if tag not in ONCE}
    # one of each kind is there: train and throughput scalars, the learning rate, validation, the sample table, images
    assert {"train/loss", "train/grad_norm", "perf/tokens_per_s", "lr-AdamW/pg1", "epoch", "val/loss",
            "val_gen/exact_match", "val_gen/samples/text_summary", "val_gen/image_0"} <= set(per_step), sorted(steps)
    assert {tag: s for tag, s in per_step.items() if s != checkpoints} == {}
    assert {tag: steps[tag] for tag in ONCE} == dict.fromkeys(ONCE, {0})  # where the fit started


def test_a_validation_outside_fit_is_labelled_with_its_checkpoints_step(tmp_path):
    """`validate --ckpt_path step=N` puts its val/* scalars and sample table at N, beside the run's own."""
    module = _module()
    common = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
              "use_distributed_sampler": False, "plugins": [AdapterCheckpointIO()], "limit_val_batches": 1}
    trainer = L.Trainer(**common, max_steps=2, limit_train_batches=2, logger=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                   every_n_train_steps=2)])
    trainer.fit(module, _data(module))
    module = _module()
    evaluator = L.Trainer(**common, logger=TensorBoardLogger(tmp_path, name="eval"),
                          callbacks=[StepLabels(), GenerationEval(num_samples=2, max_new_tokens=3, batch_size=2,
                                                                  table_rows=1)])
    evaluator.validate(module, _data(module), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    steps = _steps_by_tag(tmp_path / "eval" / "version_0")
    assert steps["val/loss"] == steps["val_gen/exact_match"] == steps["val_gen/samples/text_summary"] == {2}
