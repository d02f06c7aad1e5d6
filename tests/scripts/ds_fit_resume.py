"""Fits the tiny Qwen3 LoRA module under DeepSpeed (CPU, gloo) with checkpoints, then resumes; prints a JSON summary.

    python tests/scripts/ds_fit_resume.py OUT_DIR STAGE PRESET [--resume]

With PRESET tiny-qwen3-moe the experts carry LoRA too. The summary includes the largest |LoRA B| when training
starts (0 when the adapter starts as a no-op, which ZeRO-3 breaks unless PEFT runs outside zero.Init).
"""

import json
import os
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
from mgmlora.strategies import MgmDeepSpeedStrategy  # noqa: E402


class LoraBAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        import deepspeed

        params = [p for n, p in pl_module.model.named_parameters() if "lora_B" in n]
        with deepspeed.zero.GatheredParameters(params):
            self.absmax = max(p.abs().max().item() for p in params)


class CpuDeepSpeed(MgmDeepSpeedStrategy):
    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # skip DeepSpeed's "CUDA only" check

    def _get_process_group_backend(self):
        return "gloo"


def fit(out: Path, stage: int, preset: str, steps: int, ckpt=None):
    torch.manual_seed(0)
    model = ModelArgs(preset=preset, tokenizer_path=str(ROOT / "tests/assets/tokenizer"), dtype="float32",
                      gradient_checkpointing=True)
    lora = LoraArgs(preset="aggressive", lora_dropout=0.0, target_experts=preset.endswith("moe"))
    module = LoraLitModule(model, lora, OptimArgs(lr=1e-2, warmup_ratio=0))
    train = out / "train.jsonl"
    train.write_text("".join((ROOT / "tests/assets/persona_chat_train.jsonl").read_text().splitlines(True)[:16]))
    devices = [torch.device("cpu", i) for i in range(int(os.environ.get("MGM_TEST_RANKS", "1")))]
    strategy = CpuDeepSpeed(stage=stage, parallel_devices=devices, exclude_frozen_parameters=True)
    # Partition even tiny tensors (by default ZeRO-3 keeps tensors under 1e5 elements whole, which would hide
    # partitioning bugs that real-size LoRA weights hit).
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = L.Trainer(strategy=strategy, max_steps=steps, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=2,
                                                   save_top_k=-1), start := LoraBAtStart(), AdapterExport()],
                        default_root_dir=out)
    trainer.fit(module, ChatDataModule(str(train), batch_size=2), ckpt_path=ckpt)
    return trainer, start.absmax


def main():
    out, stage, preset = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    trainer, lora_b = fit(out, stage, preset, 2)
    if trainer.global_rank != 0:
        return
    from peft import PeftModel
    from safetensors.torch import load_file

    from mgmlora.models.causal_lm import load_causal_lm

    exported = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_causal_lm(ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=False))
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    b_reloaded = max(p.abs().max().item() for n, p in reloaded.named_parameters() if "lora_B" in n)
    states = sorted((out / "ckpt" / "step=2.ckpt" / "checkpoint").glob("*model_states.pt"))
    keys = sorted(torch.load(states[0], map_location="cpu", weights_only=False)["module"])  # DeepSpeed's own file
    if stage == 3:  # ZeRO-3 keeps parameters in the optimizer shards; the module file lists none
        keys = [k for k in keys if "lora_" in k] or ["(partitioned)"]
    step = None
    if "--resume" in sys.argv:
        # Resumed in the same process. Known issue (for issue 5): with ZeRO-3 and LoRA on Qwen3-MoE experts, a second
        # model built in one process fails in transformers' experts forward ("ParametrizedQwen3MoeExperts has no
        # attribute config"); users resume in a new process, which this script does not cover.
        step = fit(out, stage, preset, 4, ckpt=out / "ckpt" / "step=2.ckpt")[0].global_step
    print(json.dumps({"model_state_keys": keys, "resumed_global_step": step, "lora_b_absmax_at_start": lora_b,
                      "adapter_numels": sorted({v.numel() for v in exported.values()}),
                      "reloaded_lora_b_absmax": b_reloaded}))


if __name__ == "__main__":
    main()
