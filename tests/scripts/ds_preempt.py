"""A ZeRO-2 run (CPU, gloo) stopped by SIGTERM mid accumulation window, resumed, compared with an unstopped run.

    python tests/scripts/ds_preempt.py OUT_DIR

Prints a JSON summary: the stopped run's exit code and checkpoint, the resumed global step, and the largest
difference between the resumed run's adapter and the unstopped run's.
"""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from mgmlora.callbacks import AdapterExport  # noqa: E402
from mgmlora.data.datamodule import ChatDataModule  # noqa: E402
from mgmlora.lora import LoraArgs  # noqa: E402
from mgmlora.models.causal_lm import ModelArgs  # noqa: E402
from mgmlora.module import LoraLitModule  # noqa: E402
from mgmlora.optim import OptimArgs  # noqa: E402
from mgmlora.preemption import PreemptionCheckpoint  # noqa: E402
from mgmlora.strategies import MgmDeepSpeedStrategy  # noqa: E402

ACCUM, STEPS = 2, 4


class CpuDeepSpeed(MgmDeepSpeedStrategy):
    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # skip DeepSpeed's "CUDA only" check

    def _get_process_group_backend(self):
        return "gloo"


class SignalAt(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(out: Path, *callbacks, ckpt=None):
    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(ROOT / "tests/assets/tokenizer"), dtype="float32",
                      gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(preset="balanced", lora_dropout=0.0, init_lora_weights="gaussian"),
                           OptimArgs(lr=1e-2, warmup_ratio=0.0))
    strategy = CpuDeepSpeed(stage=2, parallel_devices=[torch.device("cpu", 0)], exclude_frozen_parameters=True)
    trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, logger=False, accelerator="cpu",
                        strategy=strategy, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, default_root_dir=out,
                        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=2,
                                                   save_top_k=-1), AdapterExport(), PreemptionCheckpoint(),
                                   *callbacks])
    trainer.fit(module, ChatDataModule(str(ROOT / "tests/assets/persona_chat_train.jsonl"), batch_size=2, seed=0),
                ckpt_path=ckpt)
    return trainer, module.trained_on_host()[0]


def main():
    out = Path(sys.argv[1])
    _, reference = fit(out / "reference")
    try:
        fit(out / "stopped", SignalAt(2 * ACCUM))  # the first micro-batch of step 3's window
        code = 0
    except SystemExit as stop:
        code = stop.code
    ckpt = sorted((out / "stopped" / "ckpt").glob("interrupted-step=*.ckpt"))
    trainer, resumed = fit(out / "resumed", ckpt=ckpt[0] if ckpt else None)
    diff = max((resumed[k] - v).abs().max().item() for k, v in reference.items())
    adapter = (out / "stopped" / "adapter" / "adapter_model.safetensors").is_file()
    print(json.dumps({"exit_code": code, "checkpoints": [p.name for p in ckpt], "adapter_written": adapter,
                      "resumed_global_step": trainer.global_step, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
