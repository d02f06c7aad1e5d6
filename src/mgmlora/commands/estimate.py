"""`mgmlora estimate`: the peak GPU memory of a config before launching it (no weights are loaded).

    mgmlora estimate --config configs/mgm2b_lora.yaml [--config configs/strategy/zero2_offload.yaml]
        [--gpu_memory_gib 24] [--json] [--model.trainable.llm full ...]   # dotted overrides, as for `mgmlora fit`

Prints an itemised estimate per device (base weights, vision towers, LoRA/trainable weights, gradients, optimizer
states with the ZeRO stage and offload, activations with or without checkpointing, the LM head + loss block,
DeepSpeed buffers), trainable parameters per component, and with --gpu_memory_gib a verdict, the cheapest change that
would fit, the largest micro-batch that fits, and the settings that fit, best first (base, checkpointing,
micro-batch: mgmlora.tools.speed_plan, ranked by the committed measurements, each figure with its result file).
Method and accuracy: mgmlora.tools.memory.

The config, its overrides and this tool's own flags are parsed by one parser, `mgmlora fit`'s with the flags below
added (mgmlora.cli.parse_config): a typo in any of them is refused before anything is estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jsonargparse.typing import PositiveFloat

from mgmlora.cli import parse_config
from mgmlora.commands.parsing import add_settings
from mgmlora.tools.memory import cheapest_fix, estimate, format_estimate, largest_batch_size, run_from_tree
from mgmlora.tools.speed_plan import candidates


@dataclass
class EstimateSettings:
    """`mgmlora estimate`'s own flags (the config and its overrides are `mgmlora fit`'s)."""

    gpu_memory_gib: PositiveFloat | None = None
    """the GPU's memory: adds a verdict, the cheapest fix, the largest micro-batch and the fastest fitting setting"""
    json: bool = False
    """print JSON instead of the table"""


def _parse(argv: list[str] | None) -> tuple[EstimateSettings, dict]:
    config = parse_config(argv, lambda parser: add_settings(parser, EstimateSettings))
    settings = EstimateSettings(gpu_memory_gib=config.pop("gpu_memory_gib"), json=config.pop("json"))
    return settings, config


def main(argv: list[str] | None = None) -> dict:
    """`mgmlora estimate ...`: parses, estimates, prints; returns the JSON-able result."""
    settings, config = _parse(argv)
    budget = settings.gpu_memory_gib
    run = run_from_tree(config)
    est = estimate(*run)
    result = {"configs": [str(p) for p in config.get("config") or []], "items_gib": est.items,
              "total_gib": est.total_gib, "trainable_per_component": est.trainable, "settings": est.settings}
    if budget is not None:
        result["budget_gib"] = budget
        result["fits"] = est.fits(budget)
        if not result["fits"]:
            fix = cheapest_fix(*run, budget)
            result["cheapest_fix"] = {"change": fix[0], "total_gib": fix[1].total_gib} if fix else None
        result["largest_batch_size"] = largest_batch_size(*run, budget)
        result["fastest_fitting"] = [vars(s) for s in candidates(*run, budget)]
    if settings.json:
        print(json.dumps(result, indent=2, default=str))
        return result
    print(format_estimate(est, budget))
    if "largest_batch_size" in result:
        print(f"largest micro-batch that fits at this length: {result['largest_batch_size']} "
              f"(data.batch_size; divide accumulate_grad_batches to keep the global batch)")
    if result.get("fastest_fitting"):
        best = candidates(*run, budget)
        packing = "" if run[3].packing else " with model.speed.packing true (padding would cost compute)"
        print(f"settings that fit, best first (mgmlora.tools.speed_plan: measured tokens/s, then its rule)"
              f"{packing}:")
        for rank, setting in enumerate(best, 1):
            print(f"  {rank}. {setting.describe()}")
    if result.get("fits") is False:
        fix = result["cheapest_fix"]
        combine = ("lower model.lora.r, target fewer modules (model.lora.target_experts: false) and shorten "
                   "max_length (a quantised MoE base runs without DeepSpeed; ZeRO-3 cannot partition "
                   "quantised weights)" if run[0].quantization else "combine offload, a smaller micro-batch and a "
                   "shorter max_length, or use more GPUs with ZeRO-3")
        print(f"cheapest change that fits: {fix['change']} -> {fix['total_gib']:.2f} GiB" if fix else
              f"no single change fits; {combine}.")
    return result


__all__ = ["EstimateSettings", "main"]
