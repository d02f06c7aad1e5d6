"""Fits the tiny Qwen3 LoRA module under DeepSpeed (CPU, gloo) with checkpoints, then resumes; prints a JSON summary.

    python tests/scripts/ds_fit_resume.py OUT_DIR STAGE PRESET [--resume | --resume_from CHECKPOINT]

With PRESET tiny-qwen3-moe the experts carry LoRA too. The summary includes the largest |LoRA B| when training
starts (0 when the adapter starts as a no-op, which ZeRO-3 breaks unless PEFT runs outside zero.Init), the train loss
and learning rate of every optimizer step, and the classes ZeRO-3 treats as leaf modules.
STAGE 0 runs plain Lightning (no DeepSpeed) for comparison. Environment: MGM_TEST_RANKS (CPU processes, default 1),
MGM_TEST_ACCEL (`cpu`, the default, with gloo; or `gpu`: one CUDA device, bf16-mixed), MGM_TEST_ACCUM (accumulated
micro-batches per optimizer step, default 2), MGM_TEST_STEPS (optimizer steps before the resume, default 2),
MGM_TEST_RESUME_TO (optimizer steps of the run resumed from step 2, default STEPS + 2), MGM_TEST_DROPOUT (LoRA
dropout, default 0), MGM_TEST_BETAS (Adam's betas, `b1,b2`), MGM_TEST_ALLOW=1 (model.allow_resume_changes) and
MGM_TEST_POISON (an optimizer step, 1-based, whose gradients turn NaN while its loss stays finite). Both
runs train on the same file, so with RESUME_TO == STEPS the resumed run's losses can be compared with the first
run's. MGM_TEST_QUANT=1 trains on the 4-bit base (QLoRA, mgmlora's PyTorch NF4 backend).
--resume_from only resumes from CHECKPOINT (errors propagate: exit status 1) and prints the param groups' betas, eps
and weight decay of its first optimizer step.
"""

import contextlib
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

from mgmlora.data.datamodule import ChatDataModule  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.causal_lm import load_causal_lm  # noqa: E402
from mgmlora.models.quantization import QuantizationArgs  # noqa: E402
from mgmlora.training.callbacks import AdapterExport  # noqa: E402
from mgmlora.training.checkpoint import AdapterCheckpointIO  # noqa: E402
from mgmlora.training.lora import LoraArgs  # noqa: E402
from mgmlora.training.module import LoraLitModule  # noqa: E402
from mgmlora.training.optim import OptimArgs  # noqa: E402
from mgmlora.training.strategies import MgmDeepSpeedStrategy  # noqa: E402


class Record(L.Callback):
    """|LoRA B| at the start, then the logged loss and the learning rate of every optimizer step."""

    def __init__(self):
        self.losses, self.lrs, self.grad_norms = [], [], []
        self.by_step = {}  # global step -> train/loss of the optimizer step that reached it
        self.groups = None  # betas, eps and weight decay of each param group at the first optimizer step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.groups is None:
            self.groups = [{k: list(v) if k == "betas" else v for k, v in g.items() if k in ("betas", "eps",
                                                                                            "weight_decay")}
                           for g in optimizer.param_groups]

    def on_train_start(self, trainer, pl_module):
        params = [p for n, p in pl_module.model.named_parameters() if "lora_B" in n]
        context = contextlib.nullcontext()
        if STAGE:
            import deepspeed

            context = deepspeed.zero.GatheredParameters(params)
        with context:
            self.absmax = max(p.abs().max().item() for p in params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "train/loss" in trainer.callback_metrics:
            self.by_step[trainer.global_step] = trainer.callback_metrics["train/loss"].item()
        if trainer.global_step > len(self.losses) and "train/loss" in trainer.callback_metrics:
            self.losses.append(trainer.callback_metrics["train/loss"].item())
            self.lrs.append(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])
            self.grad_norms.append(trainer.callback_metrics.get("train/grad_norm", torch.tensor(float("nan"))).item())


