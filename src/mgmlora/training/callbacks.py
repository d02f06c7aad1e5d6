"""Callbacks: throughput logging, the final adapter export, the model summary, one step per optimizer step's events.

Stopping on signals is preemption.py's.

Kept out of the LightningModule so that `training_step` stays about the loss. Lightning's own ThroughputMonitor
needs per-batch lambdas (not expressible in YAML) and logs samples, not supervised tokens; this one is ~50 lines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info

from mgmlora.batch import Batch
from mgmlora.models.identity import BASE_KEY
from mgmlora.training.checkpoint import RUN_SETTINGS, TRAINABLES, staged_dir, write_adapter, write_tensors
from mgmlora.training.finite import NonFiniteError
from mgmlora.training.lightning_private import format_summary_table, logging_step

if TYPE_CHECKING:
    from mgmlora.training.module import LoraLitModule


def batch_positions(batch: Batch, image_tokens: int) -> torch.Tensor:
    """Positions the model computes for a padded micro-batch, as a 0-d tensor on the batch's device (no host sync).

    Non-padding tokens from the attention mask, each image placeholder counted as the `image_tokens` embeddings it
    expands to (0 for text-only models).
    """
    tokens = batch.attention_mask.sum()
    if image_tokens:
        tokens = tokens + batch.image_count() * (image_tokens - 1)
    return tokens


class ThroughputMonitor(L.Callback):
    """Logs tokens/s, supervised tokens/s and step time per optimizer step, and peak GPU memory on CUDA.

    Also running totals since the start of the run: tokens seen and time spent in optimizer steps (validation and
    checkpointing excluded), whose ratio is the run's whole-run throughput however often metrics are logged. They are
    part of every checkpoint, so a resumed run carries them on instead of starting again from zero.

    Token counts are those of this rank (`batch_positions`); multiply by the number of ranks for the job's total
    (a resume onto another number of ranks, `model.allow_resume_changes`, carries on rank 0's totals).
    They are summed on the device and read once per optimizer step, where the monitor synchronises anyway: a host
    read per micro-batch would stall the CPU until the GPU finished each one, and the next micro-batch's launches would
    start on an idle GPU. Peak memory is `torch.cuda.max_memory_allocated` since the previous optimizer step, in GiB,
    with reserved memory beside it (the allocator's footprint, what `nvidia-smi` roughly shows).
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._tokens: torch.Tensor | int = 0
        self._supervised: torch.Tensor | int = 0
        self._seen = 0  # tokens since the start of the run (this rank), logged as a running total
        self._train_time = 0.0  # seconds spent in optimizer steps since the start of the run, logged as a running total

    def state_dict(self) -> dict[str, float]:
        """The running totals, saved with each checkpoint (Lightning's callback state)."""
        return {"tokens_seen": self._seen, "train_time_s": self._train_time}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Carries the running totals of the checkpoint a fit resumes from."""
        self._seen, self._train_time = int(state_dict["tokens_seen"]), float(state_dict["train_time_s"])

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module: LoraLitModule, outputs, batch, batch_idx) -> None:  # noqa: D102
        self._tokens = self._tokens + batch_positions(batch, pl_module.info.image_tokens)
        self._supervised = self._supervised + batch.supervised_tokens()
        if not pl_module.window.ended:  # the optimizer steps after a window's last micro-batch only
            return
        self._sync(pl_module)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens, supervised = int(self._tokens), int(self._supervised)
        self._seen += tokens
        self._train_time += elapsed
        # tokens_seen / train_time_s at any logged step is the run's whole throughput so far (mgmlora.tools.report)
        metrics = {"perf/tokens_per_s": tokens / elapsed, "perf/step_time_s": elapsed,
                   "perf/supervised_tokens_per_s": supervised / elapsed, "perf/tokens_seen": float(self._seen),
                   "perf/train_time_s": self._train_time}
        if pl_module.device.type == "cuda":
            metrics["perf/peak_mem_alloc_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/peak_mem_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._t0, self._tokens, self._supervised = None, 0, 0


class AdapterExport(L.Callback):
    """Writes the final adapter in PEFT format to `<log_dir>/<dirname>` when fit ends.

    The directory loads with plain `peft.PeftModel.from_pretrained(base_model, path)`; other trained weights (MGM's
    projector and mining modules) go beside it in `non_lora_trainables.safetensors`. It is written into a temporary
    sibling and renamed into place (mgmlora.training.checkpoint.staged_dir), so a crash or a full disk never leaves a
    half-written adapter under the final name; a tensor holding NaN or inf is refused instead of written.
    """

    def __init__(self, dirname: str = "adapter") -> None:
        self.dirname = dirname
        self.written: Path | None = None  # the directory of the latest export (RunOutcome names it in its last line)

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: D102
        self.export(trainer, pl_module)

    def export(self, trainer: L.Trainer, pl_module: LoraLitModule) -> None:
        """Writes the adapter as it is now; every rank must call it (ZeRO-3 gathers). Also used on preemption."""
        if trainer.log_dir is None:
            return
        out = Path(trainer.log_dir) / self.dirname
        adapter, trainables = pl_module.trained_on_host()  # the one gather (a collective under ZeRO-3)
        if not trainer.is_global_zero:
            return
        check_finite_tensors({**adapter, **trainables}, out)
        with staged_dir(out) as tmp:
            if pl_module.plan is not None:
                write_adapter(tmp, pl_module.model.peft_config["default"], adapter)  # PEFT's own files
            if trainables:
                write_tensors(tmp / TRAINABLES, trainables)
            # the run's model/LoRA settings, so bin/export.py can rebuild the base without the run's config file
            settings = {**dict(pl_module.hparams), BASE_KEY: pl_module.base_id}  # the base it belongs to
            (tmp / RUN_SETTINGS).write_text(json.dumps(settings, indent=2, default=str))
        self.written = out
        rank_zero_info(f"mgmlora: adapter written to {out}")


def check_finite_tensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Refuses to write an adapter whose tensors hold NaN or inf (the first such tensor is named)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{out}: not written, tensor {name} holds NaN or inf (training diverged; the newest "
                                 "checkpoint before it is the last usable state).")


class RunSummary(ModelSummary):
    """Lightning's model summary without the figures it makes up.

    Lightning prints a FLOPs column and total of 0 whenever the module sets no `example_input_array` (mgmlora's batches
    have no fixed shape, so it never measures one): zeros that read as a measurement. Both are dropped when the count
    is 0; a measured count stays. The table is plain text (no terminal codes in log files). mgmlora.cli installs it in
    place of Lightning's default summary.
    """

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int, **summarize_kwargs) -> None:
        """Logs the table, without the FLOPs column and total when nothing was counted."""
        if not total_flops:
            summary_data = [(name, column) for name, column in summary_data if name != "FLOPs"]
        table = format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                     total_flops, *summary_data)
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.rstrip().lower().endswith("total flops"))
        rank_zero_info("\n" + table)


def run_step(trainer: L.Trainer) -> int:
    """The step of what is logged now: optimizer steps done in fit, the evaluated checkpoint's step otherwise."""
    if trainer.state.fn == "fit":
        return trainer.global_step
    return getattr(trainer.lightning_module, "checkpoint_step", None) or trainer.global_step


class StepLabels(L.Callback):
    """Labels every event of one optimizer step with the number of optimizer steps done, as checkpoint names count them.

    Lightning labels the metrics it logs during fit with its count of batches that stepped *and have ended*
    (mgmlora.training.lightning_private.logging_step). That count trails `trainer.global_step` by one from optimizer
    step N until the end of its batch, so the loss of step N, the validation after it and the learning rate step N used
    went to TensorBoard at N - 1, while the checkpoint written after step N is `step=N` and GenerationEval's table and
    images said N. This callback (installed by mgmlora.cli) relabels Lightning's metrics to N; `run_step` is the step
    mgmlora's own events use. So every event of one optimizer step carries the same step:

    - train/*, perf/* and the learning rate of optimizer step N, and `epoch`: N;
    - val/*, val_gen/* and the sample table and images of the validation after step N: N (`step=N` checkpoints);
    - what is logged once at the start of fit (params/*, the LoRA report, hparams): the step the fit starts from.

    Evaluation outside fit (`validate`, `test` of a checkpoint) is labelled with the checkpoint's step, so its metrics
    line up with the run the checkpoint comes from (0 without a checkpoint).

    Each logger's `log_metrics` is wrapped from `setup` to `teardown`. A call whose step is Lightning's own label
    (`logging_step`) gets N instead of N - 1 while training runs, and the checkpoint's step in evaluation outside fit;
    a step given explicitly (another value) is kept, as is everything logged before training starts.
    """

    def __init__(self) -> None:
        self._training = False
        self._wrapped: list[L.pytorch.loggers.Logger] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        for logger in trainer.loggers:
            if logger in self._wrapped:
                continue
            original = logger.log_metrics

            def log_metrics(metrics: dict[str, Any], step: int | None = None, _original=original) -> None:
                _original(metrics, self._label(trainer, step))

            logger.log_metrics = log_metrics  # the instance attribute shadows the class's method until teardown
            self._wrapped.append(logger)

    def _label(self, trainer: L.Trainer, step: int | None) -> int | None:
        if step is None or step != logging_step(trainer):
            return step  # explicit: kept
        if trainer.state.fn == "fit":
            if not self._training:
                return step
            # a validation inside a window (val_check_interval not a multiple of accumulate_grad_batches, or after an
            # epoch's short last window) comes when Lightning's count already equals the optimizer steps done
            return trainer.global_step if trainer.validating else step + 1
        return run_step(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._training = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._training = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        self._unwrap()

    def _unwrap(self) -> None:
        for logger in self._wrapped:
            vars(logger).pop("log_metrics", None)  # the class's method again
        self._wrapped, self._training = [], False
