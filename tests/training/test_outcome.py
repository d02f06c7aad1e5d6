"""A fit that trains nothing fails with its reason; a finished one says what it trained and where (outcome.py)."""

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import classify
from mgmlora.training.callbacks import AdapterExport
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.finite import StalledError
from mgmlora.training.outcome import NothingTrainedError, RunOutcome, short_window
from tests.training.test_module import _module, _subset

SAMPLES, BATCH, ACCUMULATE = 16, 2, 2


def _fit(root, ckpt_path=None, extra=(), **trainer):
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = _module()
    data = ChatDataModule(_subset(root, SAMPLES), batch_size=BATCH, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(**{"max_steps": SAMPLES // (BATCH * ACCUMULATE), **trainer}, accelerator="cpu",
                        accumulate_grad_batches=ACCUMULATE, logger=L.pytorch.loggers.TensorBoardLogger(root, "run"),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, plugins=[AdapterCheckpointIO()],
                        callbacks=[RunOutcome(), ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                                                 every_n_train_steps=2, save_top_k=-1),
                                   AdapterExport(), *extra])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, data


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_finished_run_says_steps_samples_tokens_and_where_it_went(tmp_path):
    lines = _Lines()
    logger = logging.getLogger("lightning.pytorch")  # where rank_zero_info writes (it does not propagate)
    logger.addHandler(lines)
    try:
        trainer, data = _fit(tmp_path)
    finally:
        logger.removeHandler(lines)
    tokens = sum(s.num_supervised for s in data.splits["train"])  # one epoch: every sample once
    last = [line for line in lines.lines if line.startswith("mgmlora: trained")]
    assert len(last) == 1 and lines.lines[-1] == last[0], lines.lines  # the final line
    adapter = tmp_path / "run" / "version_0" / "adapter"
    assert last[0].startswith(f"mgmlora: trained 4 optimizer steps on {SAMPLES} samples ({tokens} supervised tokens) "
                              f"to step 4; adapter {adapter}; newest checkpoint {tmp_path / 'ckpt' / 'step=4.ckpt'}")
    assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("settings", "reason"), [
    ({"max_steps": 0}, "trainer.max_steps is 0"),
    ({"limit_train_batches": 0}, "trainer.limit_train_batches is 0"),
])
def test_a_run_that_trains_nothing_fails_with_its_reason_and_writes_no_adapter(tmp_path, settings, reason):
    with pytest.raises(NothingTrainedError) as failed:
        _fit(tmp_path, **settings)
    assert str(failed.value).startswith(f"the run trained nothing: {reason}") and "\n" not in str(failed.value)
    assert classify(failed.value) == ("user", 1)
    assert not (tmp_path / "run" / "version_0" / "adapter").exists()


def test_resuming_a_checkpoint_that_already_reached_max_steps_fails_and_keeps_the_first_adapter(tmp_path):
    _fit(tmp_path / "first", max_steps=2)
    first = tmp_path / "first" / "run" / "version_0" / "adapter" / "adapter_model.safetensors"
    before = first.read_bytes()
    with pytest.raises(NothingTrainedError, match="already at optimizer step 2, and trainer.max_steps is 2; raise"):
        _fit(tmp_path / "again", ckpt_path=tmp_path / "first" / "ckpt" / "step=2.ckpt", max_steps=2)
    assert not (tmp_path / "again" / "run" / "version_0" / "adapter").exists()
    with pytest.raises(NothingTrainedError, match="max_steps is 1; raise trainer.max_steps above 2"):
        _fit(tmp_path / "fewer", ckpt_path=tmp_path / "first" / "ckpt" / "step=2.ckpt", max_steps=1)
    assert first.read_bytes() == before


def test_an_epoch_shorter_than_one_window_is_said_at_the_start_and_each_step_takes_what_the_epoch_has(tmp_path):
    said = rf"accumulate_grad_batches is {ACCUMULATE}, but an epoch has 1 micro-batch\(es\) per device.*takes 1, not 2"
    with pytest.warns(UserWarning, match=said):
        trainer, _ = _fit(tmp_path, limit_train_batches=1, max_steps=3)
    assert trainer.global_step == 3 and trainer.current_epoch == 3  # one micro-batch per step, per epoch


