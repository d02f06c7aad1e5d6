"""The peer: TRL's SFTTrainer on the same model, LoRA, samples and FLOP count as bench/train_step.py.

    python bench/peers/trl_sft.py --model qwen3-30b-a3b --batch_sizes 48,64 --out /tmp/trl.json
    python bench/peers/trl_sft.py --model tiny-qwen3-moe --batch_sizes 4 --warmup 1 --steps 2 --out /tmp/t.json  # CPU

What a user who picks TRL instead of mgmlora runs, configured for speed as TRL's documentation says ("Reducing memory
usage" / "Speeding up training"): `padding_free=True` (the micro-batch's samples in one row, no padding compute),
FlexAttention (`attn_implementation="flex_attention"`; flash-attn has no wheel for the GPU image), Liger kernels
(`use_liger_kernel=True`; TRL's own chunked LM head computes the loss without full logits), completion-only loss,
bf16, fused AdamW, gradient checkpointing, a micro-batch size sweep (`--batch_sizes`) so the peer's best within the
memory budget is found, and optionally `torch_compile=True` (`--torch_compile`). Two settings go beyond TRL's docs,
both in the peer's favour: PEFT's fp32 cast of LoRA inputs is off (`--keep_input_cast` keeps it), and Liger's SwiGLU
kernel stays off MoE experts (it computes weight gradients of the frozen experts: slower, measured 2026-12-04). The
MoE load-balancing loss is off (`router_aux_loss_coef=0.0`), as in mgmlora's loss: the same function is trained.

Same as bench/train_step.py: the base model (mgmlora's random init at the real shapes, same seed, so the same
weights), the LoRA config (`plan_lora` with the same preset, rank and targets; dropout 0, or `--lora_dropout`
to match a recipe's), the samples (its generator, in its order), and the FLOPs per step (mgmlora.models.flops).
The experts run transformers' own default
(`grouped_mm`), the peer's path. Each step is timed from the trainer's `on_step_begin` to `on_step_end` with CUDA
synchronised (forward, backward, optimizer step; data loading outside, as in train_step.py); tokens/s counts the
positions of the collated batch of that step. Writes one JSON in train_step.py's record layout.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
TOKENIZER = BENCH.parent / "tests" / "assets" / "tokenizer"

import peft  # noqa: E402
import torch  # noqa: E402
import train_step  # noqa: E402  (bench/train_step.py: the same samples, FLOPs and ceiling)
import transformers  # noqa: E402

from mgmlora.batch import IGNORE_INDEX  # noqa: E402
from mgmlora.models import load_model  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.causal_lm import load_tokenizer  # noqa: E402
from mgmlora.models.flops import FlopModel  # noqa: E402
from mgmlora.training.fastpath import set_peft_input_cast  # noqa: E402
from mgmlora.training.lora import LoraArgs, count_parameters, plan_lora  # noqa: E402


class CountingCollator:
    """Wraps TRL's collator and records each collated batch's positions, supervised positions and sample lengths."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[list[int], int]] = []  # FIFO: (sample lengths, supervised positions)

    def __call__(self, examples):  # noqa: D102
        out = self.collator(examples)
        if "cu_seq_lens_q" in out:
            lengths = out["cu_seq_lens_q"].diff().tolist()
        else:
            lengths = out["attention_mask"].sum(-1).tolist()
        self.batches.append((lengths, int((out["labels"][:, 1:] != IGNORE_INDEX).sum())))
        return out


def samples_of(batches) -> list[dict]:
    """train_step.py's padded micro-batches -> its samples in order: input_ids and the completion (loss) mask."""
    rows = []
    for b in batches:
        for ids, mask, labels in zip(b.input_ids, b.attention_mask, b.labels):
            n = int(mask.sum())
            rows.append({"input_ids": ids[:n].tolist(), "completion_mask": (labels[:n] != IGNORE_INDEX).int().tolist()})
    return rows


