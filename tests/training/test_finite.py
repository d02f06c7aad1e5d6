"""A NaN/inf loss or gradient norm stops the run before its update; a bounded number may be skipped (finite.py)."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.errors import classify
from mgmlora.training.callbacks import AdapterExport, check_finite_tensors
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.finite import FiniteGuard, NonFiniteError
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from tests.training.test_module import _module, _subset

ACCUMULATE = 2


class _PoisonGrad(L.Callback):
    """Makes one gradient NaN after the backward of the window of the given optimizer steps (1-based)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 in self.steps:
            p = next(p for p in pl_module.model.parameters() if p.requires_grad)
            p.grad[0, 0] = float("nan")


class _PoisonLoss(L.Callback):
    """Makes the language model's logits inf during the window of the given optimizer step (1-based)."""

    def __init__(self, step):
        self.step, self.handle = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and self.handle is None:
            norm = pl_module.loaded.language_model().model.norm  # the hidden states every loss implementation reads
            self.handle = norm.register_forward_hook(lambda module, args, out: out * float("inf"))


def _fit(root, *callbacks, module=None, max_steps=4, ckpt_path=None):
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = module or _module()
    data = ChatDataModule(_subset(root, 16), batch_size=2, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=ACCUMULATE,
                        logger=L.pytorch.loggers.TensorBoardLogger(root, "run"), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        plugins=[AdapterCheckpointIO()], callbacks=[
                            *callbacks, ModelCheckpoint(dirpath=root / "ckpt", filename="{step}",
                                                        every_n_train_steps=1, save_top_k=-1), AdapterExport()])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def _trained(module):
    return {k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad}


def _adapter_equal(saved, module):
    live = {k.replace(".default", ""): v for k, v in _trained(module).items()}
    live = {k.removeprefix("base_model.model."): v for k, v in live.items()}
    return all(torch.equal(v, live[k.removeprefix("base_model.model.")]) for k, v in saved.items())


def test_a_nan_gradient_stops_the_run_before_its_update_and_writes_no_adapter(tmp_path):
    module = _module()
    with pytest.raises(NonFiniteError) as stopped:
        _fit(tmp_path, _PoisonGrad([3]), module=module)
    message = str(stopped.value)
    assert message.startswith("optimizer step 3: train/grad_norm = nan;") and "\n" not in message
    assert "step=2.ckpt" in message  # where to resume from
    assert classify(stopped.value) == ("user", 1)  # one line, exit 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt", "step=2.ckpt"]
    assert not (tmp_path / "run" / "version_0" / "adapter").exists()
    weights = _trained(module)
    assert all(torch.isfinite(v).all() for v in weights.values())
    at_step_2 = load_file(tmp_path / "ckpt" / "step=2.ckpt" / "adapter_model.safetensors")
    assert at_step_2 and _adapter_equal(at_step_2, module)  # step 3's update was not applied


