"""Runs `validate` with GenerationEval on N CPU ranks (gloo) and writes the val_gen/* scores rank 0 sees as JSON.

Run as a script because Lightning's DDP launcher re-executes `sys.argv` for every extra rank:
    python tests/scripts/gen_eval_ranks.py OUT.json --val_path val.jsonl --devices 2 --num_samples 3
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from mgmlora.data.datamodule import ChatDataModule  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.training.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.training.generation_eval import GenerationEval  # noqa: E402
from mgmlora.training.lora import LoraArgs  # noqa: E402
from mgmlora.training.module import LoraLitModule  # noqa: E402


def scores(val_path: str, devices: int = 1, num_samples: int = 3) -> dict[str, float] | None:
    """The val_gen/* scores of a tiny Qwen3 (fixed init) on `val_path`, on rank 0 (None on other ranks)."""
    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(ROOT / "tests/assets/tokenizer"), dtype="float32",
                      gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(lora_dropout=0.0, init_lora_weights="gaussian"))
    data = ChatDataModule(val_path, val_path=val_path, max_length=256)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()],
                        callbacks=[GenerationEval(num_samples=num_samples, max_new_tokens=6, batch_size=2)])
    trainer.validate(module, data)
    if not trainer.is_global_zero:
        return None
    return {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val_gen/")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--val_path", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num_samples", type=int, default=3)
    args = parser.parse_args()
    result = scores(args.val_path, args.devices, args.num_samples)
    if result is not None:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