class PoisonGrad(L.Callback):
    """Turns every gradient of one LoRA weight NaN during the window of optimizer step `step` (1-based).

    A tensor hook, so the NaN reaches DeepSpeed's own gradient buffers; the loss stays finite.
    """

    def __init__(self, step):
        self.step, self.now = step, False

    def on_train_start(self, trainer, pl_module):
        p = next(p for n, p in pl_module.model.named_parameters() if "lora_B" in n)
        p.register_hook(lambda g: torch.full_like(g, float("nan")) if self.now else g)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.now = trainer.global_step + 1 == self.step


class CpuDeepSpeed(MgmDeepSpeedStrategy):
    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # skip DeepSpeed's "CUDA only" check

    def _get_process_group_backend(self):
        return "gloo"


GPU = os.environ.get("MGM_TEST_ACCEL", "cpu") == "gpu"
ACCUM = int(os.environ.get("MGM_TEST_ACCUM", "2"))
STEPS = int(os.environ.get("MGM_TEST_STEPS", "2"))
STAGE = int(sys.argv[2]) if len(sys.argv) > 2 else 0
RESUME_TO = int(os.environ.get("MGM_TEST_RESUME_TO", str(STEPS + 2)))
DROPOUT = float(os.environ.get("MGM_TEST_DROPOUT", "0"))
QUANT = os.environ.get("MGM_TEST_QUANT") == "1"
BETAS = tuple(float(b) for b in os.environ.get("MGM_TEST_BETAS", "0.9,0.999").split(","))
ALLOW = os.environ.get("MGM_TEST_ALLOW") == "1"
POISON = int(os.environ.get("MGM_TEST_POISON", "0"))


def base_dir(out: Path, preset: str) -> Path:
    """The tiny model saved once as a local directory: random init under ZeRO-3's zero.Init draws other weights than
    a plain build, so every stage loads the same saved weights (as real users do) to make their losses comparable."""
    path = Path(os.environ.get("MGM_TEST_BASE", out / "base"))
    if not (path / "config.json").is_file() and "LOCAL_RANK" not in os.environ:
        load_causal_lm(ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=False)).save_pretrained(path)
    return path


