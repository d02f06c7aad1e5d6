"""`mgmlora generate`: replies of a trained adapter, with the training prompts.

    # one question, optionally about an image (MGM); prints the replies as JSON
    mgmlora generate --checkpoint <ckpt or adapter dir> --prompt "What is in the picture?" --image cat.jpg
    # Chameleons test leaderboard: every data_item gets --n continuations (resumable)
    mgmlora generate --checkpoint <ckpt or adapter dir> --chameleons test_leaderboard.json \
        --output predictions.json [--n 5] [--train_path train.json]   # history source for history ablations

The base model, tokenizer and data settings (ablation, prompt role, max_length, training file for history) come from
the run (mgmlora.tools.run_settings); flags override them. Sampling flags are transformers.generate's
(mgmlora.models.generation.GenerationArgs), also readable from --generation_config. Every input and output is checked
before the model loads: a missing --image or --chameleons file, an --image for a text-only model, an --output that
exists (without --overwrite) or that is an input, a progress file made with other settings.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from mgmlora.commands.parsing import check_device, parse_settings
from mgmlora.data.datamodule import datamodule_from_section
from mgmlora.data.images import load_image
from mgmlora.data.prompts import AblationName
from mgmlora.errors import UsageError
from mgmlora.models import model_info
from mgmlora.models.args import PresetName
from mgmlora.models.causal_lm import load_tokenizer
from mgmlora.models.dtypes import DtypeName
from mgmlora.models.generation import GenerationArgs, generate_batch
from mgmlora.offline import enforce
from mgmlora.tools.args import refuse_finished_output, refuse_overwrite
from mgmlora.tools.export import build_trained_model, read_run_adapter
from mgmlora.tools.run_settings import run_settings


@dataclass
class GenerateSettings:
    """What `mgmlora generate` reads and writes; the sampling flags left unset come from --generation_config."""

    checkpoint: str
    """checkpoint directory (step=*.ckpt) or adapter directory"""
    prompt: str | None = None
    """one question (a user turn; Chameleons models expect --chameleons)"""
    chameleons: str | None = None
    """test_leaderboard.json to answer"""
    image: str | None = None
    """image for --prompt (MGM)"""
    output: Path | None = None
    """predictions file for --chameleons"""
    overwrite: bool = False
    """replace an existing --output that no progress file of these settings belongs to"""
    n: PositiveInt = 5
    """continuations per data_item (--chameleons)"""
    model_path: str | None = None
    """local base model directory (overrides the run's)"""
    trust_remote_code: bool = False
    """allow Python code inside the base model directory to run (never taken from a checkpoint)"""
    preset: PresetName | None = None
    """registry preset of the base (random-init runs)"""
    tokenizer_path: str | None = None
    """tokenizer directory (overrides the run's, e.g. a relative one from another directory)"""
    dtype: DtypeName | None = None
    """dtype of the base (default: the run's model.dtype)"""
    device: str | None = None
    """torch device (default: cuda when available, else cpu)"""
    ablation: AblationName | None = None
    """persona prompt ablation (default: the run's)"""
    prompt_role: Literal["system", "user"] | None = None
    """where the persona prompt goes (default: the run's)"""
    max_length: PositiveInt | None = None
    """longest prompt in tokens (default: the run's)"""
    train_path: str | None = None
    """training file for history ablations (default: the run's)"""
    image_aspect_ratio: Literal["pad", "square"] | None = None
    """how an image is fitted (default: the run's)"""
    generation_config: Path | None = None
    """YAML with GenerationArgs fields (e.g. configs/generate/chameleons_leaderboard.yaml); flags override it"""
    max_new_tokens: PositiveInt | None = None
    """longest reply in tokens"""
    do_sample: bool | None = None
    """sample (true) or greedy decoding (false)"""
    temperature: PositiveFloat | None = None
    """softmax temperature when sampling"""
    top_p: float | None = None
    """nucleus sampling mass, in (0, 1]"""
    top_k: NonNegativeInt | None = None
    """keep the k most likely tokens (0 disables)"""
    repetition_penalty: PositiveFloat | None = None
    """>1 discourages repeats"""
    num_return_sequences: PositiveInt | None = None
    """replies per prompt (--prompt)"""
    seed: int | None = None
    """torch seed set before each batch"""
    batch_size: PositiveInt | None = None
    """prompts per generate call"""


def generation_args(path: Path | None, overrides: dict) -> GenerationArgs:
    """GenerationArgs from a YAML file (unknown keys are an error naming them), then command-line overrides."""
    values = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(values) - {f.name for f in fields(GenerationArgs)})
        if unknown:
            raise ValueError(f"{path}: unknown generation settings {unknown}; valid: "
                             f"{[f.name for f in fields(GenerationArgs)]}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationArgs(**values)


def _defaults(datamodule: type) -> dict:
    """A DataModule's own defaults: what training used where the run's settings have no such key (another class)."""
    return {name: p.default for name, p in inspect.signature(datamodule).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_inputs(settings: GenerateSettings) -> None:
    """Refuses what can be refused from the command line alone, before anything is read."""
    if (settings.prompt is None) == (settings.chameleons is None):
        raise UsageError("pass exactly one of --prompt (one question) and --chameleons (a leaderboard file).")
    check_device(settings.device)
    if settings.image is not None:  # decoded here: a non-image, a symlink loop or a missing file fails before the load
        load_image(settings.image, "--image")
    for flag, path in (("--chameleons", settings.chameleons), ("--generation_config", settings.generation_config)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {str(path)!r} is not a file.")
    if settings.chameleons is not None:
        if settings.output is None:
            raise UsageError("--chameleons needs --output (the predictions file).")
        if settings.image is not None:
            raise UsageError("--image goes with --prompt, not --chameleons.")


def generate(settings: GenerateSettings):
    """Checks every input, then loads the trained model and generates; returns the replies or the leaderboard summary.

    The sampling settings sharing a name with GenerationArgs fields override --generation_config's.
    """
    enforce()
    _check_inputs(settings)
    gen = generation_args(settings.generation_config,
                          {f.name: getattr(settings, f.name) for f in fields(GenerationArgs)})
    if settings.chameleons:
        from mgmlora.tools.leaderboard import output_files

        outputs = output_files(settings.output)
        refuse_overwrite(outputs, files={"--chameleons": settings.chameleons, "--train_path": settings.train_path},
                         folders={"--checkpoint": settings.checkpoint, "--model_path": settings.model_path})
        refuse_finished_output(outputs, settings.overwrite)

    run = read_run_adapter(settings.checkpoint)
    saved = run_settings(run)
    model_args = saved.model_args(settings.model_path, settings.preset, settings.dtype, settings.trust_remote_code,
                                  settings.tokenizer_path)
    info = model_info(model_args)  # from config files: what the model takes, before its weights load
    if settings.image is not None and not info.takes_images:
        raise UsageError(f"--image needs an image-text model; {model_args.model_path or model_args.preset} is text "
                         "only.")
    data = saved.data_init_args
    if settings.chameleons:  # everything that can be refused is checked before the model loads
        from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
        from mgmlora.data.prompts import get_ablation
        from mgmlora.tools.leaderboard import read_progress
        from mgmlora.tools.leaderboard import run_settings as leaderboard_settings

        unset = [flag for flag, value in (("--ablation", settings.ablation), ("--prompt_role", settings.prompt_role),
                                          ("--max_length", settings.max_length)) if value is None]
        if saved.data is None and unset:  # the defaults would silently replace the prompts the run trained on
            raise UsageError(f"{settings.checkpoint}: no data settings of the run found beside it (neither a "
                             "training_config.yaml inside it nor a config.yaml with a data section above it), so the "
                             f"prompts it trained on are unknown; pass {', '.join(unset)} (the run's data.init_args), "
                             "or use an adapter exported with bin/export.py, which carries them.")
        data = {**_defaults(ChameleonsDataModule), **data}  # the training defaults where the run names no such key
        ablation = settings.ablation or data["ablation"]
        prompt_role = settings.prompt_role or data["prompt_role"]
        max_length = settings.max_length or data["max_length"]
        train_path = settings.train_path or data.get("train_path")
        use_history = get_ablation(ablation).use_history
        if use_history and (not train_path or not Path(train_path).is_file()):
            raise UsageError(f"ablation {ablation} uses history: pass --train_path (the training file).")
        gen = replace(gen, num_return_sequences=settings.n)  # greedy decoding with --n > 1 is refused here
        read_progress(settings.output, leaderboard_settings(
            settings.chameleons, settings.n, gen, ablation, prompt_role, max_length, data["mark_omitted"],
            use_history, data["max_history"], settings.checkpoint))

    import torch

    tokenizer = load_tokenizer(model_args)
    question = None if settings.chameleons else _question(settings, tokenizer, info, data, gen.max_new_tokens)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = build_trained_model(run, model_args, device=device)
    model, info = loaded.model.to(device).eval(), loaded.info

    if settings.chameleons:
        from mgmlora.data.chameleons_datamodule import PersonaEncoder
        from mgmlora.tools.leaderboard import predict_leaderboard

        encoder = PersonaEncoder(tokenizer, max_length, ablation, prompt_role, data["mark_omitted"])
        history = None
        if use_history:
            kept = ("max_data_items", "sample_seed", "split", "val_ratio", "split_seed", "max_history")
            dm = datamodule_from_section({"class_path": "mgmlora.data.chameleons_datamodule.ChameleonsDataModule",
                                          "init_args": {k: v for k, v in data.items() if k in kept}},
                                         {"train_path": train_path})
            dm.connect(tokenizer, info)
            history = dm.training_dialogues()
        summary = predict_leaderboard(model, tokenizer, encoder, settings.chameleons, settings.output, gen,
                                      settings.n, history, data["max_history"], checkpoint=settings.checkpoint)
        print(json.dumps(summary, indent=2))
        return summary

    rows, inputs = question
    if info.takes_images:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        replies = generate_batch(target, tokenizer, rows, gen, {k: v[None] for k, v in inputs.items()})[0]  # (1, ...)
    else:
        replies = generate_batch(model, tokenizer, rows, gen)[0]
    print(json.dumps({"prompt": settings.prompt, "image": settings.image, "replies": replies}, ensure_ascii=False,
                     indent=2))
    return replies


def _question(settings: GenerateSettings, tokenizer, info, data: dict, max_new_tokens: int
              ) -> tuple[list[list[int]], dict]:
    """--prompt's token row (and --image's model inputs) in the training template, checked against the run's length.

    Like validation's generation, prompt + `max_new_tokens` must fit the run's max_length (after the image's
    expansion), the longest sequence it trained on; a longer question is refused rather than cut.
    """
    if info.takes_images:
        from mgmlora.data.llava import generation_prompt
        from mgmlora.data.llava_datamodule import LlavaDataModule

        processor = info.processor
        aspect = settings.image_aspect_ratio or {**_defaults(LlavaDataModule), **data}["image_aspect_ratio"]
        inputs = processor.image_inputs(load_image(settings.image, "--image") if settings.image else None, aspect)
        rows = [generation_prompt(tokenizer, processor, settings.prompt, has_image=settings.image is not None)]
        positions = len(rows[0]) + (processor.image_tokens - 1 if settings.image else 0)
        limit = settings.max_length or data.get("max_length") or processor.max_length
    else:
        from mgmlora.data.chat import question_prompt

        inputs, rows = {}, [question_prompt(tokenizer, settings.prompt)]
        positions, limit = len(rows[0]), settings.max_length or data.get("max_length")
    if limit and positions + max_new_tokens > limit:
        raise UsageError(f"--prompt takes {positions} positions in the training template"
                         f"{' (with the image)' if settings.image else ''}; with --max_new_tokens {max_new_tokens} "
                         f"that passes the run's max_length {limit}: shorten the prompt, lower --max_new_tokens, or "
                         "pass a larger --max_length.")
    return rows, inputs


def main(argv: list[str] | None = None):
    """`mgmlora generate ...`: parses the command line and generates."""
    return generate(parse_settings(GenerateSettings, argv, __doc__.split("\n")[0], prog="mgmlora generate"))


__all__ = ["GenerateSettings", "generate", "generation_args", "main"]
