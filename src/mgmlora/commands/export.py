"""`mgmlora export`: a run's adapter as a PEFT directory, or merged into its base model (mgmlora.tools.export).

    mgmlora export --checkpoint lightning_logs/<run>/version_0/checkpoints/last.ckpt --output out/adapter
    mgmlora export --checkpoint <ckpt or adapter dir> --output out/merged --merge [--dtype bfloat16]
        [--model_path /models/MGM-2B]   # base weights, when not (or not the same) as in the run's settings

Without --merge: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors), the non-LoRA trainables
(MGM projector and mining) in non_lora_trainables.safetensors, and the run's training config; loadable with plain
`peft.PeftModel.from_pretrained`. With --merge: a standalone checkpoint in the base model's layout (standard Hugging
Face directory for Qwen; original MGM layout for MGM), sharded safetensors with an index, tokenizer included.
Works from mgmlora checkpoints, DeepSpeed checkpoints (ZeRO-2/3) and exported adapter directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jsonargparse.typing import PositiveFloat

from mgmlora.commands.parsing import parse_settings
from mgmlora.models.args import PresetName
from mgmlora.models.dtypes import DtypeName
from mgmlora.offline import enforce
from mgmlora.tools.args import refuse_overwrite
from mgmlora.tools.export import export_adapter, merge_and_save, read_run_adapter
from mgmlora.tools.run_settings import run_settings


@dataclass
class ExportSettings:
    """What `mgmlora export` reads and writes."""

    checkpoint: str
    """checkpoint directory (step=*.ckpt) or adapter directory"""
    output: Path
    """the directory to write (refused when it holds files, unless --overwrite)"""
    merge: bool = False
    """merge LoRA into the base and write a full checkpoint"""
    dtype: DtypeName | None = None
    """dtype of the merged weights (default: the run's model.dtype)"""
    model_path: str | None = None
    """local base model directory (overrides the run's)"""
    trust_remote_code: bool = False
    """allow Python code inside the base model directory to run (never taken from a checkpoint)"""
    preset: PresetName | None = None
    """registry preset of the base (random-init runs)"""
    tokenizer_path: str | None = None
    """tokenizer directory (overrides the run's, e.g. a relative one from another directory)"""
    max_shard_gib: PositiveFloat = 5.0
    """largest safetensors shard of a merged model, GiB"""
    overwrite: bool = False
    """replace a non-empty --output (written beside it, swapped in when complete)"""


def export(settings: ExportSettings) -> Path:
    """Exports or merges as `settings` say; returns the output directory."""
    enforce()
    refuse_overwrite({"--output": settings.output}, folders={"--checkpoint": settings.checkpoint})
    run = read_run_adapter(settings.checkpoint)
    if not settings.merge:
        out = export_adapter(run, settings.output, settings.overwrite)
        print(f"mgmlora: adapter exported to {out}")
        return out
    model_args = run_settings(run).model_args(settings.model_path, settings.preset, settings.dtype,
                                              settings.trust_remote_code, settings.tokenizer_path)
    # the run's own base too, not only --model_path: the merge must never write into the weights it reads
    refuse_overwrite({"--output": settings.output}, folders={"--model_path": model_args.model_path,
                                                             "--tokenizer_path": model_args.tokenizer_path})
    out = merge_and_save(run, model_args, settings.output, int(settings.max_shard_gib * 2**30), settings.overwrite)
    print(f"mgmlora: merged model written to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """`mgmlora export ...`: parses the command line and exports."""
    return export(parse_settings(ExportSettings, argv, __doc__.split("\n")[0], prog="mgmlora export"))


__all__ = ["ExportSettings", "export", "main"]