def test_whole_windows_and_a_short_last_one_are_not_warned_about():
    assert short_window(SAMPLES // BATCH, ACCUMULATE) is None  # 8 micro-batches, windows of 2
    assert short_window(7, 2) is None  # the epoch's last window is short, the others are whole
    assert short_window(float("inf"), 128) is None  # an iterable dataset of unknown length
    assert short_window(0, 2) is None  # nothing to train: NothingTrainedError's case
    assert "takes 127, not 128" in short_window(127, 128)


def test_a_fit_failing_before_training_leaves_no_version_directory_and_a_trained_one_keeps_its_events(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}\n')
    module, outcome = _module(), RunOutcome()
    outcome.fresh_dirs = {tmp_path / "run" / "version_0"}  # what MgmCLI.before_fit finds for a new version_N
    data = ChatDataModule(str(bad), batch_size=BATCH)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, "run"),
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, callbacks=[outcome])
    with pytest.raises(ValueError, match="content must be a string"):
        trainer.fit(module, data)
    assert not (tmp_path / "run" / "version_0").exists()  # the logger had opened an event file there

    _fit(tmp_path / "ok")  # the finished fit's directory keeps its events
    assert list((tmp_path / "ok" / "run" / "version_0").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("fn,exception,fresh,left", [
    ("fit", ValueError("bad record"), True, None),  # the directory it made goes, with all it wrote
    ("fit", SystemExit(143), True, "all"),  # Lightning's SIGTERMException: PreemptionCheckpoint saves into the run next
    ("fit", KeyboardInterrupt(), True, "all"),
    ("test", ValueError("bad image"), True, None),  # an evaluation of no checkpoint, in a version_N it made
    (TrainerFn.TESTING, ValueError("bad image"), True, None),  # as a Trainer gives it: str() is "TrainerFn.TESTING"
    (TrainerFn.VALIDATING, ValueError("bad image"), True, None),
    ("validate", ValueError("bad image"), False, {"config.yaml", "validate_config.yaml"}),  # in the checkpoint's run
])
def test_a_failed_fit_before_training_or_failed_evaluation_takes_its_own_files_away(tmp_path, fn, exception, fresh,
                                                                                   left):
    from types import SimpleNamespace

    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, "run")
    outcome = RunOutcome()
    logger.experiment.flush()  # the event file the logger opens at setup
    folder = Path(logger.log_dir)
    written = {"config.yaml" if fn == "fit" else f"{TrainerFn(fn).value}_config.yaml"}  # as MgmCLI saves it
    written |= {"config.yaml"} if not fresh else set()  # a run's directory holds the fit's config
    for name in written:
        (folder / name).write_text("seed_everything: 0\n")
    everything = {p.name for p in folder.iterdir()}
    outcome.fresh_dirs = {folder} if fresh else set()
    trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), is_global_zero=True, loggers=[logger])
    outcome.on_exception(trainer, None, exception)
    if left is None:
        assert not folder.exists()
    else:
        assert {p.name for p in folder.iterdir()} == (everything if left == "all" else left)


