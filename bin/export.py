#!/usr/bin/env python
"""Export a run's adapter, or merge it into its base model.

    python bin/export.py --checkpoint lightning_logs/<run>/version_0/checkpoints/last.ckpt --output out/adapter
    python bin/export.py --checkpoint <ckpt or adapter dir> --output out/merged --merge [--dtype bfloat16]
        [--model_path /models/MGM-2B]   # base weights, when not (or not the same) as in the run's settings

Without --merge: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors), the non-LoRA trainables
(MGM projector and mining) in non_lora_trainables.safetensors, and the run's training config; loadable with plain
`peft.PeftModel.from_pretrained`. With --merge: a standalone checkpoint in the base model's layout (standard Hugging
Face directory for Qwen; original MGM layout for MGM), sharded safetensors with an index, tokenizer included.
Works from mgmlora checkpoints, DeepSpeed checkpoints (ZeRO-2/3) and exported adapter directories. See
mgmlora.tools.export for details.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

from mgmlora.errors import run  # noqa: E402
from mgmlora.tools.args import positive_float, refuse_overwrite  # noqa: E402
from mgmlora.tools.export import export_adapter, merge_and_save, model_args_for, read_run_adapter  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    """Parses arguments and exports; returns the output directory."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (step=*.ckpt) or adapter directory")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the base and write a full checkpoint")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the merged weights (default: the run's model.dtype)")
    parser.add_argument("--model_path", default=None, help="local base model directory (overrides the run's)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow Python code inside the base model directory to run (never taken from a checkpoint)")
    parser.add_argument("--preset", default=None, help="registry preset of the base (random-init runs)")
    parser.add_argument("--max_shard_gib", type=positive_float, default=5.0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output (written beside it, swapped in when complete)")
    args = parser.parse_args(argv)
    refuse_overwrite({"--output": args.output}, folders={"--checkpoint": args.checkpoint})
    run = read_run_adapter(args.checkpoint)
    if not args.merge:
        out = export_adapter(run, args.output, args.overwrite)
        print(f"mgmlora: adapter exported to {out}")
        return out
    model_args = model_args_for(run, args.model_path, args.preset, args.dtype, args.trust_remote_code)
    # the run's own base too, not only --model_path: the merge must never write into the weights it reads
    refuse_overwrite({"--output": args.output}, folders={"--model_path": model_args.model_path,
                                                         "tokenizer_path": model_args.tokenizer_path})
    out = merge_and_save(run, model_args, args.output, int(args.max_shard_gib * 2**30), args.overwrite)
    print(f"mgmlora: merged model written to {out}")
    return out


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)
