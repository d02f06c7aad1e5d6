"""Resume refuses settings that change what the remaining steps compute, unless the user says so.

A checkpoint continues a run: its optimizer moments, its schedule position and its data position only mean what they
did if the rest of the run trains the same way. LoRA's own shape (rank, alpha, targets, rsLoRA/DoRA) is compared
with the saved adapter config by LoraLitModule; this module records and compares the rest of what changes the math
of an optimizer step: LoRA dropout, gradient accumulation, micro-batch size, samples per window, the number of
data-parallel ranks (together the global batch) and precision. Each checkpoint stores them under `RUN_KEY`;
`fit --ckpt_path` with any of them different stops before training with every difference listed, unless
`model.allow_resume_changes: true` says the change is meant (then each difference is logged instead). Checkpoints
written before this check carry none and are not compared.
"""

from __future__ import annotations

from typing import Any

from mgmlora.errors import UsageError

RUN_KEY = "mgmlora_run_math"

# the setting's config key, named in the message
KEYS = {"lora_dropout": "model.lora.lora_dropout", "accumulate_grad_batches": "trainer.accumulate_grad_batches",
        "batch_size": "data.init_args.batch_size", "max_tokens": "data.init_args.max_tokens",
        "window_samples": "data.init_args.window_samples",
        "world_size": "trainer.devices x trainer.num_nodes (ranks)", "precision": "trainer.precision"}


def run_math(trainer: Any, lora_dropout: float | None) -> dict:
    """The settings of the running fit that RUN_KEY records (what the datamodule does not say is left out)."""
    hp = getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {}
    values = {"lora_dropout": lora_dropout, "accumulate_grad_batches": trainer.accumulate_grad_batches,
              "batch_size": hp.get("batch_size"), "max_tokens": hp.get("max_tokens"),
              "window_samples": hp.get("window_samples"), "world_size": trainer.world_size,
              "precision": str(trainer.precision)}
    return {k: v for k, v in values.items() if v is not None or k in ("max_tokens", "window_samples")}


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


__all__ = ["RUN_KEY", "check_resume_math", "resume_differences", "run_math"]