def test_an_infinite_loss_is_named_as_the_loss(tmp_path):
    with pytest.raises(NonFiniteError, match=r"^optimizer step 2: train/loss = (nan|inf);"):
        _fit(tmp_path, _PoisonLoss(2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt"]


def test_skip_nonfinite_steps_drops_that_many_updates_and_stops_at_the_next(tmp_path):
    def module(skips):
        return LoraLitModule(_module().model_args, LoraArgs(preset="balanced", init_lora_weights="gaussian",
                                                            lora_dropout=0.0),
                             OptimArgs(lr=1e-2, warmup_ratio=0.0, skip_nonfinite_steps=skips))

    skipped, trainer = _fit(tmp_path / "one", _PoisonGrad([3]), module=module(1))
    assert trainer.global_step == 4 and skipped.finite.skipped == 1
    ckpt = tmp_path / "one" / "ckpt"
    step2, step3, step4 = (load_file(ckpt / f"step={n}.ckpt" / "adapter_model.safetensors") for n in (2, 3, 4))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # step 3 changed nothing
    assert any(not torch.equal(step3[k], step4[k]) for k in step3)  # step 4 trained again
    assert (tmp_path / "one" / "run" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()

    with pytest.raises(NonFiniteError, match=r"^optimizer step 4: .*1 non-finite step\(s\) already skipped"):
        _fit(tmp_path / "two", _PoisonGrad([2, 4]), module=module(1))


def test_a_resumed_fit_has_only_the_skips_its_checkpoint_had_left(tmp_path):
    # skip_nonfinite_steps counts over the run: an unbroken run that skipped step 1 stops at step 3; so does a fit
    # resumed from step 2 (before the guard's counters were saved, the resumed fit had its whole allowance again)
    def module():
        return LoraLitModule(_module().model_args, LoraArgs(preset="balanced", init_lora_weights="gaussian",
                                                            lora_dropout=0.0),
                             OptimArgs(lr=1e-2, warmup_ratio=0.0, skip_nonfinite_steps=1))

    first, _ = _fit(tmp_path, _PoisonGrad([1]), module=module(), max_steps=2)
    assert first.finite.skipped == 1
    with pytest.raises(NonFiniteError, match=r"^optimizer step 3: .*1 non-finite step\(s\) already skipped"):
        _fit(tmp_path, _PoisonGrad([3]), module=module(), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")


def test_the_guard_state_round_trips_and_a_checkpoint_without_it_gives_no_nothing_trained_verdict():
    guard = FiniteGuard(max_skipped=3)
    for step, (norm, reached) in enumerate([(math.inf, True), (1.0, True), (0.0, True), (0.0, False)], start=1):
        guard.check(step, {"train/grad_norm": torch.tensor(norm)}, reached=reached)
    state = guard.state_dict()
    assert state == {"skipped": 1, "zero_since": 3, "last_step": 3, "counted": 2, "unreached": 1,
                     "scaler_skipped": 0, "partial": False}  # by hand
    resumed = FiniteGuard(max_skipped=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    old = FiniteGuard()  # a checkpoint written before the counters were saved: this fit's counts only
    old.load_state_dict(None)
    old.check(3, {"train/grad_norm": torch.tensor(0.0)}, reached=False)
    assert old.unreached == 1 and old.counted == 0 and old.untrained() is None


def test_a_fit_whose_every_step_the_fp16_loss_scaler_skipped_trained_nothing():
    # DeepSpeed's dynamic fp16 scaler drops an overflowing step's update itself (LoraLitModule.optimizer_step counts
    # it); a fit of only such steps exits as having trained nothing, one applied step is enough to train
    guard = FiniteGuard()
    guard.scaler_skipped = 3
    assert guard.untrained() == ("none of its 3 optimizer step(s) trained: DeepSpeed's fp16 loss scaler skipped 3 "
                                 "optimizer step(s) for overflowing gradients (no update applied; trainer.precision "
                                 "bf16-mixed avoids the scaler)")
    guard.check(4, {"train/grad_norm": 2.0})
    assert guard.counted == 1 and guard.untrained() is None
    mixed = FiniteGuard()
    mixed.scaler_skipped, mixed.unreached = 2, 1
    assert mixed.untrained().startswith("none of its 3 optimizer step(s) trained: 1 optimizer step(s) had no sample")
    # a checkpoint written before the scaler's count was saved (session 37's counters) loads it as 0
    older = FiniteGuard()
    older.load_state_dict({"skipped": 0, "zero_since": None, "last_step": 2, "counted": 2, "unreached": 0,
                           "partial": False})
    assert older.scaler_skipped == 0 and older.counted == 2


def test_the_guard_decides_from_the_first_non_finite_value_and_the_agreement_of_all_ranks():
    guard = FiniteGuard(max_skipped=1)
    assert guard.check(5, {"loss": torch.tensor(2.0), "norm": None}) is False
    assert guard.check(6, {"loss": 1.0, "norm": torch.tensor(math.inf)}) is True and guard.skipped == 1
    with pytest.raises(NonFiniteError, match="^optimizer step 7: loss = nan;"):
        guard.check(7, {"loss": math.nan, "norm": math.inf})
    # another rank saw NaN: this rank's values are finite, it stops too instead of waiting in the next collective
    with pytest.raises(NonFiniteError, match="on another rank"):
        FiniteGuard().check(1, {"loss": 1.0}, agree=lambda bad: True)
    with pytest.raises(NonFiniteError, match="stopped after applying it"):
        FiniteGuard(max_skipped=5).check(1, {"norm": math.nan}, can_skip=False, applied=True)
    with pytest.raises(ValueError, match="skip_nonfinite_steps"):
        OptimArgs(skip_nonfinite_steps=-1)


def test_the_final_export_refuses_nan_tensors(tmp_path):
    with pytest.raises(NonFiniteError, match="tensor b holds NaN or inf"):
        check_finite_tensors({"a": torch.zeros(2), "b": torch.tensor([0.0, math.nan])}, tmp_path / "adapter")
    check_finite_tensors({"a": torch.zeros(2), "ids": torch.tensor([1, 2])}, tmp_path / "adapter")


@pytest.mark.parametrize(("norms", "stalled"), [
    ([1.0, 0.5, 0.0, 0.0], "from step 3 to the last, step 4"),
    ([0.0, 0.0, 0.3], None),  # it learned again
    ([1.0, 0.0], None),  # a single zero step at the end is not a stretch
    ([0.0, 0.0], "from step 1 to the last, step 2"),
])
def test_stalled_names_the_stretch_of_exactly_zero_gradient_norms_that_runs_to_the_end(norms, stalled):
    guard = FiniteGuard()
    for step, norm in enumerate(norms, start=1):
        assert guard.check(step, {"train/loss": 2.0, "train/grad_norm": torch.tensor(norm)}) is False
    assert guard.stalled() is None if stalled is None else stalled in guard.stalled()


@pytest.mark.parametrize(("steps", "stalled"), [
    ([(1.0, True), (0.0, False), (0.0, False)], None),  # text-only windows of an image-path-only run
    ([(1.0, True), (0.0, True), (0.0, False), (0.0, True)], "from step 2 to the last, step 4"),  # skipped, not reset
    ([(0.0, True), (0.3, False), (0.0, True)], None),  # a nonzero norm still resets, reached or not
])
def test_a_window_that_reached_no_trainable_parameter_is_left_out_of_a_stall(steps, stalled):
    guard = FiniteGuard()
    for step, (norm, reached) in enumerate(steps, start=1):
        assert guard.check(step, {"train/grad_norm": torch.tensor(norm)}, reached=reached) is False
    assert guard.stalled() is None if stalled is None else stalled in guard.stalled()


def test_ranks_agree_whether_any_window_reached_a_trainable_parameter():
    asked, other_rank = [], [False, True] * 2  # per step: its loss and norm are finite; its window reached one

    def agree(local):
        asked.append(local)
        return local or other_rank[len(asked) - 1]

    guard = FiniteGuard()
    for step in (1, 2):
        guard.check(step, {"train/grad_norm": torch.tensor(0.0)}, agree, reached=False)
    assert asked == [False, False, False, False]  # the non-finite vote, then the reach vote, at each step
    assert "from step 1 to the last, step 2" in guard.stalled()


def test_the_stop_message_counts_the_skips_the_run_used_not_the_allowance():
    # a resumed fit whose config allows fewer skips than its checkpoint used (2 used, the config now says 0)
    guard = FiniteGuard(max_skipped=0)
    guard.load_state_dict({"skipped": 2, "zero_since": None, "last_step": 10, "counted": 10, "unreached": 0})
    with pytest.raises(NonFiniteError, match=r"^optimizer step 11: .*, 2 non-finite step\(s\) already skipped "
                                             r"\(model\.optim\.skip_nonfinite_steps=0\)"):
        guard.check(11, {"train/loss": torch.tensor(float("nan"))})