def test_an_event_file_with_unwritten_events_does_not_come_back_after_lightning_closes_the_logger(tmp_path):
    # TensorBoard's writer appends by file name: one removed while events were still buffered came back when
    # Lightning's `_interrupt` closed the logger right after `on_exception` (an intermittent CI failure)
    from types import SimpleNamespace

    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, "run")
    outcome = RunOutcome()
    outcome.fresh_dirs = {Path(logger.log_dir)}
    for step in range(3):
        logger.experiment.add_scalar("x", float(step), step)  # buffered, not flushed
    trainer = SimpleNamespace(state=SimpleNamespace(fn="validate"), is_global_zero=True, loggers=[logger])
    outcome.on_exception(trainer, None, ValueError("bad image"))
    logger.finalize("failed")  # what lightning.pytorch.trainer.call._interrupt does next
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_each_logger_s_directory_is_judged_by_itself(tmp_path):
    from types import SimpleNamespace

    new = L.pytorch.loggers.TensorBoardLogger(tmp_path, "run")
    (tmp_path / "other" / "mine").mkdir(parents=True)  # the user's, empty, named as the second logger's version
    named = L.pytorch.loggers.TensorBoardLogger(tmp_path, "other", version="mine")
    outcome = RunOutcome()
    outcome.fresh_dirs = {Path(new.log_dir)}  # as MgmCLI.before_fit finds them
    for logger in (new, named):
        logger.experiment.flush()
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), is_global_zero=True, loggers=[new, named])
    outcome.on_exception(trainer, None, ValueError("bad record"))
    assert not Path(new.log_dir).exists()
    assert Path(named.log_dir).is_dir() and not any(Path(named.log_dir).iterdir())  # only its new event file went


class _ZeroGradientsFrom(L.Callback):
    """Zeroes every gradient from optimizer step `first` on, as a saturated model's are (callbacks run first)."""

    def __init__(self, first: int):
        self.first = first

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 >= self.first:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.zero_()


def test_a_fit_whose_gradients_stay_exactly_zero_to_the_end_fails_and_writes_no_adapter(tmp_path):
    with pytest.raises(StalledError, match="exactly 0 at every optimizer step from step 2 to the last, step 4") as e:
        _fit(tmp_path / "stalled", extra=[_ZeroGradientsFrom(2)])
    assert classify(e.value)[1] == 1 and "no adapter was written" in str(e.value)
    assert not (tmp_path / "stalled" / "run" / "version_0" / "adapter").exists()
    trainer, _ = _fit(tmp_path / "last", extra=[_ZeroGradientsFrom(4)])  # one zero step at the end: not a stall
    assert trainer.global_step == 4


def _stage_1(root, images, max_steps, ckpt_path=None):
    """A tiny-MGM fit training only the projector (trainable.llm frozen) on 8 records, those with an image first."""
    import json

    from mgmlora.data.llava_datamodule import LlavaDataModule
    from mgmlora.training.lora import LoraArgs
    from mgmlora.training.module import LoraLitModule
    from mgmlora.training.optim import OptimArgs
    from mgmlora.training.trainable import Trainability
    from tests.conftest import ASSETS
    from tests.training.test_trainable import TINY_MGM

    records = json.loads((ASSETS / "llava" / "llava_demo.json").read_text())
    picked = [r for r in records if "image" in r][:images] + [r for r in records if "image" not in r][:8 - images]
    (root / "train.json").write_text(json.dumps(picked))
    torch.manual_seed(0)
    module = LoraLitModule(TINY_MGM, LoraArgs(), OptimArgs(lr=1e-3, warmup_ratio=0),
                           Trainability(llm="frozen", projector="full"))
    data = LlavaDataModule(str(root / "train.json"), image_folder=str(ASSETS / "llava"), batch_size=2, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, use_distributed_sampler=False, limit_val_batches=0,
                        callbacks=[RunOutcome()], default_root_dir=root, plugins=[AdapterCheckpointIO()])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("images", [4, 0])
def test_a_stage_1_run_whose_last_windows_are_text_only_is_no_stall(tmp_path, images):
    # Only the projector trains; text-only windows leave its gradient exactly zero. Windows with images first, then
    # text-only ones: that is a finished run, not a stalled one; with no image at all the run trained nothing.
    if images:
        _, module = _stage_1(tmp_path, images, max_steps=4)
        assert module.finite.counted == 2 and module.finite.unreached == 2 and module.finite.stalled() is None
    else:
        with pytest.raises(NothingTrainedError, match="none of its 4 optimizer step"):
            _stage_1(tmp_path, images, max_steps=4)


