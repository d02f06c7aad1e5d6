"""Adapters out of a run: a clean PEFT adapter directory, or a standalone merged checkpoint in the base model's layout.

Inputs, whatever wrote them:
- an mgmlora checkpoint directory (`step=*.ckpt/` from AdapterCheckpointIO: adapter files + trainer_state.pt),
- a DeepSpeed checkpoint directory (`step=*.ckpt/checkpoint/*model_states.pt`; mgmlora's LightningModule stores the
  gathered adapter and trainables in it, so ZeRO-2 and ZeRO-3 runs export the same way),
- an exported adapter directory (`<log_dir>/adapter`, or any `PeftModel.save_pretrained` output).

The base model comes from the run's own settings (mgmlora.tools.run_settings: `<log_dir>/config.yaml`, else the
checkpoint's recorded hyperparameters) unless overridden.
Merging loads the base once in the target dtype (no fp32 copy of a bf16 model), merges LoRA with PEFT's
`safe_merge` (which refuses NaN results), and writes sharded safetensors with an index: a standard Hugging Face
directory for text LMs (loadable with `AutoModelForCausalLM.from_pretrained` and by vLLM), the original MGM layout and
config.json for MGM (loadable by MGM's own code and by `mgmlora.models.mgm_checkpoint.load_mgm`). The tokenizer is
copied in both cases.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from mgmlora.models import LoadedModel, load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.causal_lm import load_tokenizer
from mgmlora.models.dtypes import DtypeName
from mgmlora.models.identity import BASE_KEY, base_fingerprint, check_base
from mgmlora.tools.args import refuse_overwrite
from mgmlora.tools.output_dir import check_output_dir, writing_dir
from mgmlora.tools.run_settings import run_settings
from mgmlora.training.adapter_check import (
    check_adapter_tensors,
    check_lora_config,
    lora_config_from,
    read_lora_config,
    read_tensors,
)
from mgmlora.training.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RUN_SETTINGS,
    TRAINABLES,
    TRAINER_STATE,
    safe_load,
    write_adapter,
    write_tensors,
)
from mgmlora.training.lora import inject_lora
from mgmlora.training.trainable import load_trainables


@dataclass
class RunAdapter:
    """What a run trained: the LoRA config and weights (None without LoRA), other trainables, and the run's settings."""

    source: Path
    lora_config: LoraConfig | None
    adapter: dict[str, torch.Tensor]
    trainables: dict[str, torch.Tensor]
    hparams: dict = field(default_factory=dict)  # the checkpoint's record {"model": ..., "lora": ...}, if any
    run_config: Path | None = None  # the LightningCLI config.yaml of the run, when found
    base_fingerprint: str | None = None  # the base it was trained on (mgmlora.models.identity); None: not recorded


def _lora_config(value, source: Path) -> LoraConfig:
    return lora_config_from(value, source)  # refuses fields mgmlora does not implement (training.adapter_check)


def _find_run_config(path: Path) -> Path | None:
    """The run's LightningCLI config, if it can be found.

    Inside an exported adapter it is `training_config.yaml`; beside a run it is `<log_dir>/config.yaml` for
    `<log_dir>/checkpoints/x.ckpt` and `<log_dir>/adapter`.
    """
    if (path / "training_config.yaml").is_file():
        return path / "training_config.yaml"
    for parent in (path.parent, path.parent.parent):
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return None


