"""What ThroughputMonitor logs, against counts made by hand from the tokenised samples of a tiny run; the adapter
export; the model summary; every TensorBoard event of one optimizer step at that step, as checkpoint names count it."""

import errno

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mgmlora.training.callbacks as callbacks
from mgmlora.batch import IGNORE_INDEX, Batch
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.errors import DiskFullError
from mgmlora.models.args import ModelArgs
from mgmlora.training.callbacks import StepLabels, ThroughputMonitor
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.generation_eval import GenerationEval
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from tests.conftest import ASSETS, TOKENIZER, TRAIN, VAL
from tests.training.test_outcome import _fit as _outcome_fit


class _Recorder(Logger):
    """Keeps every logged metric dict with its step."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit_tiny(tmp_path, n_samples, callbacks, ckpt_path=None, **trainer_kwargs):
    """tiny-qwen3 LoRA on the first `n_samples` bundled chat samples, 2 per micro-batch, accumulate 2, no validation.

    Returns the DataModule (its tokenised samples are what the counts are made from) and the recording logger.
    """
    path = tmp_path / f"train{n_samples}.jsonl"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:n_samples]))
    data = ChatDataModule(str(path), tokenizer_path=str(TOKENIZER), batch_size=2, shuffle=False)
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False), LoraArgs(preset="conservative"),
                           OptimArgs(warmup_ratio=0.0))
    data.connect(module.tokenizer, module.info)
    logger = _Recorder()
    trainer_kwargs = {"enable_checkpointing": False, **trainer_kwargs}
    trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=callbacks, limit_val_batches=0,
                        plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return data, logger, trainer


def test_throughput_monitor_logs_the_tokens_of_each_optimizer_step(tmp_path):
    # 8 samples, 2 per micro-batch, 2 micro-batches per optimizer step: one epoch is exactly 2 optimizer steps
    data, logger, _ = _fit_tiny(tmp_path, 8, [ThroughputMonitor()], max_steps=2)

    samples = data.splits["train"]
    assert len(samples) == 8
    # by hand: every token of every sample once; supervised = labelled positions after the causal shift
    tokens = [len(s.input_ids) for s in samples]
    supervised = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples]
    per_step = [(sum(tokens[:4]), sum(supervised[:4])), (sum(tokens[4:]), sum(supervised[4:]))]
    assert per_step[0] != per_step[1]  # the two steps are told apart

    perf = [m for _, m in logger.rows if "perf/tokens_per_s" in m]
    assert len(perf) == 2
    seen = time = 0.0
    for m, (n_tokens, n_supervised) in zip(perf, per_step):
        step_time = m["perf/step_time_s"]
        assert step_time > 0
        assert m["perf/tokens_per_s"] * step_time == pytest.approx(n_tokens, rel=1e-5)
        assert m["perf/supervised_tokens_per_s"] * step_time == pytest.approx(n_supervised, rel=1e-5)
        seen, time = seen + n_tokens, time + step_time
        assert m["perf/tokens_seen"] == seen  # running total since the start of fit
        assert m["perf/train_time_s"] == pytest.approx(time, rel=1e-5)
    assert seen == sum(tokens) and sum(supervised) > 0
    assert not any(k.startswith("perf/peak_mem") for m in perf for k in m)  # CUDA only
    assert torch.tensor(supervised).sum() < torch.tensor(tokens).sum()  # answers only, not prompts


def test_a_resumed_fit_carries_the_running_totals_on(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps, ckpt_path=None):
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2,
                                      save_top_k=-1)
        return _fit_tiny(tmp_path, 8, [ThroughputMonitor(), checkpoints], max_steps=max_steps,
                         enable_checkpointing=True, ckpt_path=ckpt_path)

    _, whole, _ = fit(4)  # the uninterrupted run: two epochs of two optimizer steps
    _, resumed, _ = fit(4, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    unbroken = [m for _, m in whole.rows if "perf/tokens_seen" in m]
    carried = [m for _, m in resumed.rows if "perf/tokens_seen" in m]
    assert len(unbroken) == 4 and len(carried) == 2  # the resumed fit logs steps 3 and 4
    # the same tokens as the unbroken run's running total (by hand: its steps 1-4), not a count restarted at step 3
    assert [m["perf/tokens_seen"] for m in carried] == [m["perf/tokens_seen"] for m in unbroken[2:]]
    assert carried[-1]["perf/train_time_s"] > carried[-1]["perf/step_time_s"] + carried[0]["perf/step_time_s"]


def test_throughput_monitor_reads_the_modules_declared_info_and_fails_without_it():
    """No getattr default: a LightningModule without LoraLitModule's `info` is an error, not text-only counting."""
    batch = Batch(*(torch.ones(1, 4, dtype=torch.long) for _ in range(3)))
    monitor = ThroughputMonitor()
    monitor._t0 = 0.0
    with pytest.raises(AttributeError, match="info"):
        monitor.on_train_batch_end(L.Trainer(accelerator="cpu", logger=False), L.LightningModule(), None, batch, 0)


