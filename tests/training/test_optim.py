"""The learning-rate schedule, the weight-decay groups and gradient clipping (mgmlora.training.optim, LoraLitModule).

Expected values are written from the formulas in OptimArgs' docstring, or computed with torch's own
`clip_grad_norm_` and a plain `torch.optim.AdamW`, never with mgmlora's code.
"""

import math

import lightning as L
import pytest
import torch
from torch import nn

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.models.args import ModelArgs
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs, build_optimizer
from tests.conftest import TOKENIZER, TRAIN, connect_data

LR, TOTAL = 0.1, 10


def _lrs(args: OptimArgs, total: int = TOTAL) -> list[float]:
    """The learning rate of each of `total` optimizer steps, as the scheduler sets it."""
    built = build_optimizer(nn.Linear(2, 2), args, total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("scheduler,expected", [
    # warmup_ratio 0.3 of 10 steps = 3 warmup steps: 0, lr/3, 2lr/3; then 7 decay steps
    ("cosine", [LR * t / 3 for t in range(3)]
     + [LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 3) / 7))) for t in range(3, 10)]),
    ("linear", [LR * t / 3 for t in range(3)] + [LR * (10 - t) / 7 for t in range(3, 10)]),
    ("constant", [LR * t / 3 for t in range(3)] + [LR] * 7),
])
def test_schedule_warms_up_linearly_then_decays_as_documented(scheduler, expected):
    lrs = _lrs(OptimArgs(lr=LR, warmup_ratio=0.3, scheduler=scheduler, min_lr_ratio=0.1))
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_warmup_steps_overrides_warmup_ratio():
    lrs = _lrs(OptimArgs(lr=LR, warmup_ratio=0.3, warmup_steps=5, scheduler="constant"))
    assert lrs == pytest.approx([0.0, LR / 5, 2 * LR / 5, 3 * LR / 5, 4 * LR / 5] + [LR] * 5)


def test_weight_decay_only_on_trainable_matrices():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad_(False)  # frozen: in no group
    optimizer = build_optimizer(model, OptimArgs(weight_decay=0.05), TOTAL)["optimizer"]
    groups = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [({id(model[0].weight)}, 0.05), ({id(model[0].bias), id(model[1].weight), id(model[1].bias)}, 0.0)]

    # and AdamW applies it so: with zero gradients only the decayed matrix moves, by lr * wd * w
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = 1.0
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"], before["0.weight"] * (1 - 0.05))
    for name in ("0.bias", "1.weight", "1.bias", "2.weight"):
        assert torch.equal(after[name], before[name]), name


class _StepCapture(L.Callback):
    """Trainable parameters before the first optimizer step, their unclipped gradients, and the values after it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.params = [p for p in pl_module.model.parameters() if p.requires_grad]
            self.before = [p.detach().clone() for p in self.params]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning clips after this hook
        self.grads = [p.grad.detach().clone() for p in self.params]
        self.lr = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after = [p.detach().clone() for p in self.params]


@pytest.mark.parametrize("fused,precision", [(False, "32-true"), (True, "32-true"), (True, "bf16-mixed")])
def test_gradient_clipping_clips_the_update(fused, precision, tmp_path):
    # eps = 1 makes AdamW's first update lr * g / (|g| + 1), nearly proportional to g for small gradients, so the
    # update shows the clipping (with the usual eps, Adam's first step is about lr * sign(g) whatever the scale).
    optim = OptimArgs(lr=0.1, eps=1.0, warmup_ratio=0.0, scheduler="constant", fused=fused)
    module = LoraLitModule(ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                                     gradient_checkpointing=False),
                           LoraArgs(preset="conservative", lora_dropout=0.0, init_lora_weights="gaussian"), optim)
    capture, clip = _StepCapture(), 0.05
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=1, gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[capture], plugins=[AdapterCheckpointIO()],
                        default_root_dir=tmp_path)
    torch.manual_seed(0)
    trainer.fit(module, connect_data(ChatDataModule(str(TRAIN), batch_size=2, shuffle=False), module))

    expected = [p.clone().requires_grad_(True) for p in capture.before]
    for p, g in zip(expected, capture.grads):
        p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(expected, clip)  # torch's own clipping, on copies
    assert norm > 2 * clip  # clipping is active, so the comparison below means something
    torch.optim.AdamW(expected, lr=capture.lr, eps=1.0, weight_decay=0.0).step()
    for got, want in zip(capture.after, expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)

    unclipped = [p.clone().requires_grad_(True) for p in capture.before]
    for p, g in zip(unclipped, capture.grads):
        p.grad = g.clone()
    torch.optim.AdamW(unclipped, lr=capture.lr, eps=1.0, weight_decay=0.0).step()
    assert any(not torch.allclose(got, u.detach(), rtol=1e-3) for got, u in zip(capture.after, unclipped))


def test_settings_out_of_range_are_rejected_configs():
    """SettingsError: a UsageError (exit 2) that is also the ValueError a dataclass check raises."""
    from mgmlora.errors import USAGE, SettingsError, classify
    from mgmlora.training.loss import SpeedArgs

    for build in (lambda: OptimArgs(lr=0.0), lambda: SpeedArgs(loss_chunk_size=0)):
        with pytest.raises(SettingsError) as refused:
            build()
        assert isinstance(refused.value, ValueError) and classify(refused.value) == ("user", USAGE)


def test_lora_settings_out_of_range_name_the_full_config_key():
    """As model.optim and model.speed do: the key a user passes is --model.lora.r, not --lora.r."""
    from mgmlora.errors import SettingsError
    from mgmlora.training.lora import LoraArgs

    with pytest.raises(SettingsError, match=r"^model\.lora\.r must be >= 1 \(got 0\); model\.lora\.target_modules is"):
        LoraArgs(r=0, target_modules=[])