def test_a_resumed_stage_1_run_whose_remaining_windows_are_text_only_trained_before_its_checkpoint(tmp_path):
    trainer, _ = _stage_1(tmp_path, 4, max_steps=2)  # the two windows with images
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    _, module = _stage_1(tmp_path, 4, max_steps=4, ckpt_path=tmp_path / "step2.ckpt")
    # the checkpoint carries the two counted image windows; this fit's two windows reached nothing
    assert module.finite.counted == 2 and module.finite.unreached == 2 and not module.finite.partial


def test_a_stall_that_began_before_the_resumed_checkpoint_is_named_from_its_first_step(tmp_path):
    # zero gradients from step 2: the first fit ends at step 2 (one zero step is no stall), the resumed one at step 4
    _fit(tmp_path, extra=[_ZeroGradientsFrom(2)], max_steps=2)
    with pytest.raises(StalledError, match="from step 2 to the last, step 4"):  # "from step 3" counting this fit only
        _fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt", extra=[_ZeroGradientsFrom(2)])


def test_counts_that_began_at_a_checkpoint_without_them_stay_partial_through_a_second_resume(tmp_path):
    # steps 1-2 train (image windows), steps 3-4 reach nothing (text only); the step-2 checkpoint predates the saved
    # counters. Resumed to step 3 and again to step 4, the run trained (steps 1-2): no "trained nothing" verdict.
    from mgmlora.training.finite import FINITE_KEY

    trainer, _ = _stage_1(tmp_path, 4, max_steps=2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    state = tmp_path / "step2.ckpt" / "trainer_state.pt"
    checkpoint = torch.load(state, weights_only=True)
    del checkpoint[FINITE_KEY]  # as a checkpoint written before the guard's counters were saved
    torch.save(checkpoint, state)
    trainer, module = _stage_1(tmp_path, 4, max_steps=3, ckpt_path=tmp_path / "step2.ckpt")
    assert module.finite.partial and module.finite.counted == 0 and module.finite.unreached == 1
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, module = _stage_1(tmp_path, 4, max_steps=4, ckpt_path=tmp_path / "step3.ckpt")  # raised NothingTrainedError
    assert module.finite.partial and module.finite.unreached == 2


class _LoggingEval(L.LightningModule):
    """Logs val/loss and test/loss at the epoch's end, as LoraLitModule does; `fail_test` makes test_step raise."""

    def __init__(self, fail_test=False):
        super().__init__()
        self.layer, self.fail_test = torch.nn.Linear(2, 1), fail_test

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)

    test_dataloader = val_dataloader

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch).sum())

    def test_step(self, batch, batch_idx):
        if self.fail_test:
            raise ValueError("bad image")
        self.log("test/loss", self.layer(batch).sum())


class _FailsAtEnd(L.Callback):
    def on_validation_end(self, trainer, pl_module):
        raise RuntimeError("the report failed")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


def test_a_failed_evaluation_keeps_the_metrics_it_or_an_earlier_command_logged(tmp_path):
    def trainer(root, *callbacks):
        return L.Trainer(accelerator="cpu", logger=L.pytorch.loggers.TensorBoardLogger(root, "run", version="v"),
                         callbacks=[RunOutcome(), *callbacks], enable_progress_bar=False, enable_model_summary=False)

    # a callback failing after the evaluation logged its metrics: they stay (before the fix the event file went)
    with pytest.raises(RuntimeError, match="the report failed"):
        trainer(tmp_path / "late", _FailsAtEnd()).validate(_LoggingEval(), verbose=False)
    assert "val/loss" in _scalars(tmp_path / "late" / "run" / "v")
    # one Trainer: a validate that succeeded, then a test that fails; the validate's events stay
    both = trainer(tmp_path / "both")
    both.validate(_LoggingEval(), verbose=False)
    with pytest.raises(ValueError, match="bad image"):
        both.test(_LoggingEval(fail_test=True), verbose=False)
    assert "val/loss" in _scalars(tmp_path / "both" / "run" / "v")
    # a failure before any metric still takes its empty event file away
    with pytest.raises(ValueError, match="bad image"):
        trainer(tmp_path / "early").test(_LoggingEval(fail_test=True), verbose=False)
    assert not list((tmp_path / "early" / "run" / "v").glob("events.out.tfevents.*"))
