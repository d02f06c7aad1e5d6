"""Trains one optimizer step and saves the gradients seen just before it (rank 0).

Run as a script because Lightning's DDP launcher re-executes `sys.argv` for every extra rank:
    python tests/scripts/grad_after_one_step.py OUT.pt --devices 2 --batch_size 1 --accumulate 2
"""

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from mgmlora.data.datamodule import ChatDataModule  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.training.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.training.lora import LoraArgs  # noqa: E402
from mgmlora.training.module import LoraLitModule  # noqa: E402
from mgmlora.training.optim import OptimArgs  # noqa: E402


class Capture(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
            torch.save(grads, self.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--train_path", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(ROOT / "tests/assets/tokenizer"), dtype="float32",
                      gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(lora_dropout=0.0, init_lora_weights="gaussian"), OptimArgs(warmup_ratio=0))
    data = ChatDataModule(args.train_path, batch_size=args.batch_size, shuffle=False)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=1, accumulate_grad_batches=args.accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Capture(args.out)], plugins=[AdapterCheckpointIO()])
    trainer.fit(module, data)


if __name__ == "__main__":
    main()
