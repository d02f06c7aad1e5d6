"""Multi-process-capable runs stopped by SIGTERM (CPU, gloo); prints a JSON summary.

    python tests/scripts/preempt_fit.py OUT_DIR zero2   # DeepSpeed ZeRO-2, stopped mid accumulation window, resumed
    python tests/scripts/preempt_fit.py OUT_DIR ddp2    # 2-rank DDP, rank 0 alone gets the signal

zero2: the stopped run's exit code and checkpoint, the resumed global step, and the largest difference between the
resumed run's adapter and an unstopped run's. ddp2: the exit code and the files written (rank 0 prints).
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

from mgmlora.data.datamodule import ChatDataModule  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.training.callbacks import AdapterExport  # noqa: E402
from mgmlora.training.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.training.lora import LoraArgs  # noqa: E402
from mgmlora.training.module import LoraLitModule  # noqa: E402
from mgmlora.training.optim import OptimArgs  # noqa: E402
from mgmlora.training.preemption import PreemptionCheckpoint  # noqa: E402
from mgmlora.training.strategies import MgmDeepSpeedStrategy  # noqa: E402

ACCUM, STEPS = 2, 4


class CpuDeepSpeed(MgmDeepSpeedStrategy):
    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # skip DeepSpeed's "CUDA only" check

    def _get_process_group_backend(self):
        return "gloo"


class SignalAt(L.Callback):
    """SIGTERM to this process (rank 0 only) after micro-batch `at`."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(out: Path, *callbacks, ckpt=None, ddp_ranks=0):
    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(ROOT / "tests/assets/tokenizer"), dtype="float32",
                      gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(preset="balanced", lora_dropout=0.0, init_lora_weights="gaussian"),
                           OptimArgs(lr=1e-2, warmup_ratio=0.0))
    if ddp_ranks:
        kwargs = dict(strategy="ddp", devices=ddp_ranks, plugins=[AdapterCheckpointIO()])
    else:
        kwargs = dict(strategy=CpuDeepSpeed(stage=2, parallel_devices=[torch.device("cpu", 0)],
                                            exclude_frozen_parameters=True))
    trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, default_root_dir=out, **kwargs,
                        callbacks=[*callbacks, ModelCheckpoint(dirpath=out / "ckpt", filename="{step}",
                                                               every_n_train_steps=2, save_top_k=-1),
                                   AdapterExport(), PreemptionCheckpoint()])
    data = ChatDataModule(str(ROOT / "tests/assets/persona_chat_train.jsonl"), batch_size=2, seed=0)
    data.connect(module.tokenizer, module.info)
    trainer.fit(module, data, ckpt_path=ckpt)
    return trainer, module.trained_on_host()[0]


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "ddp2":
        try:
            fit(out, SignalAt(2 * ACCUM), ddp_ranks=2)  # the first micro-batch of step 3's window
            code = 0
        except SystemExit as stop:
            code = stop.code
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in (".ckpt", ".safetensors"))
            print(json.dumps({"exit_code": code, "files": files}))
        return
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
