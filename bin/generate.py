#!/usr/bin/env python
"""Generate with a trained adapter, using the training prompts.

    # one question, optionally about an image (MGM); prints the replies as JSON
    python bin/generate.py --checkpoint <ckpt or adapter dir> --prompt "What is in the picture?" --image cat.jpg
    # Chameleons test leaderboard: every data_item gets --n continuations (resumable)
    python bin/generate.py --checkpoint <ckpt or adapter dir> --chameleons test_leaderboard.json \
        --output predictions.json [--n 5] [--train_path train.json]   # history source for history ablations

The base model, tokenizer and data settings (ablation, prompt role, max_length, training file for history) come from
the run (checkpoint hyperparameters, `<log_dir>/config.yaml`); flags override them. Sampling flags are
transformers.generate's (mgmlora.tools.generate.GenerationArgs). `--model_path` points at local base weights.
"""

import argparse
import inspect
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing

import torch  # noqa: E402

from mgmlora.errors import run  # noqa: E402
from mgmlora.models.causal_lm import load_tokenizer  # noqa: E402
from mgmlora.tools.args import non_negative_int, positive_float, positive_int, refuse_overwrite  # noqa: E402
from mgmlora.tools.export import build_trained_model, model_args_for, read_run_adapter  # noqa: E402
from mgmlora.tools.generate import GenerationArgs, generate_batch  # noqa: E402

# count-like and size-like sampling flags: refused by argparse itself, before the model loads
_FLAG_TYPES = {"max_new_tokens": positive_int, "num_return_sequences": positive_int, "batch_size": positive_int,
               "top_k": non_negative_int, "temperature": positive_float, "repetition_penalty": positive_float}


def generation_args(path: Path | None, overrides: dict) -> GenerationArgs:
    """GenerationArgs from a YAML file (unknown keys are an error naming them), then command-line overrides."""
    values = {}
    if path is not None:
        values = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(values) - {f.name for f in fields(GenerationArgs)})
        if unknown:
            raise ValueError(f"{path}: unknown generation settings {unknown}; valid: "
                             f"{[f.name for f in fields(GenerationArgs)]}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationArgs(**values)


def _defaults(datamodule: type) -> dict:
    """A DataModule's own defaults, so that generation prompts as training did where the run's config is silent."""
    return {name: p.default for name, p in inspect.signature(datamodule).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _data_settings(run) -> dict:
    if run.run_config is None:
        return {}
    return (yaml.safe_load(run.run_config.read_text()).get("data") or {}).get("init_args") or {}


def main(argv: list[str] | None = None):
    """Parses arguments, loads the trained model and generates; returns the replies or the leaderboard summary."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model_path", default=None)
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow Python code inside the base model directory to run (never taken from a checkpoint)")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="one question (a user turn; Chameleons models expect --chameleons)")
    mode.add_argument("--chameleons", help="test_leaderboard.json to answer")
    parser.add_argument("--image", default=None, help="image for --prompt (MGM)")
    parser.add_argument("--output", type=Path, default=None, help="predictions file for --chameleons")
    parser.add_argument("--n", type=positive_int, default=5, help="continuations per data_item (--chameleons)")
    parser.add_argument("--ablation", default=None)
    parser.add_argument("--prompt_role", choices=["system", "user"], default=None)
    parser.add_argument("--max_length", type=positive_int, default=None)
    parser.add_argument("--train_path", default=None, help="training file for history ablations")
    parser.add_argument("--image_aspect_ratio", choices=["pad", "square"], default=None)
    parser.add_argument("--generation_config", type=Path, default=None,
                        help="YAML with GenerationArgs fields (e.g. configs/generate/chameleons_leaderboard.yaml); "
                             "flags given on the command line override it")
    for f in fields(GenerationArgs):
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name}", type=_FLAG_TYPES.get(f.name, kind), default=None)
    args = parser.parse_args(argv)
    gen = generation_args(args.generation_config, {f.name: getattr(args, f.name) for f in fields(GenerationArgs)})
    if args.chameleons:
        if args.output is None:
            parser.error("--chameleons needs --output")
        from mgmlora.tools.leaderboard import output_files

        refuse_overwrite(output_files(args.output), files={"--chameleons": args.chameleons,
                                                           "--train_path": args.train_path},
                         folders={"--checkpoint": args.checkpoint, "--model_path": args.model_path})

    run = read_run_adapter(args.checkpoint)
    model_args = model_args_for(run, args.model_path, args.preset, args.dtype, args.trust_remote_code)
    data = _data_settings(run)
    if args.chameleons:  # everything that can be refused is checked before the model loads
        from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
        from mgmlora.data.prompts import get_ablation
        from mgmlora.tools.leaderboard import read_progress, run_settings

        data = {**_defaults(ChameleonsDataModule), **data}  # the training defaults where the run's config has none
        ablation = args.ablation or data["ablation"]
        prompt_role = args.prompt_role or data["prompt_role"]
        max_length = args.max_length or data["max_length"]
        train_path = args.train_path or data.get("train_path")
        use_history = get_ablation(ablation).use_history
        if use_history and (not train_path or not Path(train_path).is_file()):
            parser.error(f"ablation {ablation} uses history: pass --train_path (the training file).")
        gen = replace(gen, num_return_sequences=args.n)  # greedy decoding with --n > 1 is refused here
        read_progress(args.output, run_settings(args.chameleons, args.n, gen, ablation, prompt_role, max_length,
                                                data["mark_omitted"], use_history, data["max_history"],
                                                args.checkpoint))

    loaded = build_trained_model(run, model_args)
    model, info = loaded.model.to(args.device).eval(), loaded.info
    tokenizer = load_tokenizer(model_args)

    if args.chameleons:
        from mgmlora.data.chameleons_datamodule import PersonaEncoder
        from mgmlora.tools.leaderboard import predict_leaderboard

        encoder = PersonaEncoder(tokenizer, max_length, ablation, prompt_role, data["mark_omitted"])
        history = None
        if use_history:
            dm = ChameleonsDataModule(train_path, **{k: v for k, v in data.items() if k in (
                "max_data_items", "sample_seed", "split", "val_ratio", "split_seed", "max_history")})
            dm.connect(tokenizer, info)
            history = dm.training_dialogues()
        summary = predict_leaderboard(model, tokenizer, encoder, args.chameleons, args.output, gen, args.n, history,
                                      data["max_history"], checkpoint=args.checkpoint)
        print(json.dumps(summary, indent=2))
        return summary

    if info.takes_images:
        from mgmlora.data.images import load_image
        from mgmlora.data.llava import generation_prompt
        from mgmlora.data.llava_datamodule import LlavaDataModule

        aspect = args.image_aspect_ratio or {**_defaults(LlavaDataModule), **data}["image_aspect_ratio"]
        inputs = info.processor.image_inputs(load_image(args.image, "--image") if args.image else None, aspect)
        rows = [generation_prompt(tokenizer, info.processor, args.prompt, has_image=args.image is not None)]
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        replies = generate_batch(target, tokenizer, rows, gen, {k: v[None] for k, v in inputs.items()})[0]  # (1, ...)
    else:
        if args.image:
            parser.error("--image needs an MGM model.")
        from mgmlora.data.chat import question_prompt

        rows = [question_prompt(tokenizer, args.prompt)]
        replies = generate_batch(model, tokenizer, rows, gen)[0]
    print(json.dumps({"prompt": args.prompt, "image": args.image, "replies": replies}, ensure_ascii=False, indent=2))
    return replies


if __name__ == "__main__":
    run(main)  # user errors as one line, --debug for the traceback (mgmlora.errors)