def fit(out: Path, stage: int, preset: str, steps: int, ckpt=None):
    base = base_dir(out, preset)  # before seeding: building the base draws random numbers, LoRA's init must not see
    torch.manual_seed(0)
    model = ModelArgs(model_path=str(base), tokenizer_path=str(ROOT / "tests/assets/tokenizer"),
                      dtype="bfloat16" if GPU else "float32", gradient_checkpointing=True,
                      quantization=QuantizationArgs(compute_dtype="bfloat16" if GPU else "float32", backend="torch")
                      if QUANT else None)
    lora = LoraArgs(preset="aggressive", lora_dropout=DROPOUT, target_experts=preset.endswith("moe"))
    module = LoraLitModule(model, lora, OptimArgs(lr=1e-2, warmup_ratio=0.25, betas=BETAS), allow_resume_changes=ALLOW)
    train = out / "train.jsonl"
    rows = (ROOT / "tests/assets/persona_chat_train.jsonl").read_text().splitlines(True)
    n = 2 * ACCUM * (max(STEPS, RESUME_TO) if "--resume" in sys.argv else steps)  # the same file for both runs
    train.write_text("".join((rows * (1 + n // len(rows)))[:n]))
    if GPU:
        kwargs = dict(accelerator="gpu", devices=1, precision="bf16-mixed")
        if stage:
            kwargs["strategy"] = MgmDeepSpeedStrategy(stage=stage, exclude_frozen_parameters=True)
    else:
        devices = [torch.device("cpu", i) for i in range(int(os.environ.get("MGM_TEST_RANKS", "1")))]
        kwargs = dict(strategy=CpuDeepSpeed(stage=stage, parallel_devices=devices, exclude_frozen_parameters=True)
                      if stage else "auto", accelerator="cpu")
    if stage:
        # Partition even tiny tensors (by default ZeRO-3 keeps tensors under 1e5 elements whole, which would hide
        # partitioning bugs that real-size LoRA weights hit).
        kwargs["strategy"].config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    clip = float(os.environ.get("MGM_TEST_CLIP", "1.0")) or None
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=ACCUM, logger=False, gradient_clip_val=clip,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=2,
                                                   save_top_k=-1), record := Record(), AdapterExport(),
                                   *([PoisonGrad(POISON)] if POISON else [])],
                        plugins=[] if stage else [AdapterCheckpointIO()], default_root_dir=out, **kwargs)
    data = ChatDataModule(str(train), batch_size=2)
    data.connect(module.tokenizer, module.info)
    trainer.fit(module, data, ckpt_path=ckpt)
    return trainer, record


def main():
    out, stage, preset = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if "--resume_from" in sys.argv:
        _, record = fit(out, stage, preset, STEPS, ckpt=sys.argv[sys.argv.index("--resume_from") + 1])
        print(json.dumps({"groups": record.groups}))
        return
    trainer, record = fit(out, stage, preset, STEPS)
    leaves = []
    if stage == 3:
        from deepspeed.utils import get_z3_leaf_modules

        leaves = sorted({type(m).__name__ for m in get_z3_leaf_modules(trainer.lightning_module.model)})
    if trainer.global_rank != 0:
        return
    from peft import PeftModel
    from safetensors.torch import load_file

    exported = load_file(out / "adapter" / "adapter_model.safetensors")
    base = load_causal_lm(ModelArgs(model_path=str(base_dir(out, preset)), dtype="float32",
                                    gradient_checkpointing=False))
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    b_reloaded = max(p.abs().max().item() for n, p in reloaded.named_parameters() if "lora_B" in n)
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(reloaded)
    reload_diff = max((state[k].float() - v.float()).abs().max().item() for k, v in exported.items())
    keys, ckpt_bytes = [], sum(f.stat().st_size for f in (out / "ckpt" / "step=2.ckpt").rglob("*") if f.is_file())
    if stage:
        states = sorted((out / "ckpt" / "step=2.ckpt" / "checkpoint").glob("*model_states.pt"))
        keys = sorted(torch.load(states[0], map_location="cpu", weights_only=False)["module"])  # DeepSpeed's own file
        if stage == 3:  # ZeRO-3 keeps parameters in the optimizer shards; the module file lists none
            keys = [k for k in keys if "lora_" in k] or ["(partitioned)"]
    step, resumed_losses = None, {}
    if "--resume" in sys.argv:
        # Resumed in the same process. Known limitation: with ZeRO-3 and LoRA on Qwen3-MoE experts, a second
        # model built in one process fails in transformers' experts forward ("ParametrizedQwen3MoeExperts has no
        # attribute config"); users resume in a new process, which this script does not cover.
        resumed, resumed_record = fit(out, stage, preset, RESUME_TO, ckpt=out / "ckpt" / "step=2.ckpt")
        step, resumed_losses = resumed.global_step, {s: v for s, v in resumed_record.by_step.items() if s > 2}
    print(json.dumps({"model_state_keys": keys, "resumed_global_step": step, "lora_b_absmax_at_start": record.absmax,
                      "losses_by_step": record.by_step, "resumed_losses_by_step": resumed_losses,
                      "losses": record.losses, "lrs": record.lrs, "grad_norms": record.grad_norms,
                      "z3_leaf_modules": leaves,
                      "checkpoint_bytes": ckpt_bytes,
                      "adapter_numels": sorted({v.numel() for v in exported.values()}),
                      "reloaded_lora_b_absmax": b_reloaded, "reload_max_abs_diff": reload_diff}))


if __name__ == "__main__":
    main()