class _Steps(L.Callback):
    """Records, per micro-batch, whether the module saw its window end, and where Lightning ran the optimizer."""

    def __init__(self):
        self.ended, self.stepped, self._idx = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._idx = (trainer.current_epoch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.stepped.append(self._idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.window.ended:
            self.ended.append((trainer.current_epoch, batch_idx))


def test_the_samplers_window_ends_are_where_lightning_steps_the_optimizer(tmp_path):
    """The window end is decided once (the sampler's `Batch.window_end`); it must be exactly where Lightning steps.

    10 samples, 2 per micro-batch, accumulate 2: micro-batches 0-4 per epoch, windows [0, 1], [2, 3] and the partial
    [4], which Lightning closes at the epoch's end. Over two epochs: steps after micro-batches 1, 3, 4 of each.
    """
    steps = _Steps()
    _, logger, trainer = _fit_tiny(tmp_path, 10, [steps, ThroughputMonitor()], max_epochs=2)
    expected = [(e, i) for e in (0, 1) for i in (1, 3, 4)]
    assert steps.stepped == expected
    assert steps.ended == expected
    assert trainer.global_step == 6
    assert len([m for _, m in logger.rows if "perf/step_time_s" in m]) == 6  # one throughput row per step
    assert len([m for _, m in logger.rows if "train/loss" in m]) == 6


def test_the_final_adapter_export_is_atomic_a_failed_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    trainer, _ = _outcome_fit(tmp_path, max_steps=1)
    adapter = tmp_path / "run" / "version_0" / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert "adapter_model.safetensors" in before

    def full_disk(directory, config, tensors):
        (directory / "adapter_model.safetensors").write_bytes(b"partial")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "adapter_model.safetensors"))

    monkeypatch.setattr(callbacks, "write_adapter", full_disk)
    export = next(c for c in trainer.callbacks if isinstance(c, callbacks.AdapterExport))
    with pytest.raises(DiskFullError, match=rf"^{adapter}: disk full after 7 bytes written"):  # one line, no debris
        export.export(trainer, trainer.lightning_module)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # untouched
    assert sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith(".")) == []  # no debris


def test_run_summary_drops_the_flops_lightning_did_not_count(monkeypatch):
    from lightning.pytorch.utilities.model_summary import summarize

    import mgmlora.training.callbacks as callbacks
    from mgmlora.training.callbacks import RunSummary

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

    summary = summarize(Tiny(), max_depth=1)
    data = summary._get_summary_data()
    assert any(name == "FLOPs" for name, _ in data)  # Lightning's data carries a FLOPs column of zeros
    logged = []
    monkeypatch.setattr(callbacks, "rank_zero_info", logged.append)
    RunSummary.summarize(data, summary.total_parameters, summary.trainable_parameters, summary.model_size,
                         summary.total_training_modes, total_flops=0)
    text = "".join(logged)
    assert "Trainable params" in text and "layer" in text
    assert "flops" not in text.lower()


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


def _mgm_module():
    return LoraLitModule(ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"), dtype="float32",
                                   gradient_checkpointing=False), LoraArgs(preset="balanced"))


def _llava_data(module):
    data = LlavaDataModule(str(LLAVA / "llava_demo.json"), str(LLAVA), val_path=str(LLAVA / "llava_demo_val.json"),
                           batch_size=2, eval_batch_size=2)
    data.connect(module.tokenizer, module.info)
    return data


def test_every_event_of_an_optimizer_step_carries_that_step_as_the_checkpoints_do(tmp_path):
    """Logging, validation and a checkpoint after every optimizer step: each tag's steps are exactly 1..STEPS."""
    module = _mgm_module()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, log_every_n_steps=1,
        val_check_interval=ACCUMULATE, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[StepLabels(), ModelCheckpoint(filename="{step:06d}", every_n_train_steps=1, save_top_k=-1),
                   LearningRateMonitor(logging_interval="step"), ThroughputMonitor(),
                   GenerationEval(num_samples=2, max_new_tokens=3, batch_size=2, table_rows=1)])
    trainer.fit(module, _llava_data(module))

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
    module = _mgm_module()
    common = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
              "use_distributed_sampler": False, "plugins": [AdapterCheckpointIO()], "limit_val_batches": 1}
    trainer = L.Trainer(**common, max_steps=2, limit_train_batches=2, logger=False, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                   every_n_train_steps=2)])
    trainer.fit(module, _llava_data(module))
    module = _mgm_module()
    evaluator = L.Trainer(**common, logger=TensorBoardLogger(tmp_path, name="eval"),
                          callbacks=[StepLabels(), GenerationEval(num_samples=2, max_new_tokens=3, batch_size=2,
                                                                  table_rows=1)])
    evaluator.validate(module, _llava_data(module), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    steps = _steps_by_tag(tmp_path / "eval" / "version_0")
    assert steps["val/loss"] == steps["val_gen/exact_match"] == steps["val_gen/samples/text_summary"] == {2}


def test_a_validation_inside_a_window_carries_the_steps_done(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:8]))
    data = ChatDataModule(str(train), val_path=str(VAL), tokenizer_path=str(TOKENIZER), batch_size=2,
                          eval_batch_size=8, shuffle=False)
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False), LoraArgs(preset="conservative"),
                           OptimArgs(warmup_ratio=0.0))
    data.connect(module.tokenizer, module.info)
    logger = _Recorder()
    seen = []

    class Steps(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append(trainer.global_step)

    # 4 micro-batches, accumulate 2: validation after micro-batch 3, i.e. after optimizer step 1, inside window 2
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, val_check_interval=3,
                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
                        callbacks=[StepLabels(), Steps()], default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert seen == [1]
    assert [step for step, metrics in logger.rows if "val/loss" in metrics] == [1]
    assert [step for step, metrics in logger.rows if "train/loss" in metrics] == [1, 2]
