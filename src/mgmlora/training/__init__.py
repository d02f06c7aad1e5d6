"""The training core: the one LightningModule and everything one optimizer step needs.

- `module`: LoraLitModule (build, step, evaluate, optimise, save and restore what trains).
- `window`: the accumulation window (loss scale for plain / DDP / DeepSpeed, where a window ends).
- `loss`, `fastpath`, `optim`: the loss on supervised positions (SpeedArgs), PEFT casts and regional compile, AdamW.
- `lora`, `trainable`: LoRA presets and anchored targets; trainability per component.
- `callbacks`, `checkpoint`, `strategies`, `preemption`, `rng`, `progress`: what runs around the step (logging and the
  final adapter, adapter-only checkpoints, DeepSpeed, SIGTERM saves, resumable RNG, the progress bar).
- `lightning_private`: every private Lightning attribute mgmlora uses, in one place.
"""

from mgmlora.training.callbacks import AdapterExport, ThroughputMonitor
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.loss import SpeedArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.strategies import MgmDeepSpeedStrategy
from mgmlora.training.trainable import Trainability

__all__ = ["AdapterCheckpointIO", "AdapterExport", "LoraArgs", "LoraLitModule", "MgmDeepSpeedStrategy", "OptimArgs",
           "SpeedArgs", "ThroughputMonitor", "Trainability"]
