"""`mgmlora score`: a checkpoint or exported adapter on a data file, predictions JSONL plus a summary JSON of scores.

    mgmlora score --checkpoint <ckpt or adapter dir> --data val.json --output scores/val.jsonl \
        [--num_samples 200] [--max_new_tokens 64] [--data_config configs/x.yaml] [--image_folder images/]

The data file is read with the run's DataModule (the `data` section of its settings, mgmlora.tools.run_settings, or
of --data_config), so the prompts, references and metrics are those of validation's val_gen/* (mgmlora.tools.score).
Rerun the same command to resume after an interruption; a rerun with other settings is refused (use a new --output,
or delete the <output>.partial.jsonl it names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveInt

from mgmlora.commands.parsing import check_device, parse_settings
from mgmlora.errors import UsageError
from mgmlora.models.args import PresetName
from mgmlora.models.dtypes import DtypeName
from mgmlora.offline import enforce
from mgmlora.tools.args import refuse_finished_output, refuse_overwrite


@dataclass
class ScoreSettings:
    """What `mgmlora score` reads and writes."""

    checkpoint: str
    """checkpoint directory (step=*.ckpt) or adapter directory"""
    data: str
    """data file in the run's format (Chameleons, chat, LLaVA JSON)"""
    output: Path
    """predictions JSONL (summary JSON beside it)"""
    data_config: Path | None = None
    """YAML with a `data` section (default: the run's config.yaml)"""
    image_folder: str | None = None
    """image folder for LLaVA data (default: the run's)"""
    num_samples: PositiveInt | None = None
    """a seeded subset of this many items (default: all)"""
    seed: int = 0
    """seed of the subset (and of sampling)"""
    max_new_tokens: PositiveInt = 64
    """longest reply in tokens"""
    batch_size: PositiveInt = 8
    """prompts per generate call"""
    metrics: Literal["auto", "text", "vqa"] = "auto"
    """text metrics, VQA metrics, or auto (vqa for image-text data)"""
    model_path: str | None = None
    """local base model directory (overrides the run's)"""
    preset: PresetName | None = None
    """registry preset of the base (random-init runs)"""
    tokenizer_path: str | None = None
    """tokenizer directory (overrides the run's, e.g. a relative one from another directory)"""
    dtype: DtypeName | None = None
    """dtype of the base (default: the run's model.dtype)"""
    trust_remote_code: bool = False
    """allow Python code inside the base model directory to run (never taken from a checkpoint)"""
    device: str | None = None
    """torch device (default: cuda when available, else cpu)"""
    overwrite: bool = False
    """replace an existing --output (and its summary) that no progress file of these settings belongs to"""


def score(settings: ScoreSettings) -> dict:
    """Checks the inputs, outputs and progress file, then loads the model and scores; returns the summary."""
    enforce()
    import torch

    from mgmlora.models.causal_lm import load_tokenizer
    from mgmlora.models.generation import GenerationArgs
    from mgmlora.tools.export import build_trained_model, read_run_adapter
    from mgmlora.tools.leaderboard import output_files
    from mgmlora.tools.progress_file import read_entries
    from mgmlora.tools.run_settings import run_settings
    from mgmlora.tools.score import build_datamodule, score_items, score_settings

    if not Path(settings.data).is_file():
        raise UsageError(f"--data {settings.data!r} is not a file.")
    outputs = output_files(settings.output)
    refuse_overwrite(outputs, files={"--data": settings.data},
                     folders={"--checkpoint": settings.checkpoint, "--model_path": settings.model_path})
    refuse_finished_output(outputs, settings.overwrite)
    check_device(settings.device)
    run_adapter = read_run_adapter(settings.checkpoint)
    saved = run_settings(run_adapter, settings.data_config)
    if saved.data is None:
        raise UsageError(f"{saved.source}: no `data: {{class_path, init_args}}` section to read the data file with; "
                         "pass --data_config with one (e.g. the run's config.yaml or configs/*.yaml).")
    datamodule = build_datamodule(saved.data, settings.data, {"image_folder": settings.image_folder})
    kind = settings.metrics if settings.metrics != "auto" else ("vqa" if datamodule.takes_images else "text")
    gen = GenerationArgs(max_new_tokens=settings.max_new_tokens, do_sample=False, seed=settings.seed,
                         batch_size=settings.batch_size)
    recorded = score_settings(settings.checkpoint, settings.data, saved.data, settings.num_samples, settings.seed,
                              gen, kind)
    read_entries(output_files(settings.output)["progress file"], recorded)  # a mismatch is refused before loading

    model_args = saved.model_args(settings.model_path, settings.preset, settings.dtype, settings.trust_remote_code,
                                  settings.tokenizer_path)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = build_trained_model(run_adapter, model_args, device=device)
    loaded.model.to(device).eval()
    datamodule.connect(load_tokenizer(model_args), loaded.info)
    datamodule.setup("test")
    items = datamodule.generation_subset("test", settings.num_samples, settings.seed, settings.max_new_tokens)
    summary = score_items(loaded, datamodule, items, settings.output, recorded, gen, kind)
    print(json.dumps({k: summary[k] for k in ("output", "items", "generated_now", "scores")}, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """`mgmlora score ...`: parses the command line and scores."""
    return score(parse_settings(ScoreSettings, argv, __doc__.split("\n")[0], prog="mgmlora score"))


__all__ = ["ScoreSettings", "main", "score"]
