"""Resume refuses settings that change what the remaining steps compute, unless the user says so.

A checkpoint continues a run: its optimizer moments, its schedule position and its data position only mean what they
did if the rest of the run trains the same way. LoRA's own shape (rank, alpha, targets, rsLoRA/DoRA) is compared
with the saved adapter config by LoraLitModule; this module records and compares the rest of what changes the math
of an optimizer step: LoRA dropout, gradient accumulation, micro-batch size, samples per window, the number of
data-parallel ranks (together the global batch) and precision. Each checkpoint stores them under `RUN_KEY`;
`fit --ckpt_path` with any of them different stops before training with every difference listed, unless
`model.allow_resume_changes: true` says the change is meant (then each difference is logged instead). Checkpoints
written before this check carry none and are not compared.

The optimizer's own settings (peak learning rate, betas, eps, weight decay) are read from the checkpoint's optimizer
and schedule states (`saved_optimizer_settings`): Lightning restores those states whole, so a changed `model.optim.lr`
would otherwise be silently replaced by the checkpoint's. They are compared the same way; an allowed change is put
back onto the restored optimizer (mgmlora.training.optim.reapply), so it takes effect from the first resumed step.
The schedule's shape (warmup, decay, total steps) is rebuilt from the config on every start and needs no check.
"""

from __future__ import annotations

from typing import Any

from mgmlora.errors import UsageError

RUN_KEY = "mgmlora_run_math"

# the setting's config key, named in the message
KEYS = {"lora_dropout": "model.lora.lora_dropout", "accumulate_grad_batches": "trainer.accumulate_grad_batches",
        "batch_size": "data.init_args.batch_size", "max_tokens": "data.init_args.max_tokens",
        "window_samples": "data.init_args.window_samples",
        "world_size": "trainer.devices x trainer.num_nodes (ranks)", "precision": "trainer.precision",
        "lr": "model.optim.lr", "betas": "model.optim.betas", "eps": "model.optim.eps",
        "weight_decay": "model.optim.weight_decay"}


def run_math(trainer: Any, lora_dropout: float | None) -> dict:
    """The settings of the running fit that RUN_KEY records (what the datamodule does not say is left out)."""
    hp = getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {}
    values = {"lora_dropout": lora_dropout, "accumulate_grad_batches": trainer.accumulate_grad_batches,
              "batch_size": hp.get("batch_size"), "max_tokens": hp.get("max_tokens"),
              "window_samples": hp.get("window_samples"), "world_size": trainer.world_size,
              "precision": str(trainer.precision)}
    return {k: v for k, v in values.items() if v is not None or k in ("max_tokens", "window_samples")}


def saved_optimizer_settings(checkpoint: dict, restored_groups: list[dict] | None = None) -> dict:
    """The peak lr, betas, eps and weight decay a checkpoint's optimizer ran with, as far as its states tell.

    The peak lr is the schedule's base lr (a plain and a DeepSpeed checkpoint both keep the schedule); betas, eps and
    the weight decay of the decayed group (the largest; the other group has none) come from the optimizer state.
    DeepSpeed keeps that state in its own files, out of Lightning's checkpoint dict, and its engine has restored it
    before `on_load_checkpoint` runs: `restored_groups` (the engine optimizer's param groups) stand in for it then.
    """
    settings: dict = {}
    schedulers = checkpoint.get("lr_schedulers") or []
    if schedulers and schedulers[0].get("base_lrs"):
        settings["lr"] = float(schedulers[0]["base_lrs"][0])
    optimizers = checkpoint.get("optimizer_states") or []
    groups = optimizers[0].get("param_groups") if optimizers and isinstance(optimizers[0], dict) else restored_groups
    if groups:
        settings["betas"] = [float(b) for b in groups[0]["betas"]]
        settings["eps"] = float(groups[0]["eps"])
        settings["weight_decay"] = max(float(g.get("weight_decay", 0.0)) for g in groups)
    return settings


def optimizer_settings(lr: float, betas, eps: float, weight_decay: float) -> dict:
    """The running fit's counterpart of `saved_optimizer_settings` (weight_decay: 0 when no group decays)."""
    return {"lr": float(lr), "betas": [float(b) for b in betas], "eps": float(eps), "weight_decay": float(weight_decay)}


def resume_differences(saved: dict | None, current: dict) -> list[str]:
    """`key: checkpoint X vs now Y` for every recorded setting that differs (none for checkpoints without a record)."""
    if not saved:
        return []
    return [f"{KEYS.get(k, k)}: checkpoint {saved[k]!r} vs now {current[k]!r}"
            for k in saved if k in current and saved[k] != current[k]]


def check_resume_math(saved: dict | None, current: dict, allow: bool, log) -> None:
    """Raises UsageError listing the differences, or logs them through `log` when `allow` (module docstring)."""
    diffs = resume_differences(saved, current)
    if not diffs:
        return
    if allow:
        log("mgmlora: resuming with changed settings (model.allow_resume_changes: true): " + "; ".join(diffs))
        return
    raise UsageError("cannot resume: the checkpoint was trained with other settings that change each optimizer step ("
                     + "; ".join(diffs) + "). Set them back to resume this run exactly, or set "
                     "model.allow_resume_changes: true to continue with the new ones on purpose.")


__all__ = ["RUN_KEY", "check_resume_math", "optimizer_settings", "resume_differences", "run_math",
           "saved_optimizer_settings"]