def run(args, batch_size: int, device: torch.device) -> dict:
    """Builds the model and the trainer for one micro-batch size and times `args.steps` steps after the warm-up."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model_args = ModelArgs(preset=args.model, dtype=dtype, gradient_checkpointing=False,
                           attn_implementation="flex_attention" if device.type == "cuda" else "sdpa",
                           experts_implementation="grouped_mm")
    with device:  # the same random init as train_step.py (same preset, same seed), directly on the device
        loaded = load_model(model_args)
    if loaded.info.takes_images:
        raise SystemExit(f"{args.model}: TRL's SFTTrainer has no MGM model class; the plain path is MGM's peer")
    preset = args.lora_preset or train_step.DEFAULTS[args.model][0]
    rank = {"r": args.r, "lora_alpha": 2 * args.r} if args.r else {}
    lora = LoraArgs(preset=preset, lora_dropout=args.lora_dropout, target_experts=args.target_experts, **rank)
    plan = plan_lora(loaded.model, lora, loaded.decoder_layers, loaded.moe)

    n_steps = args.warmup + args.steps
    batches = train_step.make_batches(args, loaded.info, loaded.info.vocab_size, batch_size, n_steps)
    dataset = Dataset.from_list(samples_of(batches))
    config = dict(
        output_dir="/tmp/trl_peer", per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=n_steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        bf16=device.type == "cuda", use_cpu=device.type != "cuda", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, padding_free=True, completion_only_loss=True,
        max_length=None, use_liger_kernel=device.type == "cuda" and not args.no_liger,
        liger_kernel_config={"swiglu": False} if loaded.moe else None, optim="adamw_torch_fused",
        torch_compile=args.torch_compile, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
        # mgmlora's loss is the cross-entropy alone (the router is frozen): the MoE load-balancing term off, so both
        # compute the same function (TRL otherwise adds it, and its router-logit work, for MoE models)
        router_aux_loss_coef=0.0 if loaded.moe else None,
    )
    if "train_sampling_strategy" in SFTConfig.__dataclass_fields__:
        config["train_sampling_strategy"] = "sequential"  # train_step.py's order (older releases shuffle)
    # the samples are token ids already: the tokenizer only supplies the pad id (the tests' Qwen tokenizer)
    tokenizer = load_tokenizer(ModelArgs(preset=args.model, tokenizer_path=str(TOKENIZER)))
    trainer = SFTTrainer(model=loaded.model, args=SFTConfig(**config), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=plan.config)
    trainer.data_collator = collator = CountingCollator(trainer.data_collator)
    if not args.keep_input_cast:
        set_peft_input_cast(trainer.model, False)
    trainable, total = count_parameters(trainer.model)
    flop_model = FlopModel.of(loaded.language_model())

    times: list[float] = []
    losses: list[float] = []

    class Timer(transformers.TrainerCallback):
        start = 0.0

        def on_step_begin(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            Timer.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - Timer.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Timer())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    timed = times[args.warmup:]
    steps = collator.batches[args.warmup:n_steps]
    positions = statistics.mean(sum(lengths) for lengths, _ in steps)
    recompute = True
    model_flops = statistics.mean(flop_model.step(lengths, sup, 0, recompute).model for lengths, sup in steps)
    hardware_flops = statistics.mean(flop_model.step(lengths, sup, 0, recompute).hardware for lengths, sup in steps)
    step_s = statistics.median(timed)
    cuda = device.type == "cuda"
    record = {
        "samples_per_step": batch_size, "step_s_median": step_s, "step_s_all": timed, "peak_alloc_gib": peak,
        "positions_per_step": positions, "tokens_per_s": positions / step_s, "losses": losses,
        "flops_per_step_model": model_flops, "flops_per_step_hardware": hardware_flops,
        "mfu": model_flops / step_s / (train_step.PEAK_TFLOPS * 1e12) if cuda else None,
        "hfu": hardware_flops / step_s / (train_step.PEAK_TFLOPS * 1e12) if cuda else None,
        "trainable_params": trainable, "total_params": total,
        "trl_config": {k: v for k, v in config.items() if k not in ("output_dir",)},
        "peft_input_cast": args.keep_input_cast, "experts_implementation": model_args.experts_implementation,
        "attn_implementation": model_args.attn_implementation,
    }
    del trainer, loaded
    return record


def main() -> None:
    """Runs each micro-batch size in turn (one model build each), writes the JSON, prints a table."""
    import trl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", required=True, choices=sorted(train_step.DEFAULTS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch_sizes", default="8", help="comma-separated samples per micro-batch (the sweep)")
    parser.add_argument("--lengths", choices=["chameleons", "fixed"], default="chameleons")
    parser.add_argument("--seq", type=int, default=2048, help="fixed text length (--lengths fixed)")
    parser.add_argument("--lora_preset", default=None)
    parser.add_argument("--target_experts", action="store_true")
    parser.add_argument("--r", type=int, default=None, help="LoRA rank override (lora_alpha = 2r)")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="a recipe's LoRA dropout (PEFT's, eager)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--torch_compile", action="store_true", help="TRL's torch_compile=True (whole model)")
    parser.add_argument("--no_liger", action="store_true", help="without Liger's kernels")
    parser.add_argument("--keep_input_cast", action="store_true", help="keep PEFT's fp32 cast of LoRA inputs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        name = f"trlx{batch_size}" + ("+compile" if args.torch_compile else "")
        try:
            records[name] = run(args, batch_size, device)
        except torch.cuda.OutOfMemoryError as error:
            records[name] = {"samples_per_step": batch_size, "oom": str(error).splitlines()[0]}
        # the next size builds its own model: free what this one's reference cycles (the trainer, its callbacks, a
        # caught error's traceback) still hold before it does
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps({k: v for k, v in records[name].items() if k not in ("step_s_all", "losses",
                                                                                    "trl_config")}), flush=True)
    result = {
        "command": "python bench/peers/trl_sft.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__, "python": platform.python_version()},
        "model": args.model, "lora": {"preset": args.lora_preset, "target_experts": args.target_experts, "r": args.r,
                                      "lora_dropout": args.lora_dropout},
        "peak_tflops_assumed": train_step.PEAK_TFLOPS, "warmup": args.warmup, "steps": args.steps,
        "variants": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, rec in records.items():
        if "oom" in rec:
            print(f"{name:24} OOM")
        else:
            print(f"{name:24} {rec['tokens_per_s']:>9.0f} tok/s {rec['peak_alloc_gib'] or 0:>7.2f} GiB "
                  f"MFU {rec['mfu'] or 0:.1%} HFU {rec['hfu'] or 0:.1%}")


if __name__ == "__main__":
    main()
