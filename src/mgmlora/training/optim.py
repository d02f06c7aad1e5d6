"""Optimizer and learning-rate schedule settings (AdamW with warmup and cosine/linear/constant decay)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import get_scheduler

from mgmlora.errors import SettingsError


@dataclass
class OptimArgs:
    """AdamW and its schedule.

    Attributes:
        lr: peak learning rate, reached after warmup.
        weight_decay: decoupled weight decay on matrices (LoRA A/B); never on biases or norms.
        betas: Adam's moving-average coefficients.
        eps: Adam's epsilon.
        warmup_ratio: fraction of the total optimizer steps spent warming up linearly from 0.
        warmup_steps: absolute warmup length; overrides warmup_ratio when set.
        scheduler: decay after warmup: cosine (to min_lr_ratio * lr), linear (to 0) or constant.
        min_lr_ratio: floor of the cosine schedule, as a fraction of lr.
        fused: torch's fused AdamW (one kernel for all parameters instead of a few per tensor group). Lightning
            refuses gradient clipping with a fused optimizer under mixed precision, assuming it unscales gradients
            itself; under bf16 there is no loss scaler, so LoraLitModule clips the gradients directly then. Not
            with `16-mixed` (its scaler would leave clipping on scaled gradients).
        skip_nonfinite_steps: how many optimizer steps with a NaN/inf loss or gradient norm may be skipped (their
            update dropped) before the next one stops the run, counted over the whole run (a resumed fit goes on
            from its checkpoint's count); 0 stops at the first (mgmlora.training.finite).
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    fused: bool = False
    skip_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise SettingsError(f"model.optim: need lr > 0, 0 <= warmup_ratio < 1, 0 <= min_lr_ratio <= 1 (got "
                                f"lr={self.lr}, warmup_ratio={self.warmup_ratio}, min_lr_ratio={self.min_lr_ratio})")
        if self.skip_nonfinite_steps < 0:
            raise SettingsError(f"model.optim.skip_nonfinite_steps must be >= 0 (got {self.skip_nonfinite_steps})")


def decays_matrices(model: nn.Module) -> bool:
    """Whether `build_optimizer`'s first group (the one with weight decay) exists: some trainable matrix."""
    # ZeRO-3 partitions leave 1-D placeholders; `ds_shape` is DeepSpeed's record of the full shape
    return any(len(getattr(p, "ds_shape", p.shape)) >= 2 for p in model.parameters() if p.requires_grad)


def reapply(optimizer: torch.optim.Optimizer, scheduler, args: OptimArgs, decays: bool) -> None:
    """Puts `args`' peak lr, betas, eps and weight decay on a restored optimizer and schedule (an allowed change).

    A resumed fit restores both states whole, the checkpoint's lr included (mgmlora.training.resume). The groups are
    `build_optimizer`'s, in its order (`decays`: the first one decays); each group's lr becomes the new peak times the
    schedule's factor at its current step, as the schedule would have set it.
    """
    factors = getattr(scheduler, "lr_lambdas", None)  # build_optimizer's schedules are LambdaLRs
    if scheduler is not None:
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for i, group in enumerate(optimizer.param_groups):
        group["betas"], group["eps"] = tuple(args.betas), args.eps
        group["weight_decay"] = args.weight_decay if decays and i == 0 else 0.0
        group["initial_lr"] = args.lr
        group["lr"] = args.lr * (factors[i](scheduler.last_epoch) if factors else 1.0)


def build_optimizer(model: nn.Module, args: OptimArgs, total_steps: int) -> dict:
    """AdamW over the trainable parameters plus a per-step schedule, in Lightning's configure_optimizers format."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # the decayed group first (`decays_matrices`, `reapply`)
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # `fused` replaces torch's default multi-tensor (`foreach`) kernels; clipping with it: LoraLitModule.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=args.betas, eps=args.eps,
                                  fused=args.fused or None)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total_steps)
    name, extra = {
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": args.min_lr_ratio}),
        "linear": ("linear", {}),
        "constant": ("constant_with_warmup", {}),
    }[args.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                              scheduler_specific_kwargs=extra)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
