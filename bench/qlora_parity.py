"""A quantised base (NF4 or FP8) against the bf16 base from identical weights: losses, tokens/s and peak memory.

    python bench/qlora_parity.py --model qwen3-30b-a3b --layers 12 --steps 50 --out OUT.json
    python bench/qlora_parity.py --model qwen3-30b-a3b --quant_type fp8 --variant liger+packing+fused+compile ...

Both models are built by `load_model` from the same seed (random init at real shapes, initialised layer by layer on
the device, mgmlora.models.layerwise, optionally with fewer decoder layers (`--layers`)): the quantised one is what a
QLoRA or FP8 run trains, the other its full-precision twin (`quantize=False`), so their weights are identical before
one of them is quantised to 4-bit NF4 or FP8 (`--quant_type`, mgmlora.models.quantization). Both get the same initial
LoRA weights and see the same batches (bench/train_step.py's Chameleons-like lengths) through the same step
(mgmlora's loss, packed rows when the variant says so). What it reports: each step's loss for both, their relative
gap per step (|quantised - bf16| / bf16: max, mean, last), tokens/s and peak allocated memory of both at the same
micro-batch, and the ratio of the tokens/s (`tokens_per_s_<format>_over_bf16`). The bf16 run goes first, one pass
each: the ratio is a first look, not an interleaved comparison.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: train_step's helpers
import torch  # noqa: E402
import train_step  # noqa: E402  (inserts src/ itself)
import transformers  # noqa: E402

from mgmlora.models import load_model  # noqa: E402
from mgmlora.models.args import ModelArgs  # noqa: E402
from mgmlora.models.quantization import QuantizationArgs  # noqa: E402
from mgmlora.models.registry import PRESETS  # noqa: E402
from mgmlora.training.lora import LoraArgs, count_parameters  # noqa: E402
from mgmlora.training.trainable import Trainability, apply_trainability  # noqa: E402


def _model_args(args, dtype: str, quant: QuantizationArgs) -> ModelArgs:
    """The preset with `--layers` decoder layers: a registry entry of its own, for this process only."""
    name = args.model  # a registry preset or a family's own (mgm-2b)
    if args.layers:
        preset = PRESETS[args.model]
        name = f"{args.model}-{args.layers}layers"
        PRESETS[name] = replace(preset, name=name, architecture={**preset.architecture,
                                                                 "num_hidden_layers": args.layers})
    return ModelArgs(preset=name, dtype=dtype, gradient_checkpointing=True, quantization=quant)


def _build(model_args: ModelArgs, quantize: bool, lora: LoraArgs, device: torch.device, initial: dict | None):
    start = time.perf_counter()
    with torch.device(device):  # load_model's QLoRA path: random init layer by layer on the device, quantised or not
        loaded = load_model(model_args, quantize=quantize)
    model, _ = apply_trainability(loaded, lora, Trainability())
    model.to(device)
    with torch.no_grad():  # the same LoRA starting point (PEFT draws lora_A on the weights' device)
        for name, p in model.named_parameters():
            if p.requires_grad and initial is not None:
                p.copy_(initial[name])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loaded, model, time.perf_counter() - start


def main() -> None:
    """Builds, trains and compares both models; writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's)")
    parser.add_argument("--variant", default="liger+packing+fused", help="bench/train_step.py variant (not plain)")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per micro-batch, both models")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=0, help="steps not timed (they still count as losses)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--lora_preset", default="chameleons")
    parser.add_argument("--target_experts", action="store_true")
    parser.add_argument("--quant_type", choices=["nf4", "fp8"], default="nf4")
    parser.add_argument("--double_quant", type=int, default=1, help="nf4 only")
    parser.add_argument("--expert_products", choices=["dequantized", "fp8"], default="dequantized", help="fp8 only")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lengths", default="chameleons")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    impl = train_step.parse_variant(args.variant)[0]
    if not cuda and impl == "liger":
        raise SystemExit("--variant with liger needs CUDA; use e.g. chunked+packing on the CPU")
    quant = QuantizationArgs(quant_type=args.quant_type, double_quant=bool(args.double_quant), compute_dtype=dtype,
                             expert_products=args.expert_products)
    fmt = args.quant_type
    lora = LoraArgs(preset=args.lora_preset, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                    target_experts=args.target_experts)
    records, initial = {}, None
    model_args = _model_args(args, dtype, quant)
    for name, quantize in (("bf16", False), (fmt, True)):
        loaded, model, build_s = _build(model_args, quantize, lora, device, initial)
        if initial is None:
            initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        info = loaded.info
        batches = train_step.make_batches(args, info, info.vocab_size, args.batch_size, args.warmup + args.steps)
        n_pos = statistics.mean(train_step.positions(b, info) for b in batches)
        rec = train_step.run_variant(model, loaded, batches, args.variant, args.chunk, args.warmup, args.steps,
                                     device, args.lr, measure_cpu_peak=False)
        trainable, total = count_parameters(model)
        rec.update({"build_s": round(build_s, 1), "tokens_per_s": n_pos / rec["step_s_median"],
                    "positions_per_step": n_pos, "trainable_params": trainable, "total_params": total})
        records[name] = rec
        print(name, json.dumps({k: v for k, v in rec.items() if k not in ("step_s_all", "losses")}), flush=True)
        del loaded, model
        if cuda:
            torch.cuda.empty_cache()
    bf16, quantised = records["bf16"]["losses"], records[fmt]["losses"]
    gaps = [abs(a - b) / abs(b) for a, b in zip(quantised, bf16, strict=True)]
    result = {
        "command": "python bench/qlora_parity.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": vars(args) | {"out": str(args.out)},
        "loss_rel_gap": {"max": max(gaps), "mean": statistics.mean(gaps), "last": gaps[-1], "per_step": gaps},
        f"tokens_per_s_{fmt}_over_bf16": records[fmt]["tokens_per_s"] / records["bf16"]["tokens_per_s"],
        "runs": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"loss gap {fmt} vs bf16: max {max(gaps):.4f}, mean {statistics.mean(gaps):.4f}, last {gaps[-1]:.4f}; "
          f"tokens/s {records['bf16']['tokens_per_s']:.0f} (bf16) vs {records[fmt]['tokens_per_s']:.0f} ({fmt}); "
          f"peak GiB {records['bf16']['peak_alloc_gib']} vs {records[fmt]['peak_alloc_gib']}")


if __name__ == "__main__":
    main()
