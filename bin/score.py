#!/usr/bin/env python
"""Score a checkpoint or exported adapter on a data file: predictions JSONL plus a summary JSON of the scores.

    python bin/score.py --checkpoint <ckpt or adapter dir> --data val.json --output scores/val.jsonl \
        [--num_samples 200] [--max_new_tokens 64] [--data_config configs/x.yaml] [--image_folder images/]

The data file is read with the run's DataModule (the `data` section of its config.yaml, or of --data_config), so the
prompts, references and metrics are those of validation's val_gen/* (mgmlora.tools.score). Rerun the same command to
resume after an interruption; a rerun with other settings is refused (use a new --output, or delete the
<output>.partial.jsonl it names).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

import torch  # noqa: E402

from mgmlora.errors import run  # noqa: E402
from mgmlora.tools.args import positive_int, refuse_overwrite  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parses arguments, checks the outputs and the progress file, loads the model and scores; returns the summary."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (step=*.ckpt) or adapter directory")
    parser.add_argument("--data", required=True, help="data file in the run's format (Chameleons, chat, LLaVA JSON)")
    parser.add_argument("--output", required=True, type=Path, help="predictions JSONL (summary JSON beside it)")
    parser.add_argument("--data_config", type=Path, default=None,
                        help="YAML with a `data` section (default: the run's config.yaml)")
    parser.add_argument("--image_folder", default=None, help="image folder for LLaVA data (default: the run's)")
    parser.add_argument("--num_samples", type=positive_int, default=None,
                        help="a seeded subset of this many items (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset (and of sampling)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--metrics", choices=["auto", "text", "vqa"], default="auto")
    parser.add_argument("--model_path", default=None, help="local base model directory (overrides the run's)")
    parser.add_argument("--preset", default=None, help="registry preset of the base (random-init runs)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow Python code inside the base model directory to run (never taken from a checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from mgmlora.models.causal_lm import load_tokenizer
    from mgmlora.models.generation import GenerationArgs
    from mgmlora.tools.export import build_trained_model, model_args_for, read_run_adapter
    from mgmlora.tools.leaderboard import output_files
    from mgmlora.tools.progress_file import read_entries
    from mgmlora.tools.score import build_datamodule, data_section, score_items, score_settings

    refuse_overwrite(output_files(args.output), files={"--data": args.data},
                     folders={"--checkpoint": args.checkpoint, "--model_path": args.model_path})
    run_adapter = read_run_adapter(args.checkpoint)
    section = data_section(run_adapter.run_config, args.data_config)
    datamodule = build_datamodule(section, args.data, {"image_folder": args.image_folder})
    kind = args.metrics if args.metrics != "auto" else ("vqa" if datamodule.takes_images else "text")
    gen = GenerationArgs(max_new_tokens=args.max_new_tokens, do_sample=False, seed=args.seed,
                         batch_size=args.batch_size)
    settings = score_settings(args.checkpoint, args.data, section, args.num_samples, args.seed, gen, kind)
    read_entries(output_files(args.output)["progress file"], settings)  # a mismatch is refused before loading

    model_args = model_args_for(run_adapter, args.model_path, args.preset, args.dtype, args.trust_remote_code)
    loaded = build_trained_model(run_adapter, model_args)
    loaded.model.to(args.device).eval()
    datamodule.connect(load_tokenizer(model_args), loaded.info)
    datamodule.setup("test")
    items = datamodule.generation_subset("test", args.num_samples, args.seed, args.max_new_tokens)
    summary = score_items(loaded, datamodule, items, args.output, settings, gen, kind)
    print(json.dumps({k: summary[k] for k in ("output", "items", "generated_now", "scores")}, indent=2))
    return summary


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)
