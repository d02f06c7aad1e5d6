"""The fastest setting that fits a memory budget: checkpointing on or off, and samples per micro-batch.

`bin/estimate.py --gpu_memory_gib N` prints it. Only settings the memory estimate (mgmlora.tools.memory) says fit are
considered; among them the ranking is a throughput model fitted to the measurements in configs/README.md (H200,
`bench/train_step.py --budget_gib`; the figures behind each constant: docs/design/memory.md), not a measurement of
your run:

- gradient checkpointing recomputes each layer's forward in the backward pass: about a third more compute, so a
  setting with it counts 0.75 of the same setting without it;
- more positions per micro-batch raise GPU utilisation up to a saturation point, after which the speed is flat: about
  4,096 positions for a dense model, about 32,768 for a mixture-of-experts model, whose experts each see only
  top_k / num_experts of the tokens.
Ties go to the setting with the smaller peak. Without `speed.packing`, padding costs compute and the model counts
positions as if every sample were `max_length` long, so the advice assumes packing and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mgmlora.models import uses_moe
from mgmlora.models.args import ModelArgs
from mgmlora.tools.memory import RunShape, estimate, largest_batch_size
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.trainable import Trainability

RECOMPUTE_SPEED = 0.75  # checkpointing's share of the speed without it (one extra forward in ~3 passes' compute)
SATURATION = {"dense": 4096, "moe": 32768}  # positions per micro-batch beyond which the measured speed was flat


@dataclass
class Setting:
    """One candidate: checkpointing, samples per micro-batch, its estimated peak and relative speed (1 = best case)."""

    gradient_checkpointing: bool
    batch_size: int
    positions: int  # batch_size x max_length
    total_gib: float
    relative_speed: float

    def describe(self) -> str:
        """The config keys to set and the estimated peak."""
        keep = " (divide accumulate_grad_batches by it to keep the global batch)" if self.batch_size > 1 else ""
        return (f"model.model.gradient_checkpointing {str(self.gradient_checkpointing).lower()}, "
                f"data.batch_size {self.batch_size}{keep}: {self.total_gib:.2f} GiB")


def candidates(model_args: ModelArgs, lora: LoraArgs, trainable: Trainability, speed: SpeedArgs, shape: RunShape,
               budget_gib: float) -> list[Setting]:
    """Every setting that fits `budget_gib`, fastest first by the model above.

    For each checkpointing choice: the smallest micro-batch that reaches the saturation point, or the largest that
    fits when none does (more samples than saturation only cost memory).
    """
    moe = uses_moe(model_args)
    saturation = SATURATION["moe" if moe else "dense"]
    settings = []
    # a 4-bit MoE base trains with checkpointing only (mgmlora.models.quantization)
    for ckpt in (True,) if moe and model_args.quantization is not None else (False, True):
        args = replace(model_args, gradient_checkpointing=ckpt)
        largest = largest_batch_size(args, lora, trainable, speed, shape, budget_gib)
        if largest < 1:
            continue
        batch = min(largest, max(1, -(-saturation // shape.seq_len)))  # ceil: the first batch at saturation
        positions = batch * shape.seq_len
        speed_model = min(positions, saturation) / saturation * (RECOMPUTE_SPEED if ckpt else 1.0)
        total = estimate(args, lora, trainable, speed, replace(shape, batch_size=batch)).total_gib
        settings.append(Setting(ckpt, batch, positions, total, round(speed_model, 4)))
    return sorted(settings, key=lambda s: (-s.relative_speed, s.total_gib))