def read_run_adapter(path: str | Path) -> RunAdapter:
    """Reads an mgmlora checkpoint, a DeepSpeed checkpoint or an adapter directory (see the module docstring).

    Raises:
        FileNotFoundError: when `path` holds none of them, naming what was looked for.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is not a directory (expected a *.ckpt checkpoint "
                                "directory or an adapter directory).")
    run_config = _find_run_config(path)
    hparams: dict = {}  # what the checkpoint recorded; the run's settings: mgmlora.tools.run_settings
    states = sorted((path / "checkpoint").glob("*model_states.pt"))
    if states:  # DeepSpeed: the LightningModule's client state sits in the (rank 0) model-states file
        state = safe_load(states[0], map_location="cpu")
        peft = state.get("peft")
        hparams = state.get("hyper_parameters") or {}
        if peft is None and not state.get("trainables"):
            raise FileNotFoundError(f"{states[0]} holds no adapter or trainables: it was not written by mgmlora's "
                                    "LoraLitModule.")
        config = _lora_config(peft["config"], states[0]) if peft else None
        return RunAdapter(path, config, dict(peft["adapter"]) if peft else {}, dict(state.get("trainables") or {}),
                          hparams, run_config, state.get(BASE_KEY))
    has_adapter, has_trainables = (path / ADAPTER_CONFIG).is_file(), (path / TRAINABLES).is_file()
    if not has_adapter and not has_trainables:
        raise FileNotFoundError(f"{path} holds no {ADAPTER_CONFIG}, {TRAINABLES} or checkpoint/*model_states.pt: "
                                "pass a checkpoint directory (step=*.ckpt) or an exported adapter directory.")
    base = None
    if (path / RUN_SETTINGS).is_file():
        hparams = json.loads((path / RUN_SETTINGS).read_text())
        base = hparams.pop(BASE_KEY, None)
    if (path / TRAINER_STATE).is_file():
        # mmap: only the small hyperparameter dict is read, not the optimizer state stored beside it
        state = safe_load(path / TRAINER_STATE, map_location="cpu", mmap=True)
        hparams = state.get("hyper_parameters") or hparams
        base = state.get(BASE_KEY, base)
    config = read_lora_config(path / ADAPTER_CONFIG) if has_adapter else None
    adapter = read_tensors(path / ADAPTER_WEIGHTS) if has_adapter else {}
    trainables = read_tensors(path / TRAINABLES) if has_trainables else {}
    return RunAdapter(path, config, adapter, trainables, hparams, run_config, base)


def model_args_for(run: RunAdapter, model_path: str | None = None, preset: str | None = None,
                   dtype: DtypeName | None = None, trust_remote_code: bool = False) -> ModelArgs:
    """The base model of `run`, with command-line overrides: `run_settings(run).model_args(...)`.

    The run's settings come from mgmlora.tools.run_settings (the one place a tool rebuilds them); `trust_remote_code`
    comes from the caller only (RunSettings.model_args).
    """
    return run_settings(run).model_args(model_path, preset, dtype, trust_remote_code)


def export_adapter(run: RunAdapter, out: str | Path, overwrite: bool = False) -> Path:
    """Writes a PEFT adapter directory (+ non-LoRA trainables, + the run's config) that plain PEFT loads.

    Written beside `out` and swapped in when complete (mgmlora.tools.output_dir).

    Raises:
        OutputPathError: when `out` is the run's directory or inside it.
        UsageError: when `out` already holds files and `overwrite` is False.
    """
    refuse_overwrite({"output": out}, folders={"checkpoint": run.source})
    check_output_dir(out, overwrite)
    if run.lora_config is not None:
        check_lora_config(run.lora_config, run.source)
    with writing_dir(out) as tmp:
        if run.lora_config is not None:
            write_adapter(tmp, run.lora_config, run.adapter)
        if run.trainables:
            write_tensors(tmp / TRAINABLES, run.trainables)
        if run.run_config is not None:
            shutil.copy(run.run_config, tmp / "training_config.yaml")
        settings = {**run.hparams, BASE_KEY: run.base_fingerprint}
        (tmp / RUN_SETTINGS).write_text(json.dumps(settings, indent=2, default=str))
    return Path(out)


def build_trained_model(run: RunAdapter, args: ModelArgs, quantize: bool = True,
                        device: str | torch.device | None = None) -> LoadedModel:
    """The base model with the run's adapter and trainables applied, behind its family's LoadedModel.

    Its `model` is the base model with the LoRA layers injected in place (PEFT's wrapper adds nothing to a LoRA
    forward), so the family methods (`generate`, `forward_hidden`, `save_merged`, ...) run the trained model.
    `quantize=False` puts a QLoRA run's adapter on the full-precision base it was trained against. `device`: where a
    quantised base is built and quantised, layer by layer (the device it will run on: its FP8 products are checked
    there, and nothing is quantised on the CPU to be copied over); other bases load on the CPU as before.
    """
    on_device = device is not None and quantize and args.quantization is not None
    with torch.device(device) if on_device else contextlib.nullcontext():
        return _with_adapter(run, args, quantize)[0]


def _with_adapter(run: RunAdapter, args: ModelArgs, quantize: bool = True) -> tuple[LoadedModel, PeftModel | None]:
    """(the loaded model with trainables and adapter applied, PEFT's wrapper of it or None without an adapter).

    `quantize=False` applies a QLoRA run's adapter to the full-precision base instead of the 4-bit one.
    """
    # before the base loads: an adapter on another base than its own loads silently and computes nonsense
    check_base(run.base_fingerprint, base_fingerprint(args), str(run.source), args.model_path or args.preset)
    loaded = load_model(args, quantize=quantize)
    load_trainables(loaded.model, run.trainables, f"{run.source} on {args.model_path or args.preset}")
    if run.lora_config is None:
        return loaded, None
    config = LoraConfig(**{**run.lora_config.to_dict(), "inference_mode": True})
    peft = inject_lora(loaded.model, config)  # injects the LoRA layers into loaded.model itself
    # missing, extra, base-weight, mis-shaped or non-float tensors are refused before any is applied
    check_adapter_tensors(run.source, get_peft_model_state_dict(peft, save_embedding_layers=False), run.adapter)
    set_peft_model_state_dict(peft, run.adapter)
    return loaded, peft


def merge_and_save(run: RunAdapter, args: ModelArgs, out: str | Path, max_shard_bytes: int = 5 * 2**30,
                   overwrite: bool = False) -> Path:
    """Merges the adapter into the base (PEFT safe_merge) and writes a standalone checkpoint in the base's layout.

    Written beside `out` and swapped in when complete (mgmlora.tools.output_dir), so no shard or index of an earlier
    output survives next to the new ones.

    Raises:
        UsageError: when `out` already holds files and `overwrite` is False (checked before anything loads).
        OutputPathError: when `out` is (or lies inside) the base model, its tokenizer or the run's directory: the merge
            reads the base's weights and would overwrite them with merged ones.
    """
    refuse_overwrite({"output": out}, folders={"checkpoint": run.source, "model_path": args.model_path,
                                               "tokenizer_path": args.tokenizer_path})
    check_output_dir(out, overwrite)
    out = Path(out)
    tokenizer = load_tokenizer(args)  # first: a wrong tokenizer path fails before minutes of loading and merging
    # a QLoRA adapter merges into the base in the model dtype: 4-bit codes cannot hold the delta, and the merged model
    # is what serving loads
    loaded, peft = _with_adapter(run, args, quantize=False)
    model = loaded.model.eval()
    if peft is not None:
        model = peft.merge_and_unload(safe_merge=True)  # raises on NaN instead of writing a broken model
    with writing_dir(out) as tmp:
        loaded.save_merged(model, tmp, max_shard_bytes)  # the family's own layout (MGM: the original key names)
        tokenizer.save_pretrained(str(tmp))
        if run.run_config is not None:
            shutil.copy(run.run_config, tmp / "training_config.yaml")
    return out


__all__ = ["RunAdapter", "build_trained_model", "export_adapter", "merge_and_save", "model_args_for",
           "read_run_adapter"]
