#!/usr/bin/env python
"""Estimate the peak GPU memory of a config before launching it (no weights are loaded).

    python bin/estimate.py --config configs/mgm2b_lora.yaml [--config configs/strategy/zero2_offload.yaml]
        [--gpu_memory_gib 24] [--json] [--model.trainable.llm full ...]   # dotted overrides, as for bin/main.py

Prints an itemised estimate per device (base weights, vision towers, LoRA/trainable weights, gradients, optimizer
states with the ZeRO stage and offload, activations with or without checkpointing, the LM head + loss block,
DeepSpeed buffers), trainable parameters per component, and with --gpu_memory_gib a verdict, the cheapest change that
would fit, and the largest micro-batch that fits (micro-batch sizing from memory; with `speed.packing` padding costs
nothing, so more samples per micro-batch is the main speed lever measured in configs/README.md; the estimate was
checked up to 48 samples per micro-batch, larger ones are extrapolations), and the fastest setting that fits
(base, checkpointing on or off, samples per micro-batch: mgmlora.tools.speed_plan, ranked by the committed
measurements, each figure with its result file).
Method and accuracy: mgmlora.tools.memory.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.cli import parse_files  # noqa: E402
from mgmlora.errors import run  # noqa: E402
from mgmlora.tools.args import positive_float  # noqa: E402
from mgmlora.tools.memory import (  # noqa: E402
    cheapest_fix,
    estimate,
    format_estimate,
    largest_batch_size,
    run_from_tree,
)
from mgmlora.tools.speed_plan import candidates  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, estimates, prints; returns the JSON-able result."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="YAML config; repeat to compose")
    parser.add_argument("--gpu_memory_gib", type=positive_float, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args, overrides = parser.parse_known_args(argv)
    run = run_from_tree(parse_files(args.config, overrides))
    est = estimate(*run)
    result = {"configs": args.config, "overrides": overrides, "items_gib": est.items, "total_gib": est.total_gib,
              "trainable_per_component": est.trainable, "settings": est.settings}
    if args.gpu_memory_gib is not None:
        result["budget_gib"] = args.gpu_memory_gib
        result["fits"] = est.fits(args.gpu_memory_gib)
        if not result["fits"]:
            fix = cheapest_fix(*run, args.gpu_memory_gib)
            result["cheapest_fix"] = {"change": fix[0], "total_gib": fix[1].total_gib} if fix else None
        result["largest_batch_size"] = largest_batch_size(*run, args.gpu_memory_gib)
        result["fastest_fitting"] = [vars(s) for s in candidates(*run, args.gpu_memory_gib)]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_estimate(est, args.gpu_memory_gib))
        if "largest_batch_size" in result:
            print(f"largest micro-batch that fits at this length: {result['largest_batch_size']} "
                  f"(data.batch_size; divide accumulate_grad_batches to keep the global batch)")
        if result.get("fastest_fitting"):
            best = candidates(*run, args.gpu_memory_gib)
            packing = "" if run[3].packing else " with model.speed.packing true (padding would cost compute)"
            print(f"settings that fit, best first (mgmlora.tools.speed_plan: measured tokens/s, then its rule)"
                  f"{packing}:")
            for rank, setting in enumerate(best, 1):
                print(f"  {rank}. {setting.describe()}")
        if result.get("fits") is False:
            fix = result["cheapest_fix"]
            combine = ("lower model.lora.r, target fewer modules (model.lora.target_experts: false) and shorten "
                       "max_length (a 4-bit MoE base runs without DeepSpeed; ZeRO-3 cannot partition 4-bit "
                       "weights)" if run[0].quantization else "combine offload, a smaller micro-batch and a shorter "
                       "max_length, or use more GPUs with ZeRO-3")
            print(f"cheapest change that fits: {fix['change']} -> {fix['total_gib']:.2f} GiB" if fix else
                  f"no single change fits; {combine}.")
    return result


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)
